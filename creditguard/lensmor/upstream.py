"""Lensmor as the core's ``Upstream`` for one API key: balance reads and prechecks over
the guard's httpx clients, what a paid call reports, and whether a failure was Lensmor
refusing for want of credits. Also the requests the contact-unlock task helper sends."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx

from creditguard.core.engine import Engine
from creditguard.core.models import CreditBalance, PrecheckResult, Report
from creditguard.core.secret import Secret
from creditguard.core.steps import Call
from creditguard.lensmor.client import AsyncBalanceClient, BalanceClient
from creditguard.lensmor.reader import _Reader
from creditguard.lensmor.reports import is_insufficient_credits, parse_report, trace_of

__all__ = ["Lensmor", "lensmor_of"]


class Lensmor:
    """The credits service for one key, through clients shared by every view of a guard."""

    __slots__ = ("aclient", "client", "key", "reader")

    def __init__(
        self, reader: _Reader, client: BalanceClient, aclient: AsyncBalanceClient, key: Secret
    ) -> None:
        self.reader = reader
        self.client = client
        self.aclient = aclient
        self.key = key

    def __repr__(self) -> str:
        return f"<Lensmor base_url={self.reader.base_url!r}>"

    def for_key(self, key: Secret) -> Lensmor:
        """The same service and clients, for another key."""
        return Lensmor(self.reader, self.client, self.aclient, key)

    @property
    def reads_sync(self) -> bool:
        """Whether a balance read can be made from sync code (not over an async-only
        transport)."""
        return self.client.usable

    def read(self, account: str) -> tuple[CreditBalance, float | None]:
        return self.client.read(self.reader.request(account, self.key))

    async def aread(self, account: str) -> tuple[CreditBalance, float | None]:
        return await self.aclient.read(self.reader.request(account, self.key))

    def precheck_now(self, action_type: str, params: Mapping[str, Any]) -> PrecheckResult:
        """Ask what ``action_type`` would charge, from sync code (one request)."""
        request = self.reader.precheck_request(self.key, action_type, params)
        response, body = self.client.send(request)
        return self.reader.precheck_answer(response, body)

    async def aprecheck_now(self, action_type: str, params: Mapping[str, Any]) -> PrecheckResult:
        """Async :meth:`precheck_now`."""
        request = self.reader.precheck_request(self.key, action_type, params)
        response, body = await self.aclient.send(request)
        return self.reader.precheck_answer(response, body)

    def precheck(self, action_type: str, params: Mapping[str, Any]) -> Call:
        return Call(
            lambda: self.precheck_now(action_type, params),
            lambda: self.aprecheck_now(action_type, params),
        )

    def report(self, result: object) -> Report | None:
        return parse_report(result)

    def trace_of(self, outcome: object) -> str | None:
        # An answer that echoes the key: nothing of it is kept.
        return trace_of(outcome, self.key.reveal())

    def refused_for_credits(self, exc: BaseException) -> bool:
        """Only the action's own exception counts: an app that wraps Lensmor's refusal
        in an error of its own keeps its error."""
        return isinstance(exc, httpx.HTTPStatusError) and is_insufficient_credits(exc)

    def api_request(
        self, method: str, path: str, body: Mapping[str, Any] | None = None
    ) -> httpx.Request:
        """A request to Lensmor's API with this key."""
        return self.reader.api_request(self.key, method, path, body)

    def send(self, request: httpx.Request) -> Call:
        """Send ``request`` (its answer: the response and its body), from either driver."""
        return Call(lambda: self.client.send(request), lambda: self.aclient.send(request))


def lensmor_of(engine: Engine) -> Lensmor:
    """The Lensmor service an engine reads from (a guard's always is)."""
    upstream = engine.upstream
    if not isinstance(upstream, Lensmor):
        raise TypeError(f"this guard does not talk to Lensmor: {upstream!r}")
    return upstream
