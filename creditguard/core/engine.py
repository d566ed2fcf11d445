"""What every view of one guard shares (``_Shared``: configuration, HTTP clients, state
backend) and what it tells observers (``GuardEvent``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal

from creditguard.core.models import CreditBalance
from creditguard.core.roles import StateBackend
from creditguard.lensmor.client import AsyncBalanceClient, BalanceClient
from creditguard.lensmor.reader import _Reader

__all__ = ["GuardEvent", "OnUnavailable", "_Shared"]

OnUnavailable = Literal["deny", "allow"]


@dataclasses.dataclass(frozen=True, slots=True)
class GuardEvent:
    """What the guard just did, for ``on_event`` observers.

    ``kind`` is one of ``"admitted"``, ``"denied"`` (not enough credits), ``"busy"``
    (calls in flight did not settle within ``admission_timeout``), ``"unavailable"``
    (refused because the balance could not be read, failing closed), ``"rejected"`` (the key
    was refused), ``"unchecked"`` (admitted without a balance under
    ``on_unavailable="allow"``), ``"spent"`` (with the balance before and after),
    ``"failed"`` (the action raised), ``"cancelled"`` (cancelled in the action or in the
    refresh after it), ``"refresh_failed"`` and ``"released"`` (a hold ended with nothing
    charged). ``account`` is the account's fingerprint,
    never the key. ``charged`` (on ``"spent"``) is what the call cost, when its paid call
    reported it.
    """

    kind: str
    account: str
    cost: int
    balance_before: CreditBalance | None = None
    balance_after: CreditBalance | None = None
    available: int | None = None
    error: BaseException | None = None
    charged: int | None = None


class _Shared:
    """What every view of one guard shares: configuration, HTTP clients, state backend."""

    __slots__ = (
        "aclient",
        "admission_timeout",
        "backend",
        "base_url",
        "client",
        "gate_timeout",
        "max_concurrent",
        "on_event",
        "on_unavailable",
        "read_budget",
        "reader",
        "ttl",
    )

    def __init__(
        self,
        *,
        base_url: str,
        ttl: float,
        admission_timeout: float,
        on_unavailable: OnUnavailable,
        on_event: Callable[[GuardEvent], None] | None,
        backend: StateBackend,
        reader: _Reader,
        client: BalanceClient,
        aclient: AsyncBalanceClient,
        max_concurrent: int | None = None,
        gate_timeout: float = 30.0,
    ) -> None:
        self.base_url = base_url
        self.max_concurrent = max_concurrent
        self.gate_timeout = gate_timeout
        self.reader = reader
        self.ttl = ttl
        self.admission_timeout = admission_timeout
        # The longest one balance read can take (its retry deadline plus one request
        # timeout): a caller waiting for someone else's read waits no longer than that.
        phases = [t for t in reader.timeout.as_dict().values() if t is not None]
        self.read_budget = reader.policy.deadline + (max(phases) if phases else 0.0)
        self.on_unavailable = on_unavailable
        self.on_event = on_event
        self.backend = backend
        self.client = client
        self.aclient = aclient
