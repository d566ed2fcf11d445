"""The sandbox answers as Lensmor does: every answer of every endpoint it serves, success and
error paths alike, validates against the schema Lensmor publishes for it (copied from the
published OpenAPI document into ``tests/data/lensmor-schemas-0.27.0.json``), and the
credits move as the published costs say.

Each test runs twice: through the in-process transport and over real loopback HTTP (the
ASGI app under uvicorn).
"""

from __future__ import annotations

import copy
import json
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from jsonschema import Draft202012Validator

from creditguard.testing import FakeLensmor, serve

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data" / "lensmor-schemas-0.27.0.json"
DOCUMENT: dict[str, Any] = json.loads(DATA.read_text(encoding="utf-8"))
SCHEMAS: dict[str, Any] = DOCUMENT["components"]["schemas"]
KEY = "sk-conformance"
ADDON_KEYS = ("addonAmount", "addonBalance", "addonExpireAt")


def _balance_022() -> dict[str, Any]:
    """API 0.22's balance: 0.27's ``CreditBalance`` without the add-on keys 0.24 added."""
    schema = copy.deepcopy(SCHEMAS["CreditBalance"])
    schema["required"] = [name for name in schema["required"] if name not in ADDON_KEYS]
    for name in ADDON_KEYS:
        del schema["properties"][name]
    schema["not"] = {"anyOf": [{"required": [name]} for name in ADDON_KEYS]}
    return schema


def _validator(name: str) -> Draft202012Validator:
    root = {"components": DOCUMENT["components"]}
    schema = (
        _balance_022() if name == "CreditBalance@0.22" else {"$ref": f"#/components/schemas/{name}"}
    )
    Draft202012Validator.check_schema({**root, **schema})
    return Draft202012Validator({**root, **schema})


VALIDATORS = {name: _validator(name) for name in (*SCHEMAS, "CreditBalance@0.22")}


def conforms(schema: str, data: object) -> None:
    errors = sorted(VALIDATORS[schema].iter_errors(data), key=str)
    assert not errors, f"{schema}: {[e.message for e in errors]}\n{json.dumps(data, indent=1)}"


# -- one client per way of reaching the sandbox ---------------------------------------------


class _Switch:
    """Forwards to the current test's sandbox: one server for the module."""

    def __init__(self) -> None:
        self.target: FakeLensmor | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await (self.target or FakeLensmor()).app(scope, receive, send)


@pytest.fixture(scope="module")
def _served() -> Iterator[tuple[_Switch, str]]:
    switch = _Switch()
    with serve(switch) as url:
        yield switch, url


@dataclass
class Api:
    """A sandbox and a client of it that checks what every answer looks like."""

    fake: FakeLensmor
    http: httpx.Client
    seen: list[str] = field(default_factory=list)

    def call(
        self,
        method: str,
        path: str,
        status: int,
        schema: str,
        body: object = None,
        *,
        key: str | None = KEY,
    ) -> Any:
        headers = {} if key is None else {"Authorization": f"Bearer {key}"}
        if schema == "ActionPrecheckResponse":
            conforms("ActionPrecheckRequest", body)  # what we send is valid as well
        elif schema == "ContactUnlockSubmission" and path == PHONES:
            conforms("PhoneUnlockRequest", body)
        response = self.http.request(method, path, json=body, headers=headers)
        assert response.status_code == status, response.text
        data = response.json()
        conforms(schema, data)
        if schema in ("ApiError", "ConcurrencyLimitBusinessError", FEATURE):
            assert data["code"] == status or schema != "ApiError"
            assert response.headers["x-request-id"] == data["traceId"]
        self.seen.append(schema)
        return data

    def post(self, path: str, status: int, schema: str, body: object = None, **kw: Any) -> Any:
        return self.call("POST", path, status, schema, body, **kw)

    def get(self, path: str, status: int, schema: str, **kw: Any) -> Any:
        return self.call("GET", path, status, schema, **kw)

    def error(self, method: str, path: str, status: int, key: str, body: object = None) -> None:
        data = self.call(method, path, status, "ApiError", body)
        assert data["errorKey"] == key

    @property
    def total(self) -> int:
        return self.fake.balance.total_balance


@pytest.fixture(params=["transport", "http"])
def make(
    request: pytest.FixtureRequest, _served: tuple[_Switch, str]
) -> Iterator[Callable[..., Api]]:
    made: list[Api] = []

    def make(**kwargs: Any) -> Api:
        fake = FakeLensmor(api_key=KEY, **kwargs)
        if request.param == "transport":
            http = httpx.Client(transport=fake.transport, base_url="http://sandbox.test")
        else:
            switch, url = _served
            switch.target = fake
            http = httpx.Client(base_url=url, timeout=30)
        made.append(Api(fake, http))
        return made[-1]

    yield make
    for api in made:
        api.http.close()


@pytest.fixture
def api(make: Callable[..., Api]) -> Api:
    return make()


