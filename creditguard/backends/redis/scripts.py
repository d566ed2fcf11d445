"""The shared state of one account in Redis: many processes, one account.

This mirrors the rules of the memory backend's ``Account`` (see docs/consistency.md)
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

import hashlib
import importlib.resources
import json
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from creditguard.backends.redis.answers import (
    AdmitResult,
    Admitted,
    Busy,
    ReadBegun,
    ReadNeeded,
    Refused,
    Snapshot,
    Survey,
    WaitNeeded,
    _admit_result,
    _int,
    _read_begun,
    _snapshot,
    _survey,
    _text,
)
from creditguard.backends.redis.side import MAX_MS, SideScripts, duration_ms
from creditguard.core.models import CreditBalance

if TYPE_CHECKING:
    from creditguard.backends.redis.clients import AsyncClient, SyncClient

__all__ = [
    "DEFAULT_PREFIX",
    "MAX_MS",
    "AdmitResult",
    "Admitted",
    "Busy",
    "ReadBegun",
    "ReadNeeded",
    "RedisAccountState",
    "Refused",
    "Snapshot",
    "Survey",
    "WaitNeeded",
    "decode_balance",
    "duration_ms",
    "encode_balance",
]

DEFAULT_PREFIX = "creditguard:"

# -- the scripts -------------------------------------------------------------------------
#
# The Lua is in ``state.lua``, in sections (see its head): "_head" names the keys,
# reads the server's time and defines sweep(), which checks the books (the counters against
# the records and their leases, repairing them when a key was lost) and removes the
# reservations whose lease expired, if any did. "admit" and "finish", the scripts of every
# guarded call, are written out: "admit" sweeps, reads the fields it needs in one HMGET
# and writes only what it changes; "finish" only marks a spend finished (it decides
# nothing, so it leaves expired leases to the next operation that does). The others sweep
# first and then follow "_helpers": S holds the state fields they read (one HMGET of the
# fields the script names; any other field is read on first use), changed in place, and
# flush() writes back in one HSET only the fields whose value changed (and stores or
# drops the cached balance), and refreshes the keys' expiry.


def lua_sections(filename: str) -> dict[str, tuple[list[str], str]]:
    """The sections of a ``.lua`` file of this package: name -> (header words, text)."""
    source = importlib.resources.files(__package__ or "creditguard").joinpath(filename)
    sections: dict[str, tuple[list[str], str]] = {}
    name, words, lines = "", [], []  # type: tuple[str, list[str], list[str]]
    for line in source.read_text(encoding="utf-8").splitlines(keepends=True):
        if line.startswith("--@ "):
            if name:
                sections[name] = (words, "".join(lines))
            name, *words = line[4:].split()
            lines = []
        elif name:
            lines.append(line)
    if name:
        sections[name] = (words, "".join(lines))
    return sections


def _build(sections: dict[str, tuple[list[str], str]]) -> tuple[dict[str, str], dict[str, int]]:
    keys, head, helpers = (sections[n][1] for n in ("_keys", "_head", "_helpers"))
    scripts: dict[str, str] = {}
    nkeys: dict[str, int] = {}
    for name, (words, body) in sections.items():
        if name.startswith("_"):
            continue
        count, prelude, *fields = words
        nkeys[name] = int(count)
        if prelude == "keys":
            scripts[name] = keys + body
        elif prelude == "head":
            scripts[name] = keys + head + body
        else:
            load = "load(" + ", ".join(f"'{f}'" for f in fields) + ")\n" if fields else ""
            scripts[name] = keys + head + "sweep()\n" + helpers + load + body
    return scripts, nkeys


def sha_of(text: str) -> str:
    """The name EVALSHA knows a script by (SCRIPT LOAD answers the same)."""
    return hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()


SCRIPTS, NKEYS = _build(lua_sections("state.lua"))
# what EVALSHA names them by (SCRIPT LOAD answers the same)
SHAS: dict[str, str] = {name: sha_of(text) for name, text in SCRIPTS.items()}


def _no_script(exc: Exception) -> bool:
    """``exc`` is Redis saying it does not know the script (``NOSCRIPT``)."""
    from redis.exceptions import NoScriptError

    return isinstance(exc, NoScriptError)


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


class RedisAccountState(SideScripts):
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
        lease_ms = duration_ms("lease_ms", lease_ms)
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
        # what precedes the arguments of each script's EVALSHA, encoded once (a script
        # of five keys gets the gate's queue too: see gate.py)
        keys = tuple(key.encode() for key in (*self.keys, base + "queue"))
        self._heads: dict[str, tuple[str | bytes, ...]] = {
            name: eval_head(SHAS[name], keys[: NKEYS[name]]) for name in SCRIPTS
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
        finished: Sequence[str],
        keep: int = 0,
        window: str = "",
    ) -> list[str | int]:
        waited = -1 if waited_for is None else _count("waited_for", waited_for)
        done = ",".join(_name("finished", r) for r in finished) if finished else ""
        # one string: each argument costs redis-py's encoder more than its text
        call = (
            f"{_count('cost', cost)} {_count('ttl_ms', ttl_ms)} {_flag(settle)}{_flag(may_wait)}"
            f" {waited} {self.lease_ms} {_name('res_id', res_id)} {known and _name('known', known)}"
            f" {done} {_count('keep', keep)} {window and _name('window', window)}"
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
        finished: Sequence[str] = (),
        keep: int = 0,
        window: str = "",
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
        ``finished``: spends of this process that finished since it last told Redis,
        marked finished first (as :meth:`finish` does), whatever the answer. ``keep``:
        the credits never spent; ``window``: the subject's allowance window,
        ``"key|limit|end_ms|warn"`` (see :func:`window_spec`), or empty.
        """
        args = self._admit_args(
            res_id,
            cost,
            ttl_ms,
            settle,
            may_wait,
            own_ids,
            waited_for,
            known,
            finished,
            keep,
            window,
        )
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
        finished: Sequence[str] = (),
        keep: int = 0,
        window: str = "",
    ) -> AdmitResult:
        """Async twin of :meth:`admit`."""
        args = self._admit_args(
            res_id,
            cost,
            ttl_ms,
            settle,
            may_wait,
            own_ids,
            waited_for,
            known,
            finished,
            keep,
            window,
        )
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

    def finish(self, res_id: str, *more: str) -> int:
        """The action of ``res_id`` (and of each of ``more``) finished; a later read
        settles it. Returns the ``seq`` that read must start at (0: none is recorded any
        more: its lease expired and an operation removed it). The one operation that
        leaves expired leases to the next."""
        return _int(self._run("finish", [_name("res_id", r) for r in (res_id, *more)]))

    async def afinish(self, res_id: str, *more: str) -> int:
        """Async twin of :meth:`finish`."""
        return _int(await self._arun("finish", [_name("res_id", r) for r in (res_id, *more)]))

    def release(self, res_id: str, invalidate: bool = False, charged: int = 0) -> bool:
        """Drop ``res_id`` (its action never ran, or its outcome is known); with
        ``invalidate``, hard-invalidate too; ``charged``: what its call was charged, for
        its subject's window. Returns whether it was still held."""
        args: list[str | int] = [
            _name("res_id", res_id),
            _flag(invalidate),
            _count("charged", charged),
        ]
        return _int(self._run("release", args)) == 1

    async def arelease(self, res_id: str, invalidate: bool = False, charged: int = 0) -> bool:
        """Async twin of :meth:`release`."""
        args: list[str | int] = [
            _name("res_id", res_id),
            _flag(invalidate),
            _count("charged", charged),
        ]
        return _int(await self._arun("release", args)) == 1

    def settle_alone(
        self, res_id: str, expected_gen: int, after_json: str, after_total: int, charged: int = 0
    ) -> bool:
        """The paid call of ``res_id`` reported the balance after it: settle it with that
        balance when it is provably the newest thing known (the only call in flight, no
        read in flight or pending, admitted on the cached balance, which is still
        generation ``expected_gen``). ``False``: nothing changed, settle with a read."""
        args = _settle_args(res_id, expected_gen, after_json, after_total, charged)
        return _int(self._run("settle_alone", args)) == 1

    async def asettle_alone(
        self, res_id: str, expected_gen: int, after_json: str, after_total: int, charged: int = 0
    ) -> bool:
        """Async twin of :meth:`settle_alone`."""
        args = _settle_args(res_id, expected_gen, after_json, after_total, charged)
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
        """Extend the lease of each reservation still held to now + ``lease_ms`` (never
        shortening one: a hold's may be longer); returns how many were still held."""
        return _int(self._run("renew", self._renew_args(res_ids))[0])

    async def arenew(self, res_ids: Sequence[str]) -> int:
        """Async twin of :meth:`renew`."""
        return _int((await self._arun("renew", self._renew_args(res_ids)))[0])

    def _renew_args(self, res_ids: Sequence[str]) -> list[str | int]:
        if isinstance(res_ids, str):
            raise TypeError("res_ids must be a sequence of reservation ids, not a str")
        args: list[str | int] = [self.lease_ms, "0"]
        args += [_name("res_id", r) for r in res_ids]
        return args

    def restore(self, held: Sequence[tuple[str, int]]) -> list[str]:
        """:meth:`renew` the reservations ``held`` (id, cost) that this process has in
        flight, and record again those Redis lost (a restart, a flush, an eviction),
        distrusting every older read. Returns the ids recorded again."""
        args: list[str | int] = [self.lease_ms, "1"]
        for rid, cost in held:
            args += [_name("res_id", rid), _count("cost", cost)]
        return [_text(r) for r in self._run("renew", args)[1:]]

    # -- what the account holds ----------------------------------------------------------

    def committed(self) -> int:
        """The credits of the account's open holds."""
        return _int(self._run("committed", ()))

    async def acommitted(self) -> int:
        """Async twin of :meth:`committed`."""
        return _int(await self._arun("committed", ()))

    def survey(self) -> Survey:
        """What the account holds now (after removing expired leases)."""
        return _survey(self._run("survey", ()))

    async def asurvey(self) -> Survey:
        """Async twin of :meth:`survey`."""
        return _survey(await self._arun("survey", ()))


def _read_begin_args(token: str, budget_ms: int) -> list[str | int]:
    return [_name("token", token), duration_ms("budget_ms", budget_ms)]


def _read_done_args(token: str, start_seq: int, balance_json: str, total: int) -> list[str | int]:
    return [
        _name("token", token),
        _count("start_seq", start_seq),
        _ident("balance_json", balance_json),
        _count("total", total),
    ]


def _settle_args(
    res_id: str, gen: int, after_json: str, after_total: int, charged: int
) -> list[str | int]:
    if type(gen) is not int:
        raise ValueError(f"expected_gen must be an int, got {gen!r}")
    return [
        _name("res_id", res_id),
        gen,
        _ident("after_json", after_json),
        _count("after_total", after_total),
        _count("charged", charged),
    ]
