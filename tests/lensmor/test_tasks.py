"""Lensmor's contact unlocks are tasks: the helper holds the chargeable contacts' credits,
submits, polls the task with the published back-off and settles the hold when it ends.
Against the sandbox's task endpoints, including one that debits per delivered contact
(when Lensmor debits is not published)."""

from __future__ import annotations

import json
import pickle
import threading
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from creditguard import (
    POLL_BACKOFF,
    ContactUnlock,
    CreditGuard,
    InsufficientCredits,
    InvalidResponse,
    TaskPending,
    UnknownHold,
    apoll_unlock_task,
    asubmit_contact_unlock,
    aunlock_contacts,
    poll_unlock_task,
    submit_contact_unlock,
    unlock_contacts,
)
from creditguard.testing import FakeLensmor
from tests.helpers import NewBackend, reserved

pytestmark = pytest.mark.anyio

FAST = (0.001,)  # the tests poll at once; Lensmor's back-off is POLL_BACKOFF
IDS = ["1001", "1002", "1003", "1004"]


def _guard(fake: FakeLensmor, **kwargs: object) -> CreditGuard:
    options: dict[str, Any] = {"transport": fake.transport, **kwargs}
    return CreditGuard(fake.api_key, ttl=60, admission_timeout=0, **options)


class Rewrite:
    """The sandbox, with its answers at paths starting ``prefix`` rewritten (the first
    ``times`` of them) by ``change``: the decoded answer in, the new answer out (bytes are
    sent as they are). Serves sync and async clients."""

    def __init__(
        self,
        fake: FakeLensmor,
        prefix: str,
        change: Callable[[Any], object],
        times: int = 1,
    ) -> None:
        self.fake = fake
        self.prefix = prefix
        self.change = change
        self.times = times
        self.transport = httpx.MockTransport(self.answer)

    def answer(self, request: httpx.Request) -> httpx.Response:
        response = self.fake.transport.handle_request(request)
        body = response.read()
        if self.times and request.url.path.startswith(self.prefix) and response.is_success:
            self.times -= 1
            changed = self.change(json.loads(body))
            body = changed if isinstance(changed, bytes) else json.dumps(changed).encode()
        return httpx.Response(response.status_code, content=body)


def _replace(**fields: object) -> Callable[[Any], object]:
    return lambda answer: {**answer, **fields}


@pytest.mark.usefixtures("new_backend")
def test_the_published_back_off() -> None:
    assert POLL_BACKOFF == (3.0, 5.0, 10.0, 20.0)


def test_unlock_contacts_holds_submits_polls_and_settles(new_backend: NewBackend) -> None:
    fake = FakeLensmor(subscription_balance=1000, gift_balance=0)
    guard = _guard(fake, backend=new_backend())
    unlock = unlock_contacts(guard, [*IDS, "1001"], backoff=FAST)  # duplicates removed
    assert isinstance(unlock, ContactUnlock)
    assert unlock.status == "completed"
    assert unlock.task_id is not None
    assert unlock.hold_id is not None
    assert set(unlock.delivered) == set(fake.unlocked_contacts) == set(IDS)
    assert unlock.balance_after is not None
    assert unlock.balance_after.total_balance == 1000 - 15 * len(IDS)
    assert reserved(guard) == 0
    with pytest.raises(UnknownHold):  # settled
        guard.hold_by_id(unlock.hold_id)


def test_nothing_chargeable_means_no_task_and_nothing_held(new_backend: NewBackend) -> None:
    fake = FakeLensmor(subscription_balance=1000, gift_balance=0)
    guard = _guard(fake, backend=new_backend())
    unlock_contacts(guard, IDS, backoff=FAST)
    again = unlock_contacts(guard, IDS, backoff=FAST)
    assert again.status == "success"
    assert again.task_id is None
    assert again.hold_id is None
    assert set(again.skipped) == set(IDS)
    assert reserved(guard) == 0
    assert guard.balance(refresh=True).total_balance == 1000 - 15 * len(IDS)


def test_an_account_that_cannot_pay_is_refused_before_submitting(new_backend: NewBackend) -> None:
    fake = FakeLensmor(subscription_balance=50, gift_balance=0)
    guard = _guard(fake, backend=new_backend())
    with pytest.raises(InsufficientCredits) as refused:
        unlock_contacts(guard, IDS, backoff=FAST)
    assert refused.value.required == 60
    assert fake.unlocked_contacts == {}
    assert fake.charges == 0
    assert reserved(guard) == 0


