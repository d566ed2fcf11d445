"""The shared state of one account in Redis: many processes, one account.

This mirrors the rules of :class:`creditguard._state.Account` (see docs/consistency.md)
for guards in several processes or machines that spend on the same account. Every change
of state is one Lua script, run atomically by Redis: nothing is read, decided on in
Python and written back. This layer does no waiting and no HTTP; it only exposes the
operations, each one script call, as a sync method (``redis.Redis``) and an async twin
(``redis.asyncio.Redis``, named with a leading ``a``) that share the script text and the
decoding of its answer.

Keys
----
Every key of the account with fingerprint ``F`` (a hash of base URL and API key, never
the key) carries the hash tag ``{F}``, so that all of them live in one Redis Cluster slot
and every script can name them all in ``KEYS``:

* ``<prefix>{F}:state``  hash: ``seq``, ``floor``, ``cached`` (the balance as the JSON of
  ``CreditBalance.to_api()``; absent when none), ``cached_total``, ``cached_seq``,
  ``cached_at`` (ms), ``cache_gen``, ``reserved``, ``inflight``, ``blocked_until`` (ms),
  ``flight_seq`` (the ``seq`` the read in progress started at);
* ``<prefix>{F}:res``    hash: reservation id -> ``"cost:gen:after"``;
* ``<prefix>{F}:lease``  sorted set: reservation id -> lease expiry (ms);
* ``<prefix>{F}:flight`` string: the token of the caller leading the read in progress
  (expires after the read budget).

Time inside scripts is the server's (``TIME``, in milliseconds), never a client's clock.

Leases
------
A reservation is leased for ``lease_ms``: a process that holds one for longer must
:meth:`~RedisAccountState.renew` it. Every operation first removes the reservations whose
lease expired (their process died, or lost Redis for longer than the lease) and, if there
were any, hard-invalidates: an expired lease is a spend whose outcome nobody knows.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from ._models import CreditBalance

if TYPE_CHECKING:
    import redis
    import redis.asyncio
    import redis.asyncio.cluster
    import redis.cluster
    from redis.commands.core import AsyncScript, Script

    SyncClient = redis.Redis | redis.cluster.RedisCluster
    AsyncClient = redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster

__all__ = [
    "DEFAULT_PREFIX",
    "AdmitResult",
    "Admitted",
    "ReadBegun",
    "ReadNeeded",
    "RedisAccountState",
    "Refused",
    "Snapshot",
    "WaitNeeded",
    "decode_balance",
    "encode_balance",
]

DEFAULT_PREFIX = "creditguard:"

# -- the scripts -------------------------------------------------------------------------
#
# Every script starts with _PRELUDE: it names the keys, reads the server's time and the
# numeric state fields into S, and defines the helpers. A script changes S (and sets
# ``dirty``) and ends with flush(), which writes S back in one HSET. Lua numbers are
# doubles: exact up to 2^53, far beyond any credit count, seq or millisecond time here;
# they are written with '%d' (tostring would switch to exponents past 14 digits).

_PRELUDE = """
local K_STATE, K_RES, K_LEASE, K_FLIGHT = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function fmt(n) return string.format('%d', n) end
local F = {'seq', 'floor', 'cached_total', 'cached_seq', 'cached_at', 'cache_gen',
           'reserved', 'inflight', 'blocked_until'}
local raw = redis.call('HMGET', K_STATE, unpack(F))
local S = {}
for i, name in ipairs(F) do S[name] = tonumber(raw[i]) or 0 end
local cached = raw[3] and true or false  -- a balance is cached
local new_json = nil                     -- the balance to cache, set by this script
local dirty = false

local function parse(rec)
  local c, g, a = string.match(rec, '^(%d+):(%-?%d+):(%d+)$')
  return tonumber(c), tonumber(g), tonumber(a)
end
local function record(c, g, a) return fmt(c) .. ':' .. fmt(g) .. ':' .. fmt(a) end

