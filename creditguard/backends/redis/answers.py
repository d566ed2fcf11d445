"""What the scripts of :mod:`.scripts` answer, decoded: one type per kind of answer, and
the functions that turn a script's raw reply (bytes or str, as the client decodes) into
them."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, NamedTuple

__all__ = [
    "AdmitResult",
    "Admitted",
    "Busy",
    "ReadBegun",
    "ReadNeeded",
    "Refused",
    "Snapshot",
    "Survey",
    "WaitNeeded",
]


class ReadNeeded(NamedTuple):
    """No trusted balance to decide on (or finished spends must settle first): perform or
    join a balance read that starts at ``seq >= after``, then admit again."""

    kind: Literal["read"]
    after: int


class Admitted(NamedTuple):
    """Reserved: ``balance`` (JSON) is what it was admitted on, or ``None`` when that is
    the balance the caller named as known; ``gen`` its cache generation (pass it to
    :meth:`RedisAccountState.settle_alone`); ``tag`` names it (``cache_id:cache_gen``;
    ``""``: unnamed), to pass as ``known`` to the next admission."""

    kind: Literal["ok"]
    balance: str | None
    gen: int
    tag: str

    @property
    def warned(self) -> bool:
        """Whether it took its subject's allowance window past the warning level, first
        of all (see :class:`WarnedAdmitted`)."""
        return False


class WarnedAdmitted(Admitted):
    """:class:`Admitted`, and the first admission to take its subject's allowance window
    past the allowance's warning level."""

    __slots__ = ()

    @property
    def warned(self) -> bool:
        return True


class WaitNeeded(NamedTuple):
    """The cost does not fit beside the calls in flight, but would if they charged
    nothing: wait for one to settle, then admit again. ``held``: the credits of the open
    holds; ``own``: those of the caller's own enclosing spends."""

    kind: Literal["wait"]
    held: int
    own: int


class Refused(NamedTuple):
    """The account cannot pay even if every other call in flight charges nothing: raise
    ``InsufficientCredits`` with these (``available``: the balance less the open holds
    and the caller's own enclosing spends)."""

    kind: Literal["refuse"]
    available: int
    reserved: int
    balance: str


class OverAllowance(NamedTuple):
    """The subject's window cannot take the cost even if its calls in flight charge
    nothing: raise ``AllowanceExceeded`` (``spent`` and ``reserved``: the window's)."""

    kind: Literal["allowance"]
    spent: int
    reserved: int


class Busy(NamedTuple):
    """Only calls in flight stand in the way, and the caller may not wait: raise
    ``AdmissionTimeout`` with these (``available``: the balance less ``reserved``)."""

    kind: Literal["busy"]
    available: int
    reserved: int


AdmitResult = ReadNeeded | Admitted | WaitNeeded | Refused | Busy | OverAllowance


class Survey(NamedTuple):
    """What the account holds (``RedisAccountState.survey``): the balance when it is
    trusted (JSON), the credits and count of the calls in flight (holds not included),
    of the open holds, the finished spends waiting for a read, the callers queued at the
    gate, and each open hold as (id, cost, expiry in Unix ms)."""

    balance: str | None
    reserved: int
    in_flight: int
    held: int
    holds: int
    settling: int
    gate_waiting: int
    open_holds: tuple[tuple[str, int, int], ...]


class ReadBegun(NamedTuple):
    """``lead``: the caller holds the flight and performs the read, which starts at
    ``start_seq``. Otherwise another caller leads a read that started at ``start_seq``."""

    lead: bool
    start_seq: int


@dataclasses.dataclass(frozen=True, slots=True)
class Snapshot:
    """The state of the account at one instant (server time)."""

    balance: str | None  # the cached balance (JSON), or None
    cached_seq: int
    age_ms: int | None  # how long ago the cached balance was read; None: none cached
    floor: int
    seq: int
    reserved: int
    inflight: int
    settling: int  # finished spends waiting for a read
    settling_after: int  # the seq a read must start at to settle them all (0: none)
    flight: bool  # a read is in progress (its leader holds the flight)
    cache_gen: int


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _int(value: object) -> int:
    if isinstance(value, int):
        return value
    return int(_text(value))


def _admit_result(raw: Any, known: str) -> AdmitResult:
    if type(raw) is int:  # admitted on the balance the caller knows: its generation
        return Admitted("ok", None, raw, known)
    kind = _text(raw[0])
    if kind == "ok":
        kind_of = WarnedAdmitted if len(raw) > 4 and _int(raw[4]) == 1 else Admitted
        return kind_of("ok", _text(raw[1]), _int(raw[2]), _text(raw[3]))
    if kind == "read":
        return ReadNeeded("read", _int(raw[1]))
    if kind == "wait":
        return WaitNeeded("wait", _int(raw[1]), _int(raw[2]))
    if kind == "refuse":
        return Refused("refuse", _int(raw[1]), _int(raw[2]), _text(raw[3]))
    if kind == "busy":
        return Busy("busy", _int(raw[1]), _int(raw[2]))
    if kind == "allowance":
        return OverAllowance("allowance", _int(raw[1]), _int(raw[2]))
    raise AssertionError(f"unexpected admit answer {kind!r}")


def _read_begun(raw: Any) -> ReadBegun:
    return ReadBegun(_int(raw[0]) == 1, _int(raw[1]))


def _survey(raw: Any) -> Survey:
    trusted, text = _int(raw[0]) == 1, _text(raw[1])
    reserved, in_flight, held, holds, settling, waiting = (_int(v) for v in raw[2:8])
    rest = raw[8:]
    open_holds = tuple(
        (_text(rest[i]), _int(rest[i + 1]), _int(rest[i + 2])) for i in range(0, len(rest), 3)
    )
    balance = text if trusted else None
    return Survey(balance, reserved, in_flight, held, holds, settling, waiting, open_holds)


def _snapshot(raw: Any) -> Snapshot:
    has = _int(raw[0]) == 1
    cseq, age, floor, seq, reserved, inflight, settling, after, flight, gen = map(_int, raw[2:])
    balance = _text(raw[1]) if has else None
    age_ms = age if has else None
    return Snapshot(
        balance, cseq, age_ms, floor, seq, reserved, inflight, settling, after, flight == 1, gen
    )


def _blocked(raw: Any) -> int | None:
    left = _int(raw)
    return left if left > 0 else None
