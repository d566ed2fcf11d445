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
  ``CreditBalance.to_api()``; absent when none), ``cached_total``, ``cache_id`` (a random
  name of the cached balance: the token of the read, or the reservation id, that brought
  it), ``cached_seq``, ``cached_at`` (ms), ``cache_gen``, ``reserved``, ``inflight``,
  ``blocked_until`` (ms), ``flight_seq`` (the ``seq`` the read in progress started at);
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
were any, hard-invalidates: an expired lease is a spend whose outcome nobody knows. The
one exception is :meth:`~RedisAccountState.finish`, which decides nothing (it marks a
spend finished): the next operation removes them.

Calls
-----
Each operation is one ``EVALSHA`` through the client's ``execute_command`` (keys sent as
bytes, encoded once); on ``NOSCRIPT`` (a restarted server, a failover) the script is
loaded again and the call repeated. An admission sends the balance only when it is not
the one the caller names as known (``known``: the tag of the last balance it was sent,
``cache_id:cache_gen``; any change of the cached balance changes the generation, whatever
wrote it, and a balance stored after Redis lost its state has a new ``cache_id``): most
admissions in a TTL are answered with the cache generation alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from ._models import CreditBalance

if TYPE_CHECKING:
    import redis
    import redis.asyncio
    import redis.asyncio.cluster
    import redis.cluster

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
# _HEAD names the keys, reads the server's time and defines sweep(): it removes the
# reservations whose lease expired, if any did. The two scripts of every guarded call
# are written out: "admit" sweeps, reads the fields it needs in one HMGET and writes
# only what it changes; "finish" only marks a spend finished (it decides nothing, so it
# leaves expired leases to the next operation that does). The others sweep first and
# then follow _HELPERS: S holds the state fields they read (one HMGET of the fields the
# script names; any other field is read on first use), changed in place, and flush()
# writes back in one HSET only the fields whose value changed (and stores or drops the
# cached balance). Lua numbers are doubles: exact up to 2^53, far beyond any credit
# count, seq or millisecond time here; they are written with '%d' (tostring would switch
# to exponents past 14 digits).

_KEYS = """
local K_STATE, K_RES, K_LEASE, K_FLIGHT = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local function fmt(n) return string.format('%d', n) end
"""