def test_a_402_at_submission_is_insufficient_credits(new_backend: NewBackend) -> None:
    fake = FakeLensmor(subscription_balance=1000, gift_balance=0)
    guard = _guard(fake, backend=new_backend())
    guard.balance()
    fake.spend_outside(950)  # the web app spent it; the cache still says 1000
    with pytest.raises(InsufficientCredits) as refused:
        unlock_contacts(guard, IDS, backoff=FAST)
    # Refused by Lensmor's precheck (a shared backend sends one whenever it cannot tell
    # the cache is fresh) or by the submission's 402, which is then the cause.
    cause = refused.value.__cause__
    if cause is None:
        assert refused.value.available == 50
    else:
        assert isinstance(cause, httpx.HTTPStatusError)
        assert cause.response.status_code == 402
    assert fake.unlocked_contacts == {}
    assert reserved(guard) == 0


def test_submit_in_one_thread_poll_in_another(new_backend: NewBackend) -> None:
    fake = FakeLensmor(subscription_balance=1000, gift_balance=0)
    guard = _guard(fake, backend=new_backend())
    submitted = submit_contact_unlock(guard, IDS[:2])
    assert submitted.status == "accepted"
    assert reserved(guard) == 30
    assert submitted.task_id is not None
    results: list[ContactUnlock] = []

    def worker(task_id: str, hold_id: str | None) -> None:
        results.append(poll_unlock_task(guard, task_id, hold_id=hold_id, backoff=FAST))

    thread = threading.Thread(target=worker, args=(submitted.task_id, submitted.hold_id))
    thread.start()
    thread.join()
    (done,) = results
    assert done.status == "completed"
    assert set(done.delivered) == set(IDS[:2])
    assert done.balance_after is not None
    assert done.balance_after.total_balance == 970
    assert reserved(guard) == 0


def test_a_task_still_running_at_max_wait_leaves_its_hold_open(new_backend: NewBackend) -> None:
    fake = FakeLensmor(subscription_balance=1000, gift_balance=0, task_polls=50)
    guard = _guard(fake, backend=new_backend())
    submitted = submit_contact_unlock(guard, IDS)
    assert submitted.task_id is not None
    with pytest.raises(TaskPending) as pending:
        poll_unlock_task(
            guard, submitted.task_id, hold_id=submitted.hold_id, backoff=(0.01,), max_wait=0.05
        )
    assert pending.value.task_id == submitted.task_id
    assert pending.value.hold_id == submitted.hold_id
    assert reserved(guard) == 60
    done = poll_unlock_task(guard, submitted.task_id, hold_id=submitted.hold_id, backoff=FAST)
    assert done.status == "completed"
    assert reserved(guard) == 0


def test_a_task_that_is_gone_ends_its_hold(new_backend: NewBackend) -> None:
    fake = FakeLensmor(subscription_balance=1000, gift_balance=0)
    guard = _guard(fake, backend=new_backend())
    hold = guard.hold(30)
    with pytest.raises(httpx.HTTPStatusError) as gone:
        poll_unlock_task(guard, "999999", hold_id=hold.id, backoff=FAST)
    assert gone.value.response.status_code == 404
    assert reserved(guard) == 0


def test_phone_unlocks(new_backend: NewBackend) -> None:
    fake = FakeLensmor(subscription_balance=1000, gift_balance=0)
    guard = _guard(fake, backend=new_backend())
    unlock = unlock_contacts(guard, IDS[:2], phone=True, backoff=FAST)
    assert unlock.status == "completed"
    assert unlock.phone
    assert set(unlock.delivered) == set(fake.unlocked_phones)
    assert unlock.balance_after is not None
    assert unlock.balance_after.total_balance == 1000 - 150 * 2