-- stop counting a reservation as in flight
local function unhold(id, cost)
  redis.call('HDEL', K_RES, id)
  redis.call('ZREM', K_LEASE, id)
  S.reserved = S.reserved - cost
  S.inflight = S.inflight - 1
  dirty = true
end

-- a spend that settled, or whose outcome is known: no older read may be trusted
local function release(id, cost, after)
  unhold(id, cost)
  if after > S.floor then S.floor = after end
end

-- distrust every read that started before now
local function invalidate()
  S.seq = S.seq + 1
  S.floor = S.seq
  S.cache_gen = S.cache_gen + 1
  cached = false
  new_json = nil
  dirty = true
end

local function store(json, total, start, at)
  cached = true
  new_json = json
  S.cached_total = total
  S.cached_seq = start
  S.cached_at = at
  S.cache_gen = S.cache_gen + 1
  dirty = true
end

local function cached_json()
  if not cached then return '' end
  if new_json then return new_json end
  return redis.call('HGET', K_STATE, 'cached') or ''
end

-- expired leases: spends of unknown outcome
local function sweep()
  local gone = redis.call('ZRANGEBYSCORE', K_LEASE, '-inf', '(' .. fmt(now))
  if #gone == 0 then return end
  for _, id in ipairs(gone) do
    local rec = redis.call('HGET', K_RES, id)
    if rec then
      local c = parse(rec)
      unhold(id, c)
    else
      redis.call('ZREM', K_LEASE, id)
    end
  end
  invalidate()
end

