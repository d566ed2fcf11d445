"""What the sandbox's parts share about paid calls and serving, below all of them: the
sandbox as the paid endpoints see it (:class:`Sandbox`) and as its transports see it
(:class:`Served`), a route to an endpoint, and the paid call held while it charges
(:class:`_Pending`, with what it sees of the paid endpoints, :class:`PaidCalls`).

The protocols are what :class:`~._fake.FakeLensmor` and :class:`~._lensmor._PaidApi`
provide; naming them here lets each module import only the modules below it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Literal, NamedTuple, Protocol

import anyio
import anyio.to_thread

from creditguard.testing._wire import BalanceShape, Credits, RateLimit, _Answer

__all__ = [
    "HOLD_CAP",
    "Handler",
    "PaidCalls",
    "Sandbox",
    "Served",
    "_Pending",
    "_Route",
]

HOLD_CAP = 60.0  # seconds a held paid call waits at most, should a test never release it


class Sandbox(Protocol):
    """What the paid endpoints use of the sandbox (:class:`~._fake.FakeLensmor`): its lock,
    its credits, its rate limit and key, how it writes numbers, and the charge counter."""

    charges: int

    @property
    def _lock(self) -> threading.Lock: ...

    @property
    def _credits(self) -> Credits: ...

    @property
    def _rate_limit(self) -> RateLimit: ...

    @property
    def latency(self) -> float: ...

    @property
    def balance_shape(self) -> BalanceShape: ...

    @property
    def floats(self) -> bool: ...

    @property
    def full_access_balance_after(self) -> Literal["object", "number"]: ...

    def _authorized(self, authorization: str | None, *, strict: bool = True) -> bool: ...


class Served(Protocol):
    """What the httpx transport and the ASGI app use of the sandbox: its answer to a
    request, and the delays it acts out."""

    @property
    def latency(self) -> float: ...

    @property
    def stall_seconds(self) -> float: ...

    def _serves_paid(self, path: str) -> bool: ...

    def _answer(
        self, method: str, path: str, query: str, authorization: str | None, body: bytes = b""
    ) -> _Answer | _Pending: ...


class PaidCalls(Protocol):
    """What a held paid call uses of the paid endpoints (:class:`~._lensmor._PaidApi`):
    the call in progress, the gate of ``hold_paid_calls`` and the sandbox."""

    busy: _Pending | None
    gate: threading.Event | None

    @property
    def fake(self) -> Sandbox: ...


Handler = Callable[[dict[str, Any], str, dict[str, str]], "_Answer | _Pending"]
"""An endpoint: of the request's JSON body, its trace id and the headers to send, the
answer (or the paid call to hold, :class:`_Pending`)."""


class _Route(NamedTuple):
    """What answers a request: its handler, and whether it reads a JSON body."""

    handler: Handler
    body: bool = True


class _Pending:
    """A paid call that will charge: it holds the key's credit operation until it is
    finished (charged and answered) or abandoned (its caller went away: nothing charged)."""

    def __init__(self, api: PaidCalls, work: Callable[[], _Answer], headers: dict[str, str]):
        self._api = api
        self._work = work
        self._headers = headers
        self._gate = api.gate
        self._done = False

    def wait(self) -> None:
        latency = self._api.fake.latency
        if latency:
            time.sleep(latency)
        if self._gate is not None:
            self._gate.wait(HOLD_CAP)

    async def await_(self) -> None:
        latency = self._api.fake.latency
        if latency:
            await anyio.sleep(latency)
        gate = self._gate
        if gate is not None and not gate.is_set():
            await anyio.to_thread.run_sync(gate.wait, HOLD_CAP, abandon_on_cancel=True)

    def finish(self) -> _Answer:
        with self._api.fake._lock:
            try:
                answer = self._work()
            finally:
                self._release()
        answer.headers.update(self._headers)
        return answer

    def close(self) -> None:
        if not self._done:
            with self._api.fake._lock:
                self._release()

    def _release(self) -> None:
        self._done = True
        if self._api.busy is self:
            self._api.busy = None