# -- the balance ----------------------------------------------------------------------------

BALANCE = "/external/credits/balance"


def test_default_balance_is_the_022_shape_unchanged(api: Api) -> None:
    response = api.http.get(BALANCE, headers={"Authorization": f"Bearer {KEY}"})
    assert response.content == (
        b'{"totalAmount": 30050, "totalBalance": 30050, "subscriptionAmount": 30000,'
        b' "subscriptionBalance": 30000, "giftAmount": 50, "giftBalance": 50, "resetAt": null}'
    )
    conforms("CreditBalance@0.22", response.json())
    assert not any(name.startswith("x-ratelimit") for name in response.headers)


@pytest.mark.parametrize("floats", [False, True])
def test_balance_024_shape(make: Callable[..., Api], floats: bool) -> None:
    api = make(addon_balance=300, addon_expire_at=1_900_000_000_000, float_numbers=floats)
    data = api.get(BALANCE, 200, "CreditBalance")
    assert data["addonBalance"] == 300
    assert data["totalBalance"] == 30350
    assert all(type(v) is (float if floats else int) for v in data.values() if v is not None)
    # Spent subscription first, then add-on, then gift.
    api.fake.spend_outside(30100)
    data = api.get(BALANCE, 200, "CreditBalance")
    assert (data["subscriptionBalance"], data["addonBalance"], data["giftBalance"]) == (0, 200, 50)


def test_balance_floats_in_the_022_shape(make: Callable[..., Api]) -> None:
    api = make(float_numbers=True)
    data = api.get(BALANCE, 200, "CreditBalance@0.22")
    assert data["totalBalance"] == 30050.0
    assert isinstance(data["totalBalance"], float)


def test_add_on_credits_need_the_024_shape() -> None:
    with pytest.raises(ValueError, match=r"0\.24"):
        FakeLensmor(addon_balance=5, balance_shape="0.22")