def test_bad_input_is_refused_before_any_request(new_backend: NewBackend) -> None:
    fake = FakeLensmor(subscription_balance=1000, gift_balance=0)
    guard = _guard(fake, backend=new_backend())
    for bad in ([], "1001", [1001], [""]):
        with pytest.raises((TypeError, ValueError)):
            unlock_contacts(guard, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backoff"):
        unlock_contacts(guard, IDS, backoff=())
    with pytest.raises(ValueError, match="backoff"):
        unlock_contacts(guard, IDS, backoff=(0,))
    with pytest.raises(TypeError):
        poll_unlock_task(guard, "")
    assert fake.charges == 0


def test_spend_around_a_task_lets_calls_in_on_credits_the_task_will_take(
    new_backend: NewBackend,
) -> None:
    """Why holds: when a task is debited as it delivers, a spend around its submission
    settles before the charge, and a second call is admitted on credits the first task is
    about to take. A hold keeps them until the task ends."""
    base = "https://platform.lensmor.com"
    fake = FakeLensmor(subscription_balance=100, gift_balance=0, task_debit="delivery")
    guard = _guard(fake, backend=new_backend())
    client = httpx.Client(
        transport=fake.transport,
        base_url=base,
        headers={"Authorization": f"Bearer {fake.api_key}"},
    )
    tasks = []
    for batch in (IDS, ["2001", "2002", "2003", "2004"]):
        with guard.spend(60):
            answer = client.post("/external/contacts/unlock", json={"personnel_ids": batch})
            tasks.append(answer.json()["task_id"])  # both admitted on 100 credits
    for task_id in tasks:
        poll_unlock_task(guard, task_id, backoff=FAST)
    assert len(fake.unlocked_contacts) < 8  # the second task ran out of credits

    fake = FakeLensmor(subscription_balance=100, gift_balance=0, task_debit="delivery")
    guard = _guard(fake, backend=new_backend())
    first = submit_contact_unlock(guard, IDS)
    with pytest.raises(InsufficientCredits):  # the first task's 60 are still held
        submit_contact_unlock(guard, ["2001", "2002", "2003", "2004"])
    assert first.task_id is not None
    done = poll_unlock_task(guard, first.task_id, hold_id=first.hold_id, backoff=FAST)
    assert done.balance_after is not None
    assert done.balance_after.total_balance == 40
    assert set(fake.unlocked_contacts) == set(IDS)


async def test_async_unlocks(new_backend: NewBackend) -> None:
    fake = FakeLensmor(subscription_balance=1000, gift_balance=0)
    guard = _guard(fake, backend=new_backend())
    unlock = await aunlock_contacts(guard, IDS, backoff=FAST)
    assert unlock.status == "completed"
    assert set(unlock.delivered) == set(IDS)
    assert unlock.balance_after is not None
    assert unlock.balance_after.total_balance == 940
    submitted = await asubmit_contact_unlock(guard, ["3001"])
    assert submitted.task_id is not None
    done = await apoll_unlock_task(
        guard, submitted.task_id, hold_id=submitted.hold_id, backoff=FAST
    )
    assert done.balance_after is not None
    assert done.balance_after.total_balance == 925
    assert reserved(guard) == 0


SUBMIT = "/external/contacts/unlock"
TASKS = "/external/contacts/unlock-tasks/"


@pytest.mark.parametrize(
    "change",
    [
        _replace(skipped_personnel_ids=5),
        _replace(skipped_personnel_ids=True),
        _replace(skipped_personnel_ids=1.5),
        _replace(skipped_personnel_ids="1001"),
        _replace(skipped_personnel_ids={"1001": 1}),
        _replace(skipped_personnel_ids=[None]),
        _replace(skipped_personnel_ids=[["1001"]]),
        _replace(skipped_personnel_ids=[2**53]),
        _replace(status=5),
        _replace(status=None),
        _replace(status="queued"),
    ],
)
def test_a_malformed_submission_answer_keeps_the_hold_and_the_task_id(
    change: Callable[[Any], object],
    new_backend: NewBackend,
) -> None:
    """The submission was accepted: a task may run and charge. A malformed answer is
    InvalidResponse naming the task and the hold, which stays open: the caller polls."""
    fake = FakeLensmor(subscription_balance=1000, gift_balance=0)
    guard = _guard(fake, transport=Rewrite(fake, SUBMIT, change).transport, backend=new_backend())
    with pytest.raises(InvalidResponse) as bad:
        submit_contact_unlock(guard, IDS)
    task_id, hold_id = bad.value.task_id, bad.value.hold_id
    assert task_id is not None
    assert hold_id is not None
    assert task_id in str(bad.value)
    again = pickle.loads(pickle.dumps(bad.value))  # noqa: S301 - as a worker queue would
    assert (again.task_id, again.hold_id, str(again)) == (task_id, hold_id, str(bad.value))
    assert reserved(guard) == 60
    assert guard.hold_by_id(hold_id).cost == 60
    done = poll_unlock_task(guard, task_id, hold_id=hold_id, backoff=FAST)
    assert done.status == "completed"
    assert set(done.delivered) == set(IDS)
    assert done.balance_after is not None
    assert done.balance_after.total_balance == 940
    assert reserved(guard) == 0


@pytest.mark.parametrize(
    "change",
    [
        _replace(task_id=5),
        _replace(task_id=None),
        _replace(task_id=""),
        _replace(task_id=["t"]),
        _replace(task_id="t-1\nERROR forged log line"),
        _replace(task_id="t" * 201),
        lambda answer: b"<html>accepted</html>",
        lambda answer: [answer],
        lambda answer: b"\xff\xfe",
    ],
)
def test_a_submission_answer_without_a_task_id_keeps_the_hold(
    change: Callable[[Any], object],
    new_backend: NewBackend,
) -> None:
    """No task id to poll: the hold stays open for the caller to settle (a read after
    the work) or release by id; it is never released as if nothing were chargeable."""
    fake = FakeLensmor(subscription_balance=1000, gift_balance=0)
    guard = _guard(fake, transport=Rewrite(fake, SUBMIT, change).transport, backend=new_backend())
    with pytest.raises(InvalidResponse) as bad:
        submit_contact_unlock(guard, IDS)
    assert bad.value.task_id is None
    hold_id = bad.value.hold_id
    assert hold_id is not None
    assert reserved(guard) == 60
    after = guard.hold_by_id(hold_id).settle()
    assert after is not None
    assert after.total_balance == 940  # the sandbox debits at submission
    assert reserved(guard) == 0


@pytest.mark.parametrize(
    "change",
    [
        _replace(taskStatus="completed", items=5),
        _replace(taskStatus="completed", items=True),
        _replace(taskStatus="completed", items=1.5),
        _replace(taskStatus="completed", items="1001"),
        _replace(taskStatus="completed", items={"personnelId": "1001"}),
        _replace(taskStatus="completed", items=[5]),
        _replace(taskStatus="completed", items=[{"personnelId": 2**53, "status": "unlocked"}]),
        _replace(taskStatus="completed", items=[{"personnelId": -1, "status": "unlocked"}]),
        _replace(taskStatus="failed", items=[{"personnelId": None, "status": "failed"}]),
        _replace(taskStatus="completed", items=[{"personnelId": "1001", "status": 1}]),
        _replace(
            taskStatus="completed",
            items=[{"personnelId": "1001", "status": "unlocked", "email": 5}],
        ),
        _replace(
            taskStatus="completed",
            items=[{"personnelId": "1001", "status": "failed", "errorCode": ["X"]}],
        ),
        _replace(taskStatus=5),
        _replace(taskStatus=None),
        lambda answer: b"not json",
        lambda answer: [answer],
    ],
)
def test_a_malformed_task_answer_keeps_the_hold_and_names_the_task(
    change: Callable[[Any], object],
    new_backend: NewBackend,
) -> None:
    fake = FakeLensmor(subscription_balance=1000, gift_balance=0)
    guard = _guard(fake, transport=Rewrite(fake, TASKS, change).transport, backend=new_backend())
    submitted = submit_contact_unlock(guard, IDS)
    assert submitted.task_id is not None
    with pytest.raises(InvalidResponse) as bad:
        poll_unlock_task(guard, submitted.task_id, hold_id=submitted.hold_id, backoff=FAST)
    assert bad.value.task_id == submitted.task_id
    assert bad.value.hold_id == submitted.hold_id
    assert reserved(guard) == 60  # the hold is still open: poll again
    done = poll_unlock_task(guard, submitted.task_id, hold_id=submitted.hold_id, backoff=FAST)
    assert done.status == "completed"
    assert set(done.delivered) == set(IDS)
    assert reserved(guard) == 0


def test_unlock_contacts_keeps_the_ids_of_a_malformed_task_answer(new_backend: NewBackend) -> None:
    fake = FakeLensmor(subscription_balance=1000, gift_balance=0)
    change = _replace(taskStatus="completed", items=5)
    guard = _guard(fake, transport=Rewrite(fake, TASKS, change).transport, backend=new_backend())
    with pytest.raises(InvalidResponse) as bad:
        unlock_contacts(guard, IDS, backoff=FAST)
    assert bad.value.task_id is not None
    assert bad.value.hold_id is not None
    done = poll_unlock_task(guard, bad.value.task_id, hold_id=bad.value.hold_id, backoff=FAST)
    assert done.status == "completed"
    assert reserved(guard) == 0


def test_task_answers_with_numeric_ids_and_unknown_fields_are_accepted(
    new_backend: NewBackend,
) -> None:
    fake = FakeLensmor(subscription_balance=1000, gift_balance=0)

    def numeric(answer: Any) -> object:
        items = [
            {**item, "personnelId": int(item["personnelId"]), "x": [1]} for item in answer["items"]
        ]
        return {**answer, "items": items, "extra": {"a": None}}

    guard = _guard(
        fake, transport=Rewrite(fake, TASKS, numeric, times=100).transport, backend=new_backend()
    )
    unlock = unlock_contacts(guard, IDS, backoff=FAST)
    assert unlock.status == "completed"
    assert set(unlock.delivered) == set(IDS)


async def test_async_malformed_answers_keep_the_hold(new_backend: NewBackend) -> None:
    fake = FakeLensmor(subscription_balance=1000, gift_balance=0)
    change = _replace(skipped_personnel_ids=1.5)
    guard = _guard(fake, transport=Rewrite(fake, SUBMIT, change).transport, backend=new_backend())
    with pytest.raises(InvalidResponse) as bad:
        await asubmit_contact_unlock(guard, IDS)
    task_id, hold_id = bad.value.task_id, bad.value.hold_id
    assert task_id is not None
    assert hold_id is not None
    assert reserved(guard) == 60
    done = await apoll_unlock_task(guard, task_id, hold_id=hold_id, backoff=FAST)
    assert done.status == "completed"
    assert reserved(guard) == 0
