"""The engine a guard's flows run over (one account's state, the guard's settings, the
credits service for one key), and ``Upstream``: what the flows need of that service
(``creditguard.lensmor`` implements it over httpx)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Literal, Protocol

from creditguard.core.events import GuardEvent
from creditguard.core.models import CreditBalance, Report
from creditguard.core.roles import AccountState
from creditguard.core.spending import Policy
from creditguard.core.steps import Call

__all__ = ["Engine", "OnUnavailable", "Settings", "Upstream"]

OnUnavailable = Literal["deny", "allow"]


class Upstream(Protocol):
    """The credits service, for one API key."""

    def read(self, account: str) -> tuple[CreditBalance, float | None]:
        """Read the balance (retried within the read budget): the balance, and how long
        the service's rate limit is used up for (``None``: it is not)."""
        ...

    async def aread(self, account: str) -> tuple[CreditBalance, float | None]:
        """Async :meth:`read`."""
        ...

    def precheck(self, action_type: str, params: Mapping[str, Any]) -> Call:
        """The request asking what ``action_type`` would charge (its result a
        ``PrecheckResult``)."""
        ...

    def report(self, result: object) -> Report | None:
        """What a paid call's answer says about credits (``None``: nothing); raises
        ``InvalidResponse`` when it says it in a shape that cannot be trusted."""
        ...

    def refused_for_credits(self, exc: BaseException) -> bool:
        """Whether a paid call failed because the service refused it for want of
        credits."""
        ...


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    """A guard's configuration, shared by every view of it (see ``CreditGuard``)."""

    base_url: str
    ttl: float
    admission_timeout: float
    on_unavailable: OnUnavailable
    on_event: Callable[[GuardEvent], None] | None
    max_concurrent: int | None
    gate_timeout: float
    read_budget: float
    """The longest one balance read can take: a caller waiting for someone else's read
    waits no longer than that."""
    policy: Policy = dataclasses.field(default_factory=lambda: Policy(0, None))
    """The spending policy: the floor, the allowances, the low-balance watchers."""


class Engine:
    """What one guard view's flows run over: its account's state, the settings, and the
    credits service for its key."""

    __slots__ = ("account", "settings", "upstream")

    def __init__(self, account: AccountState, settings: Settings, upstream: Upstream) -> None:
        self.account = account
        self.settings = settings
        self.upstream = upstream

    def __repr__(self) -> str:
        return f"<Engine account={self.account.fingerprint}>"