def test_spend_outside_is_the_web_app(api: Api) -> None:
    api.fake.spend_outside(30000)
    assert api.fake.charges == 0
    data = api.get(BALANCE, 200, "CreditBalance@0.22")
    assert data["totalBalance"] == 50
    over_http = api.http.post(
        "/sandbox/spend-outside",
        params={"credits": "60"},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert over_http.status_code == 402
    api.error("POST", "/external/events/1/unlock", 402, "INSUFFICIENT_CREDITS")
    assert api.total == 50  # never negative


# -- event unlock ---------------------------------------------------------------------------


def test_event_unlock(make: Callable[..., Api]) -> None:
    api = make(subscription_balance=2500, gift_balance=100)
    data = api.post("/external/events/26855/unlock", 201, "EventUnlockResult")
    assert data["alreadyUnlocked"] is False
    assert data["creditsUsed"] == 2000
    assert data["balanceAfter"] == {
        "subscriptionBalance": 500,
        "permanentBalance": 100,
        "totalBalance": 600,
        "unlimited": False,
    }
    assert data["event"]["eventId"] == "26855"
    assert api.total == 600
    again = api.post("/external/events/26855/unlock", 201, "EventUnlockResult")
    assert (again["alreadyUnlocked"], again["creditsUsed"], again["balanceAfter"]) == (
        True,
        0,
        None,
    )
    assert api.total == 600
    assert api.fake.unlocked_events == {"26855"}
    api.error("POST", "/external/events/777/unlock", 402, "INSUFFICIENT_CREDITS")
    assert (api.total, api.fake.charges) == (600, 1)


def test_event_unlock_errors(make: Callable[..., Api]) -> None:
    api = make(open_catalogue=False)
    api.fake.add_event("10", contacts=False)
    api.fake.add_event("11", name=None)
    api.error("POST", "/external/events/10/unlock", 400, "INVALID_REQUEST")
    api.error("POST", "/external/events/12/unlock", 404, "NOT_FOUND")
    for key in (None, "wrong"):
        data = api.call("POST", "/external/events/11/unlock", 401, "ApiError", key=key)
        assert data["errorKey"] == "INVALID_API_KEY"
    assert api.total == 30050
    # The scheme is matched without regard to case.
    response = api.http.post(
        "/external/events/11/unlock", headers={"Authorization": f"bearer {KEY}"}
    )
    assert response.status_code == 201
    conforms("EventUnlockResult", response.json())


def test_event_unlock_with_floats_and_add_ons(make: Callable[..., Api]) -> None:
    api = make(addon_balance=2000, float_numbers=True)
    data = api.post("/external/events/5/unlock", 201, "EventUnlockResult")
    assert data["creditsUsed"] == 2000.0
    assert isinstance(data["creditsUsed"], float)
    assert data["balanceAfter"]["addonBalance"] == 2000


# -- visitors and full-access unlocks ---------------------------------------------------------

FEATURE = "FeatureUnavailableBusinessError"


def visitors(event_id: str) -> str:
    return f"/external/events/{event_id}/visitors/unlock"


def full_access(event_id: str) -> str:
    return f"/external/events/{event_id}/full-access/unlock"


def test_visitors_unlock(make: Callable[..., Api]) -> None:
    api = make(subscription_balance=5500, gift_balance=100)
    api.post("/external/events/7/unlock", 201, "EventUnlockResult")  # the base layer first
    data = api.post(visitors("7"), 201, "EventVisitorUnlockResult")
    assert (data["alreadyUnlocked"], data["creditsSpent"]) == (False, 3000)
    # The whole balance after, as the balance endpoint reads it, with the add-on keys of
    # API 0.24 (which the visitors unlock came with) even for a sandbox in the 0.22 shape.
    balance = api.get(BALANCE, 200, "CreditBalance@0.22")
    assert (balance["totalBalance"], balance["subscriptionBalance"]) == (600, 500)
    addon = {"addonAmount": 0, "addonBalance": 0, "addonExpireAt": None}
    assert data["balanceAfter"] == {**balance, **addon}
    assert data["event"] == {"id": "7", "eventId": "7", "name": "Sandbox event 7"}
    again = api.post(visitors("7"), 201, "EventVisitorUnlockResult")
    assert (again["alreadyUnlocked"], again["creditsSpent"], again["balanceAfter"]) == (
        True,
        0,
        None,
    )
    assert api.fake.unlocked_visitors == {"7"}
    api.fake.add_event("8", unlocked=True)
    api.error("POST", visitors("8"), 402, "INSUFFICIENT_CREDITS")
    assert (api.total, api.fake.charges) == (600, 2)
    assert api.fake.unlocked_visitors == {"7"}


def test_visitors_unlock_errors(make: Callable[..., Api]) -> None:
    api = make(open_catalogue=False)
    api.fake.add_event("1")  # the base layer still locked
    api.fake.add_event("2", unlocked=True, visitors=False)  # no visitor data
    api.error("POST", visitors("1"), 409, "STATE_CONFLICT")
    api.error("POST", visitors("2"), 400, "INVALID_REQUEST")
    api.error("POST", visitors("3"), 404, "NOT_FOUND")
    api.error("POST", visitors("x" * 101), 400, "INVALID_REQUEST")
    for key in (None, "wrong"):
        data = api.call("POST", visitors("1"), 401, "ApiError", key=key)
        assert data["errorKey"] == "INVALID_API_KEY"
    assert (api.total, api.fake.charges) == (30050, 0)


def test_visitors_unlock_with_floats_and_add_ons(make: Callable[..., Api]) -> None:
    api = make(addon_balance=1000, float_numbers=True)
    api.fake.add_event("5", unlocked=True)
    data = api.post(visitors("5"), 201, "EventVisitorUnlockResult")
    assert type(data["creditsSpent"]) is int  # an integer in the schema
    after = data["balanceAfter"]
    assert (after["subscriptionBalance"], after["addonBalance"]) == (27000.0, 1000.0)
    assert all(type(v) is float for v in after.values() if v is not None)


def test_full_access_unlock(make: Callable[..., Api]) -> None:
    api = make(subscription_balance=12000, gift_balance=50)
    api.fake.add_event("2", unlocked=True)  # the base layer unlocked already
    api.fake.add_event("3", visitors=False)  # no visitor data
    api.fake.add_event("4", unlocked=True, visitors=False)
    flags = ("alreadyUnlocked", "eventUnlocked", "visitorUnlocked", "visitorSkipped")
    expected = [
        ("1", 5000, (False, True, True, False)),
        ("1", 0, (True, False, False, False)),
        ("2", 3000, (False, False, True, False)),
        ("3", 2000, (False, True, False, True)),
        ("4", 0, (True, False, False, True)),
    ]
    total = 12050
    for event_id, used, outcome in expected:
        data = api.post(full_access(event_id), 201, "EventFullAccessUnlockResult")
        assert (data["totalCreditsUsed"], tuple(data[f] for f in flags)) == (used, outcome)
        total -= used
        assert api.total == total
        # The short balanceAfter (subscription credits are spent first), null when free.
        short = {"subscriptionBalance": total - 50, "permanentBalance": 50, "totalBalance": total}
        assert data["balanceAfter"] == ({**short, "unlimited": False} if used else None)
    assert api.fake.unlocked_events == {"1", "2", "3", "4"}
    assert api.fake.unlocked_visitors == {"1", "2"}
    api.error("POST", full_access("5"), 402, "INSUFFICIENT_CREDITS")  # 5000 > 2050
    assert "5" not in api.fake.unlocked_events
    assert (api.total, api.fake.charges) == (2050, 3)


def test_full_access_balance_after_as_a_bare_number(make: Callable[..., Api]) -> None:
    """One older published version types ``balanceAfter`` as the total alone: the sandbox
    answers so on request, and the 0.27 schema (rightly) does not accept it."""
    api = make(full_access_balance_after="number")
    response = api.http.post(full_access("1"), headers={"Authorization": f"Bearer {KEY}"})
    data = response.json()
    assert (response.status_code, data["balanceAfter"]) == (201, 25050)
    assert list(VALIDATORS["EventFullAccessUnlockResult"].iter_errors(data))
    conforms("EventFullAccessUnlockResult", {**data, "balanceAfter": None})
    again = api.post(full_access("1"), 201, "EventFullAccessUnlockResult")
    assert again["balanceAfter"] is None
    with pytest.raises(ValueError, match="full_access_balance_after"):
        FakeLensmor(full_access_balance_after="text")  # type: ignore[arg-type]


def test_full_access_unlock_errors(make: Callable[..., Api]) -> None:
    api = make(open_catalogue=False)
    api.fake.add_event("1", contacts=False)
    api.error("POST", full_access("1"), 400, "INVALID_REQUEST")
    api.error("POST", full_access("2"), 404, "NOT_FOUND")
    api.error("POST", full_access(""), 400, "INVALID_REQUEST")
    data = api.call("POST", full_access("1"), 401, "ApiError", key="wrong")
    assert data["errorKey"] == "INVALID_API_KEY"
    assert (api.total, api.fake.charges) == (30050, 0)
    with pytest.raises(ValueError, match="visitors_unlocked"):
        api.fake.add_event("3", visitors_unlocked=True)


def test_a_free_plan_gets_the_feature_envelope(make: Callable[..., Api]) -> None:
    api = make(subscription_active=False)
    for path in (visitors("1"), full_access("1")):
        data = api.post(path, 200, FEATURE)
        assert data["errorKey"] == "USER_HAS_NO_FEATURE"
    api.post("/external/events/1/unlock", 201, "EventUnlockResult")  # the base layer is not
    assert api.total == 28050
    api.fake.subscription_active = True
    api.post(visitors("1"), 201, "EventVisitorUnlockResult")
    assert api.total == 25050


# -- contact email unlock -------------------------------------------------------------------

CONTACTS = "/external/contacts/unlock"


def test_contact_unlock_task(make: Callable[..., Api]) -> None:
    api = make(task_polls=3)
    api.fake.add_contact("3", email=None)  # found nothing
    api.fake.add_contact("4", unlocked=True)
    body = {"personnel_ids": ["1", "2", "2", "3", "4", "x"], "event_id": "26855"}
    data = api.post(CONTACTS, 201, "ContactUnlockSubmission", body)
    assert data["status"] == "accepted"
    assert data["skipped_personnel_ids"] == ["4", "x"]
    assert data["skipped_detail"]["already_unlocked_personnel_ids"] == ["4"]
    assert data["skipped_detail"]["invalid_personnel_ids"] == ["x"]
    # Debited at submission: 15 per chargeable contact (1, 2, 3), duplicates removed.
    assert api.total == 30050 - 45
    task = f"/external/contacts/unlock-tasks/{data['task_id']}"
    # While the task runs, its contacts are skipped (free) as unlocking.
    again = api.post(CONTACTS, 201, "ContactUnlockSubmission", {"personnel_ids": ["1"]})
    assert again["status"] == "success"
    assert again["skipped_detail"]["unlocking_personnel_ids"] == ["1"]
    statuses = [api.get(task, 200, "ContactUnlockTask")["taskStatus"] for _ in range(3)]
    assert statuses == ["pending", "processing", "completed"]
    done = api.get(task, 200, "ContactUnlockTask")
    assert {item["personnelId"]: (item["status"], item["email"]) for item in done["items"]} == {
        "1": ("unlocked", "contact-1@example.test"),
        "2": ("unlocked", "contact-2@example.test"),
        "3": ("failed", None),
    }
    assert done["items"][2]["errorCode"]
    assert api.total == 30050 - 45  # nothing refunded
    assert set(api.fake.unlocked_contacts) == {"1", "2", "4"}


def test_contact_unlock_with_nothing_chargeable_is_free(api: Api) -> None:
    api.fake.add_contact("8", unlocked=True)
    data = api.post(CONTACTS, 201, "ContactUnlockSubmission", {"personnel_ids": ["8", "8"]})
    assert data["status"] == "success"
    assert "task_id" not in data
    assert api.total == 30050


def test_contact_unlock_errors(make: Callable[..., Api]) -> None:
    api = make(subscription_balance=20, gift_balance=0)
    # 402 at submission checks the whole batch: two contacts cost 30.
    api.error("POST", CONTACTS, 402, "INSUFFICIENT_CREDITS", {"personnel_ids": ["1", "2"]})
    assert api.total == 20
    for body in ({}, {"personnel_ids": []}, {"personnel_ids": [1]}, {"personnel_ids": "1"}, []):
        api.error("POST", CONTACTS, 400, "INVALID_REQUEST", body)
    api.error("POST", CONTACTS, 400, "INVALID_REQUEST", {"personnel_ids": ["1"], "event_id": ""})
    many = {"personnel_ids": [str(i) for i in range(2001)]}
    api.error("POST", CONTACTS, 422, "LEAD_SELECTION_LIMIT_EXCEEDED", many)
    api.error("GET", "/external/contacts/unlock-tasks/99", 404, "NOT_FOUND")
    api.fake.open_catalogue = False
    api.error("POST", CONTACTS, 404, "NOT_FOUND", {"personnel_ids": ["1"], "event_id": "5"})
    data = api.post(CONTACTS, 201, "ContactUnlockSubmission", {"personnel_ids": ["1"]})
    assert data["skipped_detail"]["missing_personnel_ids"] == ["1"]
    assert api.total == 20


# -- contact phone unlock -------------------------------------------------------------------

PHONES = "/external/contacts/unlock-phone"


def test_contact_phone_unlock_task(make: Callable[..., Api]) -> None:
    api = make(task_polls=3)
    api.fake.add_contact("3", phone=None)  # found nothing
    api.fake.add_contact("4", phone_unlocked=True)
    api.fake.add_contact("5", unlocked=True)  # its email, not its phone number
    body = {"personnel_ids": ["1", "2", "2", "3", "4", "5", "x"], "event_id": "26855"}
    data = api.post(PHONES, 201, "ContactUnlockSubmission", body)
    assert data["status"] == "accepted"
    assert data["skipped_personnel_ids"] == ["4", "x"]
    assert data["skipped_detail"]["already_unlocked_personnel_ids"] == ["4"]
    # Debited at submission: 150 per chargeable contact (1, 2, 3, 5), duplicates removed.
    assert api.total == 30050 - 600
    task = f"/external/contacts/unlock-phone-tasks/{data['task_id']}"
    again = api.post(PHONES, 201, "ContactUnlockSubmission", {"personnel_ids": ["1"]})
    assert again["skipped_detail"]["unlocking_personnel_ids"] == ["1"]
    # The email unlock is another unlock: contact 1's email is chargeable meanwhile.
    emails = api.post(CONTACTS, 201, "ContactUnlockSubmission", {"personnel_ids": ["1"]})
    assert emails["status"] == "accepted"
    # Each task is found at its own unlock's path only.
    api.error("GET", f"{CONTACTS}-tasks/{data['task_id']}", 404, "NOT_FOUND")
    api.error("GET", f"{PHONES}-tasks/{emails['task_id']}", 404, "NOT_FOUND")
    statuses = [api.get(task, 200, "PhoneUnlockTask")["taskStatus"] for _ in range(3)]
    assert statuses == ["pending", "processing", "completed"]
    done = api.get(task, 200, "PhoneUnlockTask")
    assert {item["personnelId"]: (item["status"], item["phone"]) for item in done["items"]} == {
        "1": ("unlocked", "+1-555-0100 x1"),
        "2": ("unlocked", "+1-555-0100 x2"),
        "3": ("failed", None),
        "5": ("unlocked", "+1-555-0100 x5"),
    }
    assert done["items"][2]["errorCode"] == "PHONE_NOT_FOUND"
    assert api.total == 30050 - 600 - 15  # nothing refunded
    assert set(api.fake.unlocked_phones) == {"1", "2", "4", "5"}
    assert set(api.fake.unlocked_contacts) == {"5"}  # emails: the task above still runs


def test_contact_phone_unlock_with_nothing_chargeable_is_free(api: Api) -> None:
    api.fake.add_contact("8", phone_unlocked=True)
    data = api.post(PHONES, 201, "ContactUnlockSubmission", {"personnel_ids": ["8", "8", "y"]})
    assert (data["status"], data["skipped_personnel_ids"]) == ("success", ["8", "y"])
    assert "task_id" not in data
    assert api.total == 30050


def test_contact_phone_unlock_errors(make: Callable[..., Api]) -> None:
    api = make(subscription_balance=200, gift_balance=0)
    # 402 at submission checks the whole batch: two contacts cost 300.
    api.error("POST", PHONES, 402, "INSUFFICIENT_CREDITS", {"personnel_ids": ["1", "2"]})
    assert api.total == 200
    for body in ({}, {"personnel_ids": []}, {"personnel_ids": [1]}, {"personnel_ids": "1"}, []):
        api.error("POST", PHONES, 400, "INVALID_REQUEST", body)
    api.error("POST", PHONES, 400, "INVALID_REQUEST", {"personnel_ids": ["1"], "event_id": ""})
    many = {"personnel_ids": [str(i) for i in range(2001)]}
    api.error("POST", PHONES, 422, "LEAD_SELECTION_LIMIT_EXCEEDED", many)
    api.error("GET", "/external/contacts/unlock-phone-tasks/99", 404, "NOT_FOUND")
    api.fake.open_catalogue = False
    api.error("POST", PHONES, 404, "NOT_FOUND", {"personnel_ids": ["1"], "event_id": "5"})
    assert (api.total, api.fake.charges) == (200, 0)


# -- exhibitor searches ---------------------------------------------------------------------

SEARCHES = [
    ("/external/exhibitors/search-events", "EventReverseSearchPage"),
    ("/external/exhibitors/search-by-company-name", "ExhibitorPage"),
]


@pytest.mark.parametrize(("path", "schema"), SEARCHES)
def test_search(make: Callable[..., Api], path: str, schema: str) -> None:
    api = make(subscription_balance=60, gift_balance=0)
    api.fake.add_company("Nobody Inc", events=0, exhibitors=0)
    api.fake.add_company("Acme", events=3, exhibitors=3)
    page = api.post(path, 201, schema, {"company_name": "acme", "pageSize": 2})
    assert (len(page["items"]), page["total"], page["hasMore"]) == (2, 3, True)
    assert "creditsUsed" not in page
    assert api.total == 10
    empty = api.post(path, 201, schema, {"company_name": "Nobody Inc"})
    assert (empty["items"], empty["total"]) == ([], 0)
    assert api.total == 10  # an empty result is free
    api.error("POST", path, 402, "INSUFFICIENT_CREDITS", {"company_name": "Acme"})
    for body in ({}, {"company_name": ""}, {"company_name": "A", "pageSize": 101}, "Acme"):
        api.error("POST", path, 400, "INVALID_REQUEST", body)
    assert api.total == 10


# -- precheck -------------------------------------------------------------------------------

PRECHECK = "/external/actions/precheck"


def _precheck(api: Api, action: str, **params: Any) -> dict[str, Any]:
    body = {"action_type": action, "params": params, "call_source": "api"}
    data: dict[str, Any] = api.post(PRECHECK, 200, "ActionPrecheckResponse", body)
    assert data["action_type"] == action
    assert data["should_charge"] is (data["credits"] > 0)
    return data


def test_precheck(make: Callable[..., Api]) -> None:
    api = make(subscription_balance=2010, gift_balance=0)
    api.fake.add_event("1", contacts=False)
    api.fake.add_event("2", unlocked=True)
    api.fake.add_contact("7", unlocked=True)
    api.fake.add_company("Nobody", events=0)
    expected = [
        (("unlock_event_contacts", {"event_id": "9"}), (True, "ok", 2000)),
        (("unlock_event_contacts", {"event_id": "1"}), (False, "no_contacts_available", 0)),
        (("unlock_event_contacts", {"event_id": "2"}), (True, "already_unlocked", 0)),
        (("unlock_event_contacts", {}), (False, "invalid_subject", 0)),
        (("unlock_contact_emails", {"personnel_ids": ["5", "6", "7"]}), (True, "ok", 30)),
        (("unlock_contact_emails", {"personnel_ids": ["7"]}), (True, "already_unlocked", 0)),
        (("unlock_contact_emails", {"personnel_ids": ["x"]}), (False, "no_contacts_available", 0)),
        (("search_exhibitor_events", {"company_name": "Acme"}), (True, "ok", 50)),
        (("search_exhibitor_events", {"company_name": "Nobody"}), (True, "ok", 0)),
        (("query_something_new", {}), (False, "unsupported_action", 0)),
    ]
    for (action, params), (allowed, reason, credits) in expected:
        data = _precheck(api, action, **params)
        assert (data["allowed"], data["reason_code"], data["credits"]) == (allowed, reason, credits)
    detail = _precheck(api, "unlock_contact_emails", personnel_ids=["5", "5", "7"])["detail"]
    assert detail["personnel_ids"] == ["5"]
    assert (detail["chargeable_count"], detail["already_unlocked_count"]) == (1, 1)
    api.fake.spend_outside(20)
    data = _precheck(api, "unlock_event_contacts", event_id="9")
    assert (data["allowed"], data["reason_code"], data["credits"]) == (
        False,
        "insufficient_balance",
        2000,
    )
    assert (api.total, api.fake.charges) == (1990, 0)  # never charges


def test_precheck_of_the_visitor_full_access_and_phone_unlocks(make: Callable[..., Api]) -> None:
    api = make(subscription_balance=5010, gift_balance=0)
    api.fake.add_event("1", unlocked=True)
    api.fake.add_event("2", unlocked=True, visitors=False)
    api.fake.add_event("3", unlocked=True, visitors_unlocked=True)
    api.fake.add_event("4", contacts=False)
    api.fake.add_contact("7", phone_unlocked=True)
    expected = [
        (("unlock_event_visitors", {"event_id": "1"}), (True, "ok", 3000)),
        (("unlock_event_visitors", {"event_id": "9"}), (False, "state_conflict", 0)),
        (("unlock_event_visitors", {"event_id": "2"}), (False, "no_contacts_available", 0)),
        (("unlock_event_visitors", {"event_id": "3"}), (True, "already_unlocked", 0)),
        (("unlock_event_visitors", {"event_id": 3}), (False, "invalid_subject", 0)),
        (("unlock_event_full_access", {"event_id": "9"}), (True, "ok", 5000)),
        (("unlock_event_full_access", {"event_id": "1"}), (True, "ok", 3000)),
        (("unlock_event_full_access", {"event_id": "3"}), (True, "already_unlocked", 0)),
        (("unlock_event_full_access", {"event_id": "4"}), (False, "no_contacts_available", 0)),
        (("unlock_event_full_access", {}), (False, "invalid_subject", 0)),
        (("unlock_contact_phones", {"personnel_ids": ["5", "6", "7"]}), (True, "ok", 300)),
        (("unlock_contact_phones", {"personnel_ids": ["7"]}), (True, "already_unlocked", 0)),
        (("unlock_contact_phones", {"personnel_ids": []}), (False, "invalid_subject", 0)),
    ]
    for (action, params), (allowed, reason, credits) in expected:
        data = _precheck(api, action, **params)
        assert (data["allowed"], data["reason_code"], data["credits"]) == (allowed, reason, credits)
    detail = _precheck(api, "unlock_event_full_access", event_id="2")["detail"]
    assert detail == {
        "event_id": "2",
        "event_unlock_credits": 0,
        "visitor_unlock_credits": 0,
        "visitor_skipped": True,
    }
    detail = _precheck(api, "unlock_contact_phones", personnel_ids=["5", "5", "7"])["detail"]
    assert (detail["personnel_ids"], detail["already_unlocked_count"]) == (["5"], 1)
    api.fake.spend_outside(2020)  # 2990 left
    data = _precheck(api, "unlock_event_visitors", event_id="1")
    assert (data["allowed"], data["reason_code"], data["credits"]) == (
        False,
        "insufficient_balance",
        3000,
    )
    api.fake.subscription_active = False
    for action in ("unlock_event_visitors", "unlock_event_full_access"):
        data = _precheck(api, action, event_id="1")
        assert (data["allowed"], data["reason_code"], data["credits"]) == (False, "forbidden", 0)
    assert (api.total, api.fake.charges) == (2990, 0)  # never charges


def test_precheck_errors(api: Api) -> None:
    for body in (
        {},
        {"action_type": "", "params": {}},
        {"action_type": "x"},
        {"action_type": "x", "params": {}, "extra": 1},
    ):
        api.error("POST", PRECHECK, 400, "INVALID_REQUEST", body)
    data = api.call("POST", PRECHECK, 401, "ApiError", {"action_type": "x", "params": {}}, key=None)
    assert data["errorKey"] == "INVALID_API_KEY"


# -- overlapping credit operations, rate limits, unknown routes ------------------------------


def test_overlapping_paid_calls_conflict(api: Api) -> None:
    first: list[httpx.Response] = []
    api.fake.add_event("4", unlocked=True)  # its visitors unlock would charge
    with api.fake.hold_paid_calls():
        thread = threading.Thread(
            target=lambda: first.append(
                api.http.post(
                    "/external/events/1/unlock", headers={"Authorization": f"Bearer {KEY}"}
                )
            )
        )
        thread.start()
        assert api.fake.wait_for_paid_call()
        api.error("POST", "/external/events/2/unlock", 409, "STATE_CONFLICT")
        api.error("POST", visitors("4"), 409, "STATE_CONFLICT")
        api.error("POST", full_access("5"), 409, "STATE_CONFLICT")
        api.error("POST", CONTACTS, 409, "STATE_CONFLICT", {"personnel_ids": ["1"]})
        api.error("POST", PHONES, 409, "STATE_CONFLICT", {"personnel_ids": ["1"]})
        api.error("POST", SEARCHES[1][0], 409, "STATE_CONFLICT", {"company_name": "A"})
        busy = api.post(SEARCHES[0][0], 200, "ConcurrencyLimitBusinessError", {"company_name": "A"})
        assert busy["errorKey"] == "USER_CONCURRENCY_LIMIT_EXCEEDED"
        data = _precheck(api, "unlock_event_contacts", event_id="3")
        assert (data["allowed"], data["reason_code"]) == (False, "state_conflict")
        # Free answers are not credit operations.
        api.get(BALANCE, 200, "CreditBalance@0.22")
        assert api.total == 30050  # the held call has not charged yet
    thread.join()
    assert first[0].status_code == 201
    conforms("EventUnlockResult", first[0].json())
    assert not api.fake.paid_call_in_progress
    assert api.total == 28050
    api.post("/external/events/2/unlock", 201, "EventUnlockResult")
    assert api.fake.unlocked_visitors == set()  # the refused calls changed nothing


def test_rate_limit(make: Callable[..., Api]) -> None:
    api = make(rate_limit=2, rate_limit_window=3600)
    response = api.http.get(BALANCE, headers={"Authorization": f"Bearer {KEY}"})
    assert response.headers["x-ratelimit-limit"] == "2"
    assert response.headers["x-ratelimit-remaining"] == "1"
    assert int(response.headers["x-ratelimit-reset"]) > 0
    api.post("/external/events/1/unlock", 201, "EventUnlockResult")
    for method, path in (("GET", BALANCE), ("POST", "/external/events/2/unlock")):
        api.error(method, path, 429, "RATE_LIMIT_EXCEEDED")
    response = api.http.post(PRECHECK, json={}, headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 429
    assert int(response.headers["retry-after"]) >= 1
    assert response.headers["x-ratelimit-remaining"] == "0"
    assert api.total == 28050


def test_unknown_routes_are_not_found(api: Api) -> None:
    api.error("GET", "/external/events/1/unlock", 404, "NOT_FOUND")
    api.error("POST", "/external/nothing-here", 404, "NOT_FOUND")
    api.error("GET", "/external/contacts/unlock", 404, "NOT_FOUND")
    api.error("GET", visitors("1"), 404, "NOT_FOUND")
    api.error("POST", "/external/contacts/unlock-phone-tasks/1", 404, "NOT_FOUND")
    api.error("POST", "/external/events/1/visitors/unlock/more", 404, "NOT_FOUND")


def test_every_schema_is_exercised() -> None:
    """Each schema the sandbox answers with is validated by a test above."""
    source = Path(__file__).read_text(encoding="utf-8")
    for name in (
        "ApiError",
        "CreditBalance",
        "EventUnlockResult",
        "EventVisitorUnlockResult",
        "EventFullAccessUnlockResult",
        "FeatureUnavailableBusinessError",
        "ContactUnlockSubmission",
        "ContactUnlockTask",
        "PhoneUnlockRequest",
        "PhoneUnlockTask",
        "ActionPrecheckResponse",
        "ConcurrencyLimitBusinessError",
        "EventReverseSearchPage",
        "ExhibitorPage",
    ):
        assert f'"{name}"' in source
        assert name in SCHEMAS


def test_the_schemas_name_their_source() -> None:
    assert DOCUMENT["version"] == "0.27.0"
    assert "0.27.0" in DOCUMENT["note"]


# -- in-process async clients (asyncio and trio) -------------------------------------------


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.anyio
async def test_async_transport_conflict_and_release() -> None:
    fake = FakeLensmor(api_key=KEY)
    auth = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(transport=fake.transport, base_url="http://sandbox.test") as http:
        answers: list[httpx.Response] = []

        async def unlock(event_id: str) -> None:
            answers.append(await http.post(f"/external/events/{event_id}/unlock", headers=auth))

        async with anyio.create_task_group() as tg:
            with fake.hold_paid_calls():
                tg.start_soon(unlock, "1")
                assert await anyio.to_thread.run_sync(fake.wait_for_paid_call)
                await unlock("2")
                assert [a.status_code for a in answers] == [409]
                conforms("ApiError", answers[0].json())
            # Leaving the hold lets the first call finish; the task group waits for it.
        assert [a.status_code for a in answers] == [409, 201]
    assert fake.balance.total_balance == 28050


def test_reference_lists_the_paid_endpoints() -> None:
    text = (ROOT / "docs" / "reference.md").read_text(encoding="utf-8")
    _, _, section = text.partition("\n### The sandbox's Lensmor endpoints\n")
    section = re.split(r"^#{1,3} ", section, maxsplit=1, flags=re.MULTILINE)[0]
    rows = re.findall(r"^\| `(GET|POST) (/[\w/{}-]+)[?`]", section, flags=re.MULTILINE)
    assert {path for _, path in rows} == {
        "/external/events/{id}/unlock",
        "/external/events/{id}/visitors/unlock",
        "/external/events/{id}/full-access/unlock",
        "/external/contacts/unlock",
        "/external/contacts/unlock-phone",
        "/external/contacts/unlock-tasks/{taskId}",
        "/external/exhibitors/search-events",
        "/external/exhibitors/search-by-company-name",
        "/external/actions/precheck",
        "/sandbox/spend-outside",
    }
    fake = FakeLensmor()
    with httpx.Client(transport=fake.transport, base_url="http://sandbox.test") as http:
        for method, path in rows:
            path = path.replace("{id}", "1").replace("{taskId}", "1")
            answer = http.request(method, path, headers={"Authorization": "Bearer test-key"})
            assert answer.status_code != 404 or "unlock-tasks" in path, (method, path)


def test_the_validators_bite(api: Api) -> None:
    """A body that is not what Lensmor publishes fails: the checks above can fail."""
    api.fake.fail_next("wrong-types")
    response = api.http.get(BALANCE, headers={"Authorization": f"Bearer {KEY}"})
    assert list(VALIDATORS["CreditBalance@0.22"].iter_errors(response.json()))
    assert list(VALIDATORS["ContactUnlockSubmission"].iter_errors({"status": "accepted"}))
    assert list(VALIDATORS["ApiError"].iter_errors({"message": "Unauthorized"}))
