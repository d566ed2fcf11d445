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
from typing import TYPE_CHECKING, Any, NamedTuple

from creditguard.backends.redis.scripts import (
    aevalsha,
    eval_head,
    evalsha,
    lua_sections,
    sha_of,
)
from creditguard.backends.redis.side import duration_ms

if TYPE_CHECKING:
    from creditguard.backends.redis.clients import AsyncClient, SyncClient

__all__ = ["HoldInfo", "RedisGate"]

_SECTIONS = lua_sections("gate.lua")
_SCRIPTS: dict[str, str] = {
    name: _SECTIONS["_now"][1] + text
    for name, (_, text) in _SECTIONS.items()
    if not name.startswith("_")
}
_SHAS = {name: sha_of(text) for name, text in _SCRIPTS.items()}


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

    __slots__ = ("_async", "_base", "_sync", "gate_keys")

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

    def _enter_args(self, token: str, limit: int, lease_ms: int, alive_ms: int) -> list[str | int]:
        if type(limit) is not int or not 1 <= limit <= 2**31:
            raise ValueError(f"limit must be an int from 1 to 2**31, got {limit!r}")
        lease_ms = duration_ms("lease_ms", lease_ms)
        return [_token("token", token), limit, lease_ms, duration_ms("alive_ms", alive_ms)]

    def enter(self, token: str, limit: int, lease_ms: int, alive_ms: int) -> int:
        """Take a turn (0), or stand in the queue: the caller's ticket (ask again within
        ``alive_ms``; the lowest ticket is next)."""
        args = self._enter_args(token, limit, lease_ms, alive_ms)
        return int(self._run("enter", self.gate_keys, args))

    async def aenter(self, token: str, limit: int, lease_ms: int, alive_ms: int) -> int:
        args = self._enter_args(token, limit, lease_ms, alive_ms)
        return int(await self._arun("enter", self.gate_keys, args))

    def leave(self, token: str) -> None:
        """Give the turn back, or leave the queue."""
        self._run("leave", self.gate_keys[:3], [_token("token", token)])

    async def aleave(self, token: str) -> None:
        await self._arun("leave", self.gate_keys[:3], [_token("token", token)])

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