local function flush()
  if not dirty then return end
  local args = {}
  for _, name in ipairs(F) do
    if name ~= 'cached_total' then
      args[#args + 1] = name
      args[#args + 1] = fmt(S[name])
    end
  end
  if cached then
    args[#args + 1] = 'cached_total'
    args[#args + 1] = fmt(S.cached_total)
    if new_json then
      args[#args + 1] = 'cached'
      args[#args + 1] = new_json
    end
  else
    redis.call('HDEL', K_STATE, 'cached', 'cached_total')
  end
  redis.call('HSET', K_STATE, unpack(args))
end

local function trusted() return cached and S.cached_seq >= S.floor end

sweep()
"""

_SCRIPTS: dict[str, str] = {
    # ARGV: id, cost, ttl_ms, settle, may_wait, waited_for (-1: none), lease_ms, own ids...
    "admit": """
local id, cost, ttl, waited = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[6])
if not trusted()
   or (now - S.cached_at >= ttl and not (waited >= 0 and S.cached_seq >= waited)) then
  flush()
  return {'read', S.floor}
end
local total, reserved = S.cached_total, S.reserved
if cost == 0 or cost <= total - reserved then
  if redis.call('HEXISTS', K_RES, id) == 1 then
    flush()
    return redis.error_reply('creditguard: reservation id already in use')
  end
  redis.call('HSET', K_RES, id, record(cost, S.cache_gen, 0))
  redis.call('ZADD', K_LEASE, fmt(now + tonumber(ARGV[7])), id)
  S.reserved = reserved + cost
  S.inflight = S.inflight + 1
  dirty = true
  flush()
  return {'ok', cached_json(), S.cache_gen}
end
local own_ids = {}
for i = 8, #ARGV do own_ids[ARGV[i]] = true end
local newest, excluded, own = 0, 0, 0
local all = redis.call('HGETALL', K_RES)
for i = 1, #all, 2 do
  local c, g, a = parse(all[i + 1])
  if a > newest then newest = a end
  if g == S.cache_gen then
    excluded = excluded + c
  elseif own_ids[all[i]] then
    own = own + c
  end
end
flush()
if newest > 0 and ARGV[4] == '1' then return {'read', newest} end
local ambiguous = reserved - excluded
if ambiguous > own and ARGV[5] == '1' then return {'wait', ambiguous, own} end
local available = total - reserved
if available < 0 then available = 0 end
return {'refuse', available, reserved, cached_json()}
""",
    # ARGV: id, cost, lease_ms
    "reserve_unchecked": """
if redis.call('HEXISTS', K_RES, ARGV[1]) == 1 then
  flush()
  return redis.error_reply('creditguard: reservation id already in use')
end
local cost = tonumber(ARGV[2])
redis.call('HSET', K_RES, ARGV[1], record(cost, -1, 0))
redis.call('ZADD', K_LEASE, fmt(now + tonumber(ARGV[3])), ARGV[1])
S.reserved = S.reserved + cost
S.inflight = S.inflight + 1
dirty = true
flush()
return 1
""",
    # ARGV: token, budget_ms
    "read_begin": """
if redis.call('SET', K_FLIGHT, ARGV[1], 'NX', 'PX', ARGV[2]) then
  redis.call('HSET', K_STATE, 'flight_seq', fmt(S.seq))
  flush()
  return {1, S.seq}
end
flush()
return {0, tonumber(redis.call('HGET', K_STATE, 'flight_seq')) or 0}
""",
    # ARGV: token, start_seq, balance json, total
    "read_done": """
local start = tonumber(ARGV[2])
if start >= S.floor and (not cached or start >= S.cached_seq) then
  store(ARGV[3], tonumber(ARGV[4]), start, now)
end
local released = 0
local all = redis.call('HGETALL', K_RES)
for i = 1, #all, 2 do
  local c, g, a = parse(all[i + 1])
  if a > 0 and a <= start then
    release(all[i], c, a)
    released = released + 1
  end
end
if redis.call('GET', K_FLIGHT) == ARGV[1] then redis.call('DEL', K_FLIGHT) end
flush()
return released
""",
    # ARGV: token
    "read_failed": """
if redis.call('GET', K_FLIGHT) == ARGV[1] then redis.call('DEL', K_FLIGHT) end
flush()
return 0
""",
    "state": """
local settling, newest = 0, 0
local all = redis.call('HGETALL', K_RES)
for i = 1, #all, 2 do
  local c, g, a = parse(all[i + 1])
  if a > 0 then
    settling = settling + 1
    if a > newest then newest = a end
  end
end
flush()
local age = -1
if cached then age = now - S.cached_at end
return {cached and 1 or 0, cached_json(), S.cached_seq, age, S.floor, S.seq, S.reserved,
        S.inflight, settling, newest, redis.call('EXISTS', K_FLIGHT), S.cache_gen}
""",
    # ARGV: id
    "finish": """
local rec = redis.call('HGET', K_RES, ARGV[1])
if not rec then
  flush()
  return 0
end
local c, g = parse(rec)
S.seq = S.seq + 1
dirty = true
redis.call('HSET', K_RES, ARGV[1], record(c, g, S.seq))
flush()
return S.seq
""",
    # ARGV: id, invalidate
    "release": """
local rec = redis.call('HGET', K_RES, ARGV[1])
if rec then
  local c, g, a = parse(rec)
  release(ARGV[1], c, a)
end
if ARGV[2] == '1' then invalidate() end
flush()
return rec and 1 or 0
""",
    # ARGV: id, expected_gen, balance json, total
    "settle_alone": """
local rec = redis.call('HGET', K_RES, ARGV[1])
local done = 0
if rec and trusted() and S.inflight == 1 and redis.call('EXISTS', K_FLIGHT) == 0 then
  local c, g, a = parse(rec)
  if a == 0 and g == S.cache_gen and g == tonumber(ARGV[2]) then
    S.seq = S.seq + 1
    S.floor = S.seq
    store(ARGV[3], tonumber(ARGV[4]), S.seq, S.cached_at)  -- its age is the read's
    unhold(ARGV[1], c)
    done = 1
  end
end
flush()
return done
""",
    "invalidate": """
invalidate()
flush()
return S.seq
""",
    "bump": """
S.seq = S.seq + 1
dirty = true
flush()
return S.seq
""",
    # ARGV: lease_ms, ids...
    "renew": """
local n = 0
local expiry = fmt(now + tonumber(ARGV[1]))
for i = 2, #ARGV do
  if redis.call('HEXISTS', K_RES, ARGV[i]) == 1 then
    redis.call('ZADD', K_LEASE, expiry, ARGV[i])
    n = n + 1
  end
end
flush()
return n
""",
    # ARGV: ms
    "block": """
local until_ms = now + tonumber(ARGV[1])
if until_ms > S.blocked_until then
  S.blocked_until = until_ms
  dirty = true
end
flush()
return S.blocked_until
""",
    "blocked": """
flush()
local left = S.blocked_until - now
if left < 0 then left = 0 end
return left
""",
}

SCRIPTS: dict[str, str] = {name: _PRELUDE + body for name, body in _SCRIPTS.items()}


# -- results -----------------------------------------------------------------------------


class ReadNeeded(NamedTuple):
    """No trusted balance to decide on (or finished spends must settle first): perform or
    join a balance read that starts at ``seq >= after``, then admit again."""

    kind: Literal["read"]
    after: int


class Admitted(NamedTuple):
    """Reserved: ``balance`` (JSON) is what it was admitted on, ``gen`` its cache
    generation (pass it to :meth:`RedisAccountState.settle_alone`)."""

    kind: Literal["ok"]
    balance: str
    gen: int


class WaitNeeded(NamedTuple):
    """The cost does not fit, and the balance may include charges that ``reserved`` still
    counts: wait for a spend to settle, then admit again. ``ambiguous``: the credits that
    may settle; ``own``: those held by the caller's own enclosing spends."""

    kind: Literal["wait"]
    ambiguous: int
    own: int


class Refused(NamedTuple):
    """The account cannot pay: raise ``InsufficientCredits`` with these."""

    kind: Literal["refuse"]
    available: int
    reserved: int
    balance: str


AdmitResult = ReadNeeded | Admitted | WaitNeeded | Refused


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


def _admit_result(raw: Any) -> AdmitResult:
    kind = _text(raw[0])
    if kind == "ok":
        return Admitted("ok", _text(raw[1]), _int(raw[2]))
    if kind == "read":
        return ReadNeeded("read", _int(raw[1]))
    if kind == "wait":
        return WaitNeeded("wait", _int(raw[1]), _int(raw[2]))
    if kind == "refuse":
        return Refused("refuse", _int(raw[1]), _int(raw[2]), _text(raw[3]))
    raise AssertionError(f"unexpected admit answer {kind!r}")


def _read_begun(raw: Any) -> ReadBegun:
    return ReadBegun(_int(raw[0]) == 1, _int(raw[1]))


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


def encode_balance(balance: CreditBalance) -> tuple[str, int]:
    """The ``(balance_json, total)`` that :meth:`RedisAccountState.read_done` stores."""
    return json.dumps(balance.to_api(), separators=(",", ":")), balance.total_balance


def decode_balance(text: str) -> CreditBalance:
    """A balance stored by :func:`encode_balance`, back as a :class:`CreditBalance`."""
    return CreditBalance.from_api(json.loads(text))


def _count(name: str, value: object) -> int:
    # Lua numbers are doubles: every count stays where they are exact
    if type(value) is not int or not 0 <= value <= 2**53:
        raise ValueError(f"{name} must be an int from 0 to 2**53, got {value!r}")
    return value


def _ident(name: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty str, got {value!r}")
    return value


def _flag(value: bool) -> str:
    return "1" if value else "0"


# -- the operations ----------------------------------------------------------------------


class RedisAccountState:
    """The state of one account in Redis: every method is one atomic script call.

    ``client`` serves the sync methods, ``async_client`` (``redis.asyncio``) their async
    twins (named with a leading ``a``); either may be ``None`` when that side is unused.
    ``prefix`` starts every key (:data:`DEFAULT_PREFIX`: ``"creditguard:"``);
    ``fingerprint`` names the account (``_config._fingerprint``: never the API key);
    ``lease_ms`` is how long a reservation lives unless renewed.
    """

    __slots__ = ("_async", "_async_scripts", "_scripts", "_sync", "fingerprint", "keys", "lease_ms")

    def __init__(
        self,
        client: SyncClient | None,
        async_client: AsyncClient | None,
        prefix: str,
        fingerprint: str,
        lease_ms: int = 30_000,
    ) -> None:
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        _ident("fingerprint", fingerprint)
        if "{" in fingerprint or "}" in fingerprint:
            raise ValueError("fingerprint must not contain '{' or '}' (it is the hash tag)")
        if type(lease_ms) is not int or lease_ms < 1:
            raise ValueError(f"lease_ms must be an int >= 1, got {lease_ms!r}")
        self._sync = client
        self._async = async_client
        self.fingerprint = fingerprint
        self.lease_ms = lease_ms
        base = f"{prefix}{{{fingerprint}}}:"
        # state, reservations, leases, flight: every script gets all four, in this order
        self.keys: tuple[str, str, str, str] = (
            base + "state",
            base + "res",
            base + "lease",
            base + "flight",
        )
        self._scripts: dict[str, Script] = {}
        self._async_scripts: dict[str, AsyncScript] = {}

    def __repr__(self) -> str:
        return f"<RedisAccountState {self.keys[0]}>"

    def _run(self, name: str, args: Sequence[str | int]) -> Any:
        script = self._scripts.get(name)
        if script is None:
            if self._sync is None:
                raise RuntimeError("this RedisAccountState has no sync client")
            script = self._scripts[name] = self._sync.register_script(SCRIPTS[name])
        # redis-py's Script: EVALSHA, and on NOSCRIPT (a restarted server) load it again
        return script(keys=self.keys, args=args)

    async def _arun(self, name: str, args: Sequence[str | int]) -> Any:
        script = self._async_scripts.get(name)
        if script is None:
            if self._async is None:
                raise RuntimeError("this RedisAccountState has no async client")
            script = self._async_scripts[name] = self._async.register_script(SCRIPTS[name])
        return await script(keys=self.keys, args=args)

    # -- admission -----------------------------------------------------------------------

    def _admit_args(
        self,
        res_id: str,
        cost: int,
        ttl_ms: int,
        settle: bool,
        may_wait: bool,
        own_ids: Sequence[str],
        waited_for: int | None,
    ) -> list[str | int]:
        _ident("res_id", res_id)
        waited = -1 if waited_for is None else _count("waited_for", waited_for)
        args: list[str | int] = [
            res_id,
            _count("cost", cost),
            _count("ttl_ms", ttl_ms),
            _flag(settle),
            _flag(may_wait),
            waited,
            self.lease_ms,
        ]
        if isinstance(own_ids, str):
            raise TypeError("own_ids must be a sequence of reservation ids, not a str")
        args += [_ident("own_ids", r) for r in own_ids]
        return args

    def admit(
        self,
        res_id: str,
        cost: int,
        ttl_ms: int,
        settle: bool,
        may_wait: bool,
        own_ids: Sequence[str] = (),
        waited_for: int | None = None,
    ) -> AdmitResult:
        """Decide a call of ``cost`` on the cached balance (see ``Account.admit``).

        The cached balance is trusted when its read started at or after ``floor`` and it
        is younger than ``ttl_ms``, or (whatever its age) when its read started at or
        after ``waited_for``: the caller just waited for a read that started there (so
        ``ttl_ms=0`` admits on the read each caller waits for). On success the
        reservation ``res_id`` is recorded with a lease. ``own_ids``: the reservations of
        the caller's enclosing spends (they cannot settle while it waits).
        """
        args = self._admit_args(res_id, cost, ttl_ms, settle, may_wait, own_ids, waited_for)
        return _admit_result(self._run("admit", args))

    async def aadmit(
        self,
        res_id: str,
        cost: int,
        ttl_ms: int,
        settle: bool,
        may_wait: bool,
        own_ids: Sequence[str] = (),
        waited_for: int | None = None,
    ) -> AdmitResult:
        """Async twin of :meth:`admit`."""
        args = self._admit_args(res_id, cost, ttl_ms, settle, may_wait, own_ids, waited_for)
        return _admit_result(await self._arun("admit", args))

    def reserve_unchecked(self, res_id: str, cost: int) -> None:
        """Fail-open admission: count ``cost`` as in flight with no balance to check
        (its generation is -1: no balance excludes it)."""
        self._run("reserve_unchecked", self._unchecked_args(res_id, cost))

    async def areserve_unchecked(self, res_id: str, cost: int) -> None:
        """Async twin of :meth:`reserve_unchecked`."""
        await self._arun("reserve_unchecked", self._unchecked_args(res_id, cost))

    def _unchecked_args(self, res_id: str, cost: int) -> list[str | int]:
        return [_ident("res_id", res_id), _count("cost", cost), self.lease_ms]

    # -- reads ---------------------------------------------------------------------------

    def read_begin(self, token: str, budget_ms: int) -> ReadBegun:
        """Take the flight (for at most ``budget_ms``) if nobody holds it: the caller then
        leads a read starting at the current ``seq``. Otherwise ``lead`` is false and
        ``start_seq`` is where the read in progress started."""
        return _read_begun(self._run("read_begin", _read_begin_args(token, budget_ms)))

    async def aread_begin(self, token: str, budget_ms: int) -> ReadBegun:
        """Async twin of :meth:`read_begin`."""
        return _read_begun(await self._arun("read_begin", _read_begin_args(token, budget_ms)))

    def read_done(self, token: str, start_seq: int, balance_json: str, total: int) -> int:
        """A read that started at ``start_seq`` came back: store it unless a newer or
        more trusted one is known, release the finished spends it includes, give up the
        flight if ``token`` holds it. Returns how many spends it released."""
        args = _read_done_args(token, start_seq, balance_json, total)
        return _int(self._run("read_done", args))

    async def aread_done(self, token: str, start_seq: int, balance_json: str, total: int) -> int:
        """Async twin of :meth:`read_done`."""
        args = _read_done_args(token, start_seq, balance_json, total)
        return _int(await self._arun("read_done", args))

    def read_failed(self, token: str) -> None:
        """A read failed (or was abandoned): give up the flight if ``token`` holds it."""
        self._run("read_failed", [_ident("token", token)])

    async def aread_failed(self, token: str) -> None:
        """Async twin of :meth:`read_failed`."""
        await self._arun("read_failed", [_ident("token", token)])

    def state(self) -> Snapshot:
        """The account's state now (after removing expired leases)."""
        return _snapshot(self._run("state", ()))

    async def astate(self) -> Snapshot:
        """Async twin of :meth:`state`."""
        return _snapshot(await self._arun("state", ()))

    # -- settling ------------------------------------------------------------------------

    def finish(self, res_id: str) -> int:
        """The action of ``res_id`` finished; a later read settles it. Returns the ``seq``
        that read must start at (0: the reservation is gone, its lease expired)."""
        return _int(self._run("finish", [_ident("res_id", res_id)]))

    async def afinish(self, res_id: str) -> int:
        """Async twin of :meth:`finish`."""
        return _int(await self._arun("finish", [_ident("res_id", res_id)]))

    def release(self, res_id: str, invalidate: bool = False) -> bool:
        """Drop ``res_id`` (its action never ran, or its outcome is known); with
        ``invalidate``, hard-invalidate too. Returns whether it was still held."""
        return _int(self._run("release", [_ident("res_id", res_id), _flag(invalidate)])) == 1

    async def arelease(self, res_id: str, invalidate: bool = False) -> bool:
        """Async twin of :meth:`release`."""
        args = [_ident("res_id", res_id), _flag(invalidate)]
        return _int(await self._arun("release", args)) == 1

    def settle_alone(
        self, res_id: str, expected_gen: int, after_json: str, after_total: int
    ) -> bool:
        """The paid call of ``res_id`` reported the balance after it: settle it with that
        balance when it is provably the newest thing known (the only call in flight, no
        read in flight or pending, admitted on the cached balance, which is still
        generation ``expected_gen``). ``False``: nothing changed, settle with a read."""
        args = _settle_args(res_id, expected_gen, after_json, after_total)
        return _int(self._run("settle_alone", args)) == 1

    async def asettle_alone(
        self, res_id: str, expected_gen: int, after_json: str, after_total: int
    ) -> bool:
        """Async twin of :meth:`settle_alone`."""
        args = _settle_args(res_id, expected_gen, after_json, after_total)
        return _int(await self._arun("settle_alone", args)) == 1

    def invalidate(self) -> None:
        """Hard invalidation: drop the cache and distrust every read started before now."""
        self._run("invalidate", ())

    async def ainvalidate(self) -> None:
        """Async twin of :meth:`invalidate`."""
        await self._arun("invalidate", ())

    def bump(self) -> int:
        """The balance may have changed upstream: returns the new ``seq``."""
        return _int(self._run("bump", ()))

    async def abump(self) -> int:
        """Async twin of :meth:`bump`."""
        return _int(await self._arun("bump", ()))

    def renew(self, res_ids: Sequence[str]) -> int:
        """Extend the lease of each reservation still held to now + ``lease_ms``; returns
        how many were still held."""
        return _int(self._run("renew", self._renew_args(res_ids)))

    async def arenew(self, res_ids: Sequence[str]) -> int:
        """Async twin of :meth:`renew`."""
        return _int(await self._arun("renew", self._renew_args(res_ids)))

    def _renew_args(self, res_ids: Sequence[str]) -> list[str | int]:
        args: list[str | int] = [self.lease_ms]
        args += [_ident("res_id", r) for r in res_ids]
        return args

    # -- rate limit ----------------------------------------------------------------------

    def block(self, ms: int) -> None:
        """Make no balance request for ``ms`` milliseconds from now (server time), in any
        process: the rate limit is used up. A later block never shortens an earlier one."""
        self._run("block", [_count("ms", ms)])

    async def ablock(self, ms: int) -> None:
        """Async twin of :meth:`block`."""
        await self._arun("block", [_count("ms", ms)])

    def blocked(self) -> int | None:
        """Milliseconds left before a balance request may be made, or ``None``."""
        return _blocked(self._run("blocked", ()))

    async def ablocked(self) -> int | None:
        """Async twin of :meth:`blocked`."""
        return _blocked(await self._arun("blocked", ()))


def _read_begin_args(token: str, budget_ms: int) -> list[str | int]:
    if type(budget_ms) is not int or budget_ms < 1:
        raise ValueError(f"budget_ms must be an int >= 1, got {budget_ms!r}")
    return [_ident("token", token), budget_ms]


def _read_done_args(token: str, start_seq: int, balance_json: str, total: int) -> list[str | int]:
    return [
        _ident("token", token),
        _count("start_seq", start_seq),
        _ident("balance_json", balance_json),
        _count("total", total),
    ]


def _settle_args(res_id: str, gen: int, after_json: str, after_total: int) -> list[str | int]:
    if type(gen) is not int:
        raise ValueError(f"expected_gen must be an int, got {gen!r}")
    return [
        _ident("res_id", res_id),
        gen,
        _ident("after_json", after_json),
        _count("after_total", after_total),
    ]
