"""The gate (``max_concurrent``) and the holds of one account in Redis: Lua scripts, each
one atomic step, with a sync method (``redis.Redis``) and an async twin
(``redis.asyncio``, named with a leading ``a``) per operation. No waiting here: a caller
that has no turn yet asks again (see :mod:`.holds`).

Keys (every one carries the account's fingerprint ``F`` as the hash tag, as in
``scripts``):

* ``<prefix>{F}:gate``   sorted set: turn token -> expiry (ms): the turns taken. A turn
  is a lease: the process that has it renews it; a hold's turn lives as long as the hold.
* ``<prefix>{F}:queue``  sorted set: turn token -> ticket: the callers waiting, in order.
* ``<prefix>{F}:alive``  sorted set: turn token -> expiry (ms) of a waiter's last look; a
  waiter that stopped looking (its process died) leaves the queue when it passes.
* ``<prefix>{F}:ticket`` counter: the next ticket.
* ``<prefix>{F}:hold:<id>`` hash, one per open hold (its record in ``res`` ends in ``:h``):
  ``cost``, ``gen``, ``balance`` (the balance it was admitted on, as
  ``scripts.encode_balance`` writes it, or ``""``),
  ``turn`` (its gate turn, or ``""``). The hold's reservation is the reservation ``<id>``
  of ``scripts`` (in ``res`` and ``lease``), its lease set to the hold's expiry; the
  key expires soon after it.

Time is the server's (``TIME``, ms).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, cast

from creditguard.backends.redis.scripts import (
    SCRIPTS,
    SHAS,
    aevalsha,
    eval_head,
    evalsha,
    lua_sections,
    sha_of,
)
from creditguard.backends.redis.side import duration_ms

if TYPE_CHECKING:
    from creditguard.backends.redis.clients import AsyncClient, SyncClient

__all__ = ["CHECK_FIRST", "Entered", "HoldInfo", "RedisGate", "Unpayable"]

_SECTIONS = lua_sections("gate.lua")
_STATE = lua_sections("state.lua")
_PRELUDES = {"": _SECTIONS["_now"][1], "state": _STATE["_keys"][1] + _STATE["_head"][1]}
_SCRIPTS: dict[str, str] = {
    name: _PRELUDES[words[0] if words else ""] + text
    for name, (words, text) in _SECTIONS.items()
    if not name.startswith("_")
}
_SHAS = {name: sha_of(text) for name, text in _SCRIPTS.items()}


class Entered(NamedTuple):
    """What a look at the gate answered (:meth:`RedisGate.enter_admit`): ``ticket`` 0 when
    the turn is the caller's, else its place in the queue; with the turn, ``gen`` (not
    ``None``) when the call was admitted too, on the balance named ``tag`` (``balance``
    its JSON, ``None`` when it is the one the caller named as known)."""

    ticket: int
    gen: int | None = None
    tag: str = ""
    balance: str | None = None


class Unpayable(NamedTuple):
    """The account cannot pay the caller, new at the gate, even if every call in flight
    charged nothing: ``available`` (the balance less the open holds and the caller's own
    reservations), ``held`` and the cached ``balance`` (JSON). Not queued."""

    available: int
    held: int
    balance: str


CHECK_FIRST = "check"  # no trusted, fresh balance to tell whether it can pay: read first


def _entered(answer: Any) -> Entered | Unpayable | str:
    kind = _text(answer[0])
    if kind == "queued":
        return Entered(int(answer[1]))
    if kind == "turn":
        if len(answer) == 1:
            return Entered(0)
        if len(answer) == 2:
            return Entered(0, int(answer[1]))
        return Entered(0, int(answer[1]), _text(answer[2]), _text(answer[3]))
    if kind == "refuse":
        return Unpayable(int(answer[1]), int(answer[2]), _text(answer[3]))
    return CHECK_FIRST


class HoldInfo(NamedTuple):
    """An open hold as Redis has it: ``balance`` as stored (``""``: none), ``expires_ms``
    the Unix time (ms) it expires at."""

    cost: int
    gen: int
    balance: str
    expires_ms: int


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _info(answer: Any) -> HoldInfo | None:
    if not answer:
        return None
    cost, gen, balance, due = answer
    return HoldInfo(int(cost), int(gen), _text(balance), int(due))


def _token(name: str, value: str) -> str:
    if not isinstance(value, str) or not value or not value.isascii() or not value.isalnum():
        raise ValueError(f"{name} must be a non-empty ASCII alphanumeric str, got {value!r}")
    return value


class RedisGate:
    """The gate and holds of one account in Redis; every method is one script call (or
    one command). ``client`` serves the sync methods, ``async_client`` their async twins;
    either may be ``None`` when that side is unused."""

    __slots__ = ("_async", "_base", "_sync", "enter_keys", "gate_keys")

    def __init__(
        self,
        client: SyncClient | None,
        async_client: AsyncClient | None,
        prefix: str,
        fingerprint: str,
    ) -> None:
        self._sync = client
        self._async = async_client
        self._base = f"{prefix}{{{fingerprint}}}:"
        base = self._base
        self.gate_keys = (base + "gate", base + "queue", base + "alive", base + "ticket")
        state = (base + "state", base + "res", base + "lease", base + "flight")
        self.enter_keys = (*state, *self.gate_keys)

    def _hold_keys(self, hold_id: str) -> list[str]:
        base = self._base
        return [base + "res", base + "lease", base + "hold:" + _token("hold_id", hold_id)]

    def _run(self, name: str, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        if self._sync is None:
            raise RuntimeError("this RedisGate has no sync client")
        return evalsha(self._sync, eval_head(_SHAS[name], tuple(keys)), _SCRIPTS[name], args)

    async def _arun(self, name: str, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        if self._async is None:
            raise RuntimeError("this RedisGate has no async client")
        head = eval_head(_SHAS[name], tuple(keys))
        return await aevalsha(self._async, head, _SCRIPTS[name], args)

    # -- the gate ----------------------------------------------------------------------

    def _enter_args(
        self,
        token: str,
        limit: int,
        lease_ms: int,
        alive_ms: int,
        check: bool = False,
        cost: int = 0,
        ttl_ms: int = 0,
        res_id: str = "",
        known: str = "",
        finished: Sequence[str] = (),
        own_ids: Sequence[str] = (),
    ) -> list[str | int]:
        if type(limit) is not int or not 1 <= limit <= 2**31:
            raise ValueError(f"limit must be an int from 1 to 2**31, got {limit!r}")
        for name, value in (("cost", cost), ("ttl_ms", ttl_ms)):
            if type(value) is not int or not 0 <= value <= 2**53:
                raise ValueError(f"{name} must be an int from 0 to 2**53, got {value!r}")
        lease_ms = duration_ms("lease_ms", lease_ms)
        alive_ms = duration_ms("alive_ms", alive_ms)
        rid = _token("res_id", res_id) if res_id else "-"
        names = [*finished, *own_ids, *([known] if known else [])]
        if any(not n or n.split() != [n] or "," in n for n in names):
            raise ValueError(f"reservation ids and tags must be words, got {names!r}")
        call = (
            f"{_token('token', token)} {limit} {lease_ms} {alive_ms} {int(check)} {cost}"
            f" {ttl_ms} {rid} {known} {','.join(finished)}"
        )
        return [call, *own_ids]

    def enter(self, token: str, limit: int, lease_ms: int, alive_ms: int) -> int:
        """Take a turn (0), or stand in the queue: the caller's ticket (ask again within
        ``alive_ms``; the lowest ticket is next)."""
        args = self._enter_args(token, limit, lease_ms, alive_ms)
        return cast(Entered, _entered(self._run("enter", self.enter_keys, args))).ticket

    async def aenter(self, token: str, limit: int, lease_ms: int, alive_ms: int) -> int:
        args = self._enter_args(token, limit, lease_ms, alive_ms)
        answer = _entered(await self._arun("enter", self.enter_keys, args))
        return cast(Entered, answer).ticket

    def enter_admit(self, *args: Any) -> Entered | Unpayable | str:
        """:meth:`enter`, deciding more in the same script: with ``check``, refuse a
        caller new at the gate that the account cannot pay (:class:`Unpayable`; not
        queued), or answer :data:`CHECK_FIRST` when that takes a read; with ``res_id``,
        admit the caller granted its turn when the cached balance covers ``cost`` beside
        every reservation. Arguments: ``token, limit, lease_ms, alive_ms, check, cost,
        ttl_ms, res_id, known, finished, own_ids`` (see gate.lua's ``enter``)."""
        return _entered(self._run("enter", self.enter_keys, self._enter_args(*args)))

    async def aenter_admit(self, *args: Any) -> Entered | Unpayable | str:
        answer = await self._arun("enter", self.enter_keys, self._enter_args(*args))
        return _entered(answer)

    def leave(
        self, token: str, limit: int = 0, lease_ms: int = 60_000, waiting: Sequence[str] = ()
    ) -> str:
        """Give the turn back, or leave the queue. A turn given back goes, if fewer than
        ``limit`` are taken (0: never), to the first caller queued that still looks: the
        token it went to (``""``: none), leased for ``lease_ms`` when it is one of
        ``waiting`` (callers of this process: told at once), else until its next look,
        when it takes it."""
        args = self._leave_args(token, limit, lease_ms, waiting)
        return _text(self._run("leave", self.gate_keys[:3], args))

    async def aleave(
        self, token: str, limit: int = 0, lease_ms: int = 60_000, waiting: Sequence[str] = ()
    ) -> str:
        args = self._leave_args(token, limit, lease_ms, waiting)
        return _text(await self._arun("leave", self.gate_keys[:3], args))

    def undo_enter(self, token: str, res_id: str) -> None:
        """Undo an :meth:`enter_admit` whose caller was gone before it saw the answer:
        release the reservation ``res_id`` (``""``: none) and give the turn back."""
        if res_id:
            assert self._sync is not None
            head = eval_head(SHAS["release"], self.enter_keys[:4])
            evalsha(self._sync, head, SCRIPTS["release"], [res_id, "0"])
        self.leave(token)

    async def aundo_enter(self, token: str, res_id: str) -> None:
        if res_id:
            assert self._async is not None
            head = eval_head(SHAS["release"], self.enter_keys[:4])
            await aevalsha(self._async, head, SCRIPTS["release"], [res_id, "0"])
        await self.aleave(token)

    def _leave_args(
        self, token: str, limit: int, lease_ms: int, waiting: Sequence[str]
    ) -> list[str | int]:
        if type(limit) is not int or not 0 <= limit <= 2**31:
            raise ValueError(f"limit must be an int from 0 to 2**31, got {limit!r}")
        return [
            _token("token", token),
            limit,
            duration_ms("lease_ms", lease_ms),
            *(_token("token", t) for t in waiting),
        ]

    def renew_turns(self, tokens: Sequence[str], lease_ms: int) -> list[str]:
        """Renew the turns ``tokens`` of this process (never shortening one), taking
        again those Redis lost; returns the tokens taken again."""
        args: list[str | int] = [
            duration_ms("lease_ms", lease_ms),
            *(_token("token", t) for t in tokens),
        ]
        return [_text(t) for t in self._run("renew_turns", self.gate_keys, args)]

    def queued(self) -> int:
        """How many callers wait in the queue."""
        assert self._sync is not None
        return int(self._sync.zcard(self.gate_keys[1]))

    # -- holds -------------------------------------------------------------------------

    def _keep_args(
        self, hold_id: str, expires_ms: int, cost: int, gen: int, balance: str, turn: str
    ) -> tuple[list[str], list[str | int]]:
        keys = [*self._hold_keys(hold_id), self.gate_keys[0], self._base + "state"]
        args: list[str | int] = [
            hold_id,
            duration_ms("expires_ms", expires_ms),
            cost,
            gen,
            balance,
            turn and _token("turn", turn),
        ]
        return keys, args

    def keep(
        self, hold_id: str, expires_ms: int, cost: int, gen: int, balance: str, turn: str
    ) -> int | None:
        """Keep reservation ``hold_id`` open as a hold for ``expires_ms``; its expiry (Unix
        ms), or ``None`` when the reservation is gone."""
        keys, args = self._keep_args(hold_id, expires_ms, cost, gen, balance, turn)
        due = self._run("keep", keys, args)
        return None if due is None else int(due)

    async def akeep(
        self, hold_id: str, expires_ms: int, cost: int, gen: int, balance: str, turn: str
    ) -> int | None:
        keys, args = self._keep_args(hold_id, expires_ms, cost, gen, balance, turn)
        due = await self._arun("keep", keys, args)
        return None if due is None else int(due)

    def hold(self, hold_id: str, claim: bool, lease_ms: int) -> HoldInfo | None:
        """The open hold ``hold_id`` (ending it, with ``claim``), or ``None``."""
        keys = [*self._hold_keys(hold_id), self.gate_keys[0]]
        args: list[str | int] = [hold_id, int(claim), duration_ms("lease_ms", lease_ms)]
        return _info(self._run("hold", keys, args))

    async def ahold(self, hold_id: str, claim: bool, lease_ms: int) -> HoldInfo | None:
        keys = [*self._hold_keys(hold_id), self.gate_keys[0]]
        args: list[str | int] = [hold_id, int(claim), duration_ms("lease_ms", lease_ms)]
        return _info(await self._arun("hold", keys, args))