_HEAD = (
    _KEYS
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- Expired leases: spends of unknown outcome. Their credits are no longer counted and
-- every read that started before now is distrusted (hard invalidation). (One ZCOUNT when
-- none expired: the common case.)
local function sweep()
  local due = '(' .. fmt(now)
  if redis.call('ZCOUNT', K_LEASE, '-inf', due) == 0 then return end
  local gone = redis.call('ZRANGEBYSCORE', K_LEASE, '-inf', due)
  local cost, n = 0, 0
  for _, id in ipairs(gone) do
    local rec = redis.call('HGET', K_RES, id)
    if rec then
      cost = cost + tonumber(string.match(rec, '^%d+'))
      n = n + 1
      redis.call('HDEL', K_RES, id)
    end
  end
  redis.call('ZREMRANGEBYSCORE', K_LEASE, '-inf', due)
  local raw = redis.call('HMGET', K_STATE, 'seq', 'cache_gen', 'reserved', 'inflight')
  local seq = fmt((tonumber(raw[1]) or 0) + 1)
  redis.call('HSET', K_STATE, 'seq', seq, 'floor', seq,
             'cache_gen', fmt((tonumber(raw[2]) or 0) + 1),
             'reserved', fmt((tonumber(raw[3]) or 0) - cost),
             'inflight', fmt((tonumber(raw[4]) or 0) - n))
  redis.call('HDEL', K_STATE, 'cached', 'cached_total', 'cache_id')
end
"""
)

_HELPERS = """
local S, O = {}, {}    -- the state fields: as changed by this script, as read
local cached = nil     -- a balance is cached (nil: not looked at yet)
local cache_op = nil   -- what flush() does to the cached balance: 'store' or 'drop'
local new_json = nil   -- the balance to cache, set by this script, and its id
local new_id = nil

-- read the fields not read yet, in one HMGET
local function load(...)
  local names = {}
  for _, name in ipairs({...}) do
    if rawget(S, name) == nil then names[#names + 1] = name end
  end
  if #names == 0 then return end
  local raw = redis.call('HMGET', K_STATE, unpack(names))
  for i, name in ipairs(names) do
    local v = tonumber(raw[i]) or 0
    S[name] = v
    O[name] = v
    if name == 'cached_total' and cached == nil then cached = raw[i] and true or false end
  end
end
setmetatable(S, {__index = function(_, name)
  load(name)
  return rawget(S, name)
end})

local function is_cached()
  if cached == nil then load('cached_total') end
  return cached
end

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
  cache_op = 'drop'
  new_json = nil
end

-- cache a balance; ``id`` names it (the random token of the read, or reservation id, that
-- brought it): a caller that knows the balance of that id is not sent it again
local function store(json, total, start, at, id)
  S.cache_gen = S.cache_gen + 1
  cached = true
  cache_op = 'store'
  new_json = json
  new_id = id
  S.cached_total = total
  S.cached_seq = start
  S.cached_at = at
end

local function cached_json()
  if not is_cached() then return '' end
  if new_json then return new_json end
  return redis.call('HGET', K_STATE, 'cached') or ''
end

local function flush()
  local args = {}
  for name, v in pairs(S) do
    if v ~= O[name] and name ~= 'cached_total' then
      args[#args + 1] = name
      args[#args + 1] = fmt(v)
    end
  end
  if cache_op == 'store' then
    args[#args + 1] = 'cached'
    args[#args + 1] = new_json
    args[#args + 1] = 'cached_total'
    args[#args + 1] = fmt(S.cached_total)
    args[#args + 1] = 'cache_id'
    args[#args + 1] = new_id
  elseif cache_op == 'drop' then
    redis.call('HDEL', K_STATE, 'cached', 'cached_total', 'cache_id')
  end
  if #args > 0 then redis.call('HSET', K_STATE, unpack(args)) end
end

local function trusted() return is_cached() and S.cached_seq >= S.floor end
"""

# The scripts of every guarded call, with the keys they use (a prefix of the four).
_DIRECT: dict[str, tuple[int, str]] = {
    # ARGV[1]: 'cost ttl_ms <settle><may_wait> waited_for lease_ms id known', one string
    # (waited_for -1: none; known: the tag of the balance the caller has, or empty);
    # ARGV[2...]: own ids
    "admit": (
        3,
        _HEAD
        + """
local cost, ttl, settle, may_wait, waited, lease, id, known = string.match(ARGV[1],
  '^(%d+) (%d+) ([01])([01]) (%-?%d+) (%d+) (%S+) (%S*)$')
cost, ttl, waited = tonumber(cost), tonumber(ttl), tonumber(waited)
sweep()
local raw = redis.call('HMGET', K_STATE, 'cached_total', 'cached_seq', 'floor', 'cached_at',
                       'cache_gen', 'reserved', 'inflight', 'cache_id')
local total = tonumber(raw[1])  -- nil: no balance cached
local cseq, floor = tonumber(raw[2]) or 0, tonumber(raw[3]) or 0
if not total or cseq < floor
   or (now - (tonumber(raw[4]) or 0) >= ttl and not (waited >= 0 and cseq >= waited)) then
  return {'read', floor}
end
local gen, reserved = raw[5] or '0', tonumber(raw[6]) or 0  -- (gen as stored: '%d')
if cost == 0 or cost <= total - reserved then
  if redis.call('HSETNX', K_RES, id, fmt(cost) .. ':' .. gen .. ':0') == 0 then
    return redis.error_reply('creditguard: reservation id already in use')
  end
  redis.call('ZADD', K_LEASE, fmt(now + tonumber(lease)), id)
  redis.call('HSET', K_STATE, 'reserved', fmt(reserved + cost),
             'inflight', fmt((tonumber(raw[7]) or 0) + 1))
  -- the balance's tag: its name and generation ('': unnamed)
  local tag = raw[8] and raw[8] .. ':' .. gen or ''
  -- the caller has this balance: its generation alone says so
  if tag ~= '' and tag == known then return tonumber(gen) end
  return {'ok', redis.call('HGET', K_STATE, 'cached') or '', tonumber(gen), tag}
end
-- It does not fit: settle finished spends first, wait for ambiguous ones, or refuse.
local own_ids = {}
for i = 2, #ARGV do own_ids[ARGV[i]] = true end
local newest, excluded, own = 0, 0, 0
local all = redis.call('HGETALL', K_RES)
for i = 1, #all, 2 do
  local c, g, a = string.match(all[i + 1], '^(%d+):(%-?%d+):(%d+)$')
  c, g, a = tonumber(c), tonumber(g), tonumber(a)
  if a > newest then newest = a end
  if g == tonumber(gen) then
    excluded = excluded + c
  elseif own_ids[all[i]] then
    own = own + c
  end
end
if newest > 0 and settle == '1' then return {'read', newest} end
local ambiguous = reserved - excluded
if ambiguous > own and may_wait == '1' then return {'wait', ambiguous, own} end
local available = total - reserved
if available < 0 then available = 0 end
return {'refuse', available, reserved, redis.call('HGET', K_STATE, 'cached') or ''}
""",
    ),
    # ARGV: id
    "finish": (
        2,
        _KEYS
        + """
local rec = redis.call('HGET', K_RES, ARGV[1])
if not rec then return 0 end
local seq = redis.call('HINCRBY', K_STATE, 'seq', 1)
redis.call('HSET', K_RES, ARGV[1], string.match(rec, '^%d+:%-?%d+:') .. fmt(seq))
return seq
""",
    ),
}

# The others: _HEAD, _HELPERS, a load() of the fields the body reads, then the body.
_SCRIPTS: dict[str, tuple[tuple[str, ...], str]] = {
    # ARGV: id, cost, lease_ms
    "reserve_unchecked": (
        ("reserved", "inflight"),
        """
local cost = tonumber(ARGV[2])
if redis.call('HSETNX', K_RES, ARGV[1], record(cost, -1, 0)) == 0 then
  return redis.error_reply('creditguard: reservation id already in use')
end
redis.call('ZADD', K_LEASE, fmt(now + tonumber(ARGV[3])), ARGV[1])
S.reserved = S.reserved + cost
S.inflight = S.inflight + 1
flush()
return 1
""",
    ),
    # ARGV: token, budget_ms
    "read_begin": (
        ("seq",),
        """
if redis.call('SET', K_FLIGHT, ARGV[1], 'NX', 'PX', ARGV[2]) then
  S.flight_seq = S.seq
  flush()
  return {1, S.seq}
end
return {0, S.flight_seq}
""",
    ),
    # ARGV: token, start_seq, balance json, total
    "read_done": (
        ("cached_total", "cached_seq", "floor", "cache_gen", "reserved", "inflight"),
        """
local start = tonumber(ARGV[2])
if start >= S.floor and (not is_cached() or start >= S.cached_seq) then
  store(ARGV[3], tonumber(ARGV[4]), start, now, ARGV[1])
end
-- release the spends that finished before it started, in a few commands however many
local ids, cost, newest = {}, 0, 0
local all = redis.call('HGETALL', K_RES)
for i = 1, #all, 2 do
  local c, a = string.match(all[i + 1], '^(%d+):%-?%d+:(%d+)$')
  a = tonumber(a)
  if a > 0 and a <= start then
    ids[#ids + 1] = all[i]
    cost = cost + tonumber(c)
    if a > newest then newest = a end
  end
end
for i = 1, #ids, 1000 do
  local last = math.min(i + 999, #ids)
  redis.call('HDEL', K_RES, unpack(ids, i, last))
  redis.call('ZREM', K_LEASE, unpack(ids, i, last))
end
if #ids > 0 then
  S.reserved = S.reserved - cost
  S.inflight = S.inflight - #ids
  if newest > S.floor then S.floor = newest end
end
if redis.call('GET', K_FLIGHT) == ARGV[1] then redis.call('DEL', K_FLIGHT) end
flush()
return #ids
""",
    ),
    # ARGV: token
    "read_failed": (
        (),
        """
if redis.call('GET', K_FLIGHT) == ARGV[1] then redis.call('DEL', K_FLIGHT) end
return 0
""",
    ),
    "state": (
        (
            "cached_total",
            "cached_seq",
            "cached_at",
            "floor",
            "seq",
            "reserved",
            "inflight",
            "cache_gen",
        ),
        """
local settling, newest = 0, 0
local all = redis.call('HGETALL', K_RES)
for i = 1, #all, 2 do
  local c, g, a = parse(all[i + 1])
  if a > 0 then
    settling = settling + 1
    if a > newest then newest = a end
  end
end
local age = -1
if is_cached() then age = now - S.cached_at end
return {is_cached() and 1 or 0, cached_json(), S.cached_seq, age, S.floor, S.seq, S.reserved,
        S.inflight, settling, newest, redis.call('EXISTS', K_FLIGHT), S.cache_gen}
""",
    ),
    # ARGV: id, invalidate
    "release": (
        ("reserved", "inflight", "floor"),
        """
local rec = redis.call('HGET', K_RES, ARGV[1])
if rec then
  local c, g, a = parse(rec)
  release(ARGV[1], c, a)
end
if ARGV[2] == '1' then invalidate() end
flush()
return rec and 1 or 0
""",
    ),
    # ARGV: id, expected_gen, balance json, total
    "settle_alone": (
        (
            "cached_total",
            "cached_seq",
            "cached_at",
            "floor",
            "seq",
            "reserved",
            "inflight",
            "cache_gen",
        ),
        """
local rec = redis.call('HGET', K_RES, ARGV[1])
if rec and trusted() and S.inflight == 1 and redis.call('EXISTS', K_FLIGHT) == 0 then
  local c, g, a = parse(rec)
  if a == 0 and g == S.cache_gen and g == tonumber(ARGV[2]) then
    S.seq = S.seq + 1
    S.floor = S.seq
    store(ARGV[3], tonumber(ARGV[4]), S.seq, S.cached_at, ARGV[1])  -- its age is the read's
    unhold(ARGV[1], c)
    flush()
    return 1
  end
end
return 0
""",
    ),
    "invalidate": (
        ("seq", "cache_gen"),
        """
invalidate()
flush()
return S.seq
""",
    ),
    "bump": (
        ("seq",),
        """
S.seq = S.seq + 1
flush()
return S.seq
""",
    ),
    # ARGV: lease_ms, ids...
    "renew": (
        (),
        """
local n = 0
local expiry = fmt(now + tonumber(ARGV[1]))
for i = 2, #ARGV do
  if redis.call('HEXISTS', K_RES, ARGV[i]) == 1 then
    redis.call('ZADD', K_LEASE, expiry, ARGV[i])
    n = n + 1
  end
end
return n
""",
    ),
    # ARGV: ms
    "block": (
        ("blocked_until",),
        """
local until_ms = now + tonumber(ARGV[1])
if until_ms > S.blocked_until then S.blocked_until = until_ms end
flush()
return S.blocked_until
""",
    ),
    "blocked": (
        ("blocked_until",),
        """
local left = S.blocked_until - now
if left < 0 then left = 0 end
return left
""",
    ),
}


def sha_of(text: str) -> str:
    """The name EVALSHA knows a script by (SCRIPT LOAD answers the same)."""
    return hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()


def _script(fields: tuple[str, ...], body: str) -> str:
    load = "load(" + ", ".join(f"'{name}'" for name in fields) + ")\n" if fields else ""
    return _HEAD + "sweep()\n" + _HELPERS + load + body


SCRIPTS: dict[str, str] = {
    **{name: text for name, (_, text) in _DIRECT.items()},
    **{name: _script(*script) for name, script in _SCRIPTS.items()},
}
# how many of the account's keys each script is given (the others: all four)
NKEYS: dict[str, int] = {name: n for name, (n, _) in _DIRECT.items()}
# what EVALSHA names them by (SCRIPT LOAD answers the same)
SHAS: dict[str, str] = {name: sha_of(text) for name, text in SCRIPTS.items()}


def _no_script(exc: Exception) -> bool:
    """``exc`` is Redis saying it does not know the script (``NOSCRIPT``)."""
    from redis.exceptions import NoScriptError

    return isinstance(exc, NoScriptError)


# -- results -----------------------------------------------------------------------------


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


def _admit_result(raw: Any, known: str) -> AdmitResult:
    if type(raw) is int:  # admitted on the balance the caller knows: its generation
        return Admitted("ok", None, raw, known)
    kind = _text(raw[0])
    if kind == "ok":
        return Admitted("ok", _text(raw[1]), _int(raw[2]), _text(raw[3]))
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


def _name(name: str, value: object) -> str:
    """A reservation id or read token: a non-empty str without whitespace (it travels in
    the admission's one-string argument, and names the balance it brings, ``cache_id``)."""
    if type(value) is not str or value.split() != [value]:
        raise ValueError(f"{name} must be a non-empty str without whitespace, got {value!r}")
    return value


def eval_head(sha: str, keys: tuple[str | bytes, ...]) -> tuple[str | bytes, ...]:
    """The start of an EVALSHA of ``sha`` on ``keys``."""
    return ("EVALSHA", sha.encode(), str(len(keys)).encode(), *keys)


def evalsha(client: SyncClient, head: tuple[str | bytes, ...], text: str, args: Any) -> Any:
    """One script call: ``head`` (from :func:`eval_head`) and ``args``; on ``NOSCRIPT`` (a
    restarted server, another node) the script ``text`` is loaded and called again."""
    execute: Callable[..., Any] = client.execute_command
    try:
        return execute(*head, *args)
    except Exception as exc:
        if not _no_script(exc):
            raise
    sha = _text(client.script_load(text))
    return execute(*eval_head(sha, head[3:]), *args)


async def aevalsha(client: AsyncClient, head: tuple[str | bytes, ...], text: str, args: Any) -> Any:
    """Async :func:`evalsha`."""
    try:
        return await client.execute_command(*head, *args)
    except Exception as exc:
        if not _no_script(exc):
            raise
    sha = _text(await client.script_load(text))
    return await client.execute_command(*eval_head(sha, head[3:]), *args)


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

    __slots__ = ("_async", "_heads", "_sync", "fingerprint", "keys", "lease_ms")

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
        # what precedes the arguments of each script's EVALSHA, encoded once
        keys = tuple(key.encode() for key in self.keys)
        self._heads: dict[str, tuple[str | bytes, ...]] = {
            name: eval_head(SHAS[name], keys[: NKEYS.get(name, 4)]) for name in SCRIPTS
        }

    def __repr__(self) -> str:
        return f"<RedisAccountState {self.keys[0]}>"

    def _run(self, name: str, args: Sequence[str | int]) -> Any:
        client = self._sync
        if client is None:
            raise RuntimeError("this RedisAccountState has no sync client")
        return evalsha(client, self._heads[name], SCRIPTS[name], args)

    async def _arun(self, name: str, args: Sequence[str | int]) -> Any:
        client = self._async
        if client is None:
            raise RuntimeError("this RedisAccountState has no async client")
        return await aevalsha(client, self._heads[name], SCRIPTS[name], args)

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
        known: str,
    ) -> list[str | int]:
        waited = -1 if waited_for is None else _count("waited_for", waited_for)
        # one string: each argument costs redis-py's encoder more than its text
        call = (
            f"{_count('cost', cost)} {_count('ttl_ms', ttl_ms)} {_flag(settle)}{_flag(may_wait)}"
            f" {waited} {self.lease_ms} {_name('res_id', res_id)} {known and _name('known', known)}"
        )
        if not own_ids:
            return [call]
        if isinstance(own_ids, str):
            raise TypeError("own_ids must be a sequence of reservation ids, not a str")
        return [call, *(_name("own_ids", r) for r in own_ids)]

    def admit(
        self,
        res_id: str,
        cost: int,
        ttl_ms: int,
        settle: bool,
        may_wait: bool,
        own_ids: Sequence[str] = (),
        waited_for: int | None = None,
        known: str = "",
    ) -> AdmitResult:
        """Decide a call of ``cost`` on the cached balance (see ``Account.admit``).

        The cached balance is trusted when its read started at or after ``floor`` and it
        is younger than ``ttl_ms``, or (whatever its age) when its read started at or
        after ``waited_for``: the caller just waited for a read that started there (so
        ``ttl_ms=0`` admits on the read each caller waits for). On success the
        reservation ``res_id`` is recorded with a lease. ``own_ids``: the reservations of
        the caller's enclosing spends (they cannot settle while it waits). ``known``: the
        ``tag`` of the balance the caller already has (from an earlier
        :class:`Admitted`); admitted on that one, the answer's ``balance`` is ``None``.
        """
        args = self._admit_args(res_id, cost, ttl_ms, settle, may_wait, own_ids, waited_for, known)
        return _admit_result(self._run("admit", args), known)

    async def aadmit(
        self,
        res_id: str,
        cost: int,
        ttl_ms: int,
        settle: bool,
        may_wait: bool,
        own_ids: Sequence[str] = (),
        waited_for: int | None = None,
        known: str = "",
    ) -> AdmitResult:
        """Async twin of :meth:`admit`."""
        args = self._admit_args(res_id, cost, ttl_ms, settle, may_wait, own_ids, waited_for, known)
        return _admit_result(await self._arun("admit", args), known)

    def reserve_unchecked(self, res_id: str, cost: int) -> None:
        """Fail-open admission: count ``cost`` as in flight with no balance to check
        (its generation is -1: no balance excludes it)."""
        self._run("reserve_unchecked", self._unchecked_args(res_id, cost))

    async def areserve_unchecked(self, res_id: str, cost: int) -> None:
        """Async twin of :meth:`reserve_unchecked`."""
        await self._arun("reserve_unchecked", self._unchecked_args(res_id, cost))

    def _unchecked_args(self, res_id: str, cost: int) -> list[str | int]:
        return [_name("res_id", res_id), _count("cost", cost), self.lease_ms]

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
        self._run("read_failed", [_name("token", token)])

    async def aread_failed(self, token: str) -> None:
        """Async twin of :meth:`read_failed`."""
        await self._arun("read_failed", [_name("token", token)])

    def state(self) -> Snapshot:
        """The account's state now (after removing expired leases)."""
        return _snapshot(self._run("state", ()))

    async def astate(self) -> Snapshot:
        """Async twin of :meth:`state`."""
        return _snapshot(await self._arun("state", ()))

    # -- settling ------------------------------------------------------------------------

    def finish(self, res_id: str) -> int:
        """The action of ``res_id`` finished; a later read settles it. Returns the ``seq``
        that read must start at (0: the reservation is gone: its lease expired and an
        operation removed it). The one operation that leaves expired leases to the next."""
        return _int(self._run("finish", [_name("res_id", res_id)]))

    async def afinish(self, res_id: str) -> int:
        """Async twin of :meth:`finish`."""
        return _int(await self._arun("finish", [_name("res_id", res_id)]))

    def release(self, res_id: str, invalidate: bool = False) -> bool:
        """Drop ``res_id`` (its action never ran, or its outcome is known); with
        ``invalidate``, hard-invalidate too. Returns whether it was still held."""
        return _int(self._run("release", [_name("res_id", res_id), _flag(invalidate)])) == 1

    async def arelease(self, res_id: str, invalidate: bool = False) -> bool:
        """Async twin of :meth:`release`."""
        args = [_name("res_id", res_id), _flag(invalidate)]
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
        args += [_name("res_id", r) for r in res_ids]
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
    return [_name("token", token), budget_ms]


def _read_done_args(token: str, start_seq: int, balance_json: str, total: int) -> list[str | int]:
    return [
        _name("token", token),
        _count("start_seq", start_seq),
        _ident("balance_json", balance_json),
        _count("total", total),
    ]


def _settle_args(res_id: str, gen: int, after_json: str, after_total: int) -> list[str | int]:
    if type(gen) is not int:
        raise ValueError(f"expected_gen must be an int, got {gen!r}")
    return [
        _name("res_id", res_id),
        gen,
        _ident("after_json", after_json),
        _count("after_total", after_total),
    ]
