"""The variants the scenarios compare, and what they run on: in-memory upstreams, the
hand-written guards (naive, cachetools) and their balance readers, the builders that wrap
an action in a variant, the drivers that call it from threads or tasks, and the sandbox
served over loopback HTTP in a process of its own."""

from __future__ import annotations

import dataclasses
import gc
import itertools
import json
import multiprocessing
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from contextlib import contextmanager
from multiprocessing.connection import Connection
from typing import Any, TypeVar

import anyio
import cachetools
import httpx
from _harness import API_KEY, BALANCE_PATH, CHARGE_PATH, GUARDS, PLENTY, TTL

from creditguard import InsufficientCredits
from creditguard.testing import FakeLensmor, serve

R = TypeVar("R")

SyncCall = Callable[[], object]
AsyncCall = Callable[[], Awaitable[object]]
Scope = MutableMapping[str, Any]  # ASGI
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
_raw_decode = json.JSONDecoder().raw_decode


# --------------------------------------------------------------------------------------
# Upstreams


# A realistic balance (FakeLensmor's default account). The static upstream never
# charges, and every guarded call releases its reservation, so it never runs out.
BALANCE_BODY = json.dumps(
    {
        "totalAmount": 30050,
        "totalBalance": 30050,
        "subscriptionAmount": 30000,
        "subscriptionBalance": 30000,
        "giftAmount": 50,
        "giftBalance": 50,
        "resetAt": 1767225600000,
    }
).encode()
JSON_HEADERS = {"content-type": "application/json"}


class StaticUpstream:
    """A minimal in-memory credits service: the documented balance JSON for any key.

    Zero latency; counts requests (used from one thread at a time). ``transport`` serves
    sync and async httpx clients.
    """

    def __init__(self) -> None:
        self.requests = 0
        self.transport = httpx.MockTransport(self._handle)

    def _handle(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        return httpx.Response(200, content=BALANCE_BODY, headers=JSON_HEADERS)


def auth_headers(api_key: str = API_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"}


# --------------------------------------------------------------------------------------
# The hand-written guards the library is compared with


class BalanceReader:
    """A balance read as application code writes it (``client.get`` + ``.json()``): what
    the ``naive`` guard does twice per call and ``cachetools`` once per cache miss."""

    def __init__(self, client: httpx.Client, base_url: str, api_key: str = API_KEY) -> None:
        self._client = client
        self._url = base_url + BALANCE_PATH
        self._headers = auth_headers(api_key)

    def read(self) -> int:
        response = self._client.get(self._url, headers=self._headers)
        response.raise_for_status()
        return int(response.json()["totalBalance"])


class AsyncBalanceReader:
    def __init__(self, client: httpx.AsyncClient, base_url: str, api_key: str = API_KEY) -> None:
        self._client = client
        self._url = base_url + BALANCE_PATH
        self._headers = auth_headers(api_key)

    async def read(self) -> int:
        response = await self._client.get(self._url, headers=self._headers)
        response.raise_for_status()
        return int(response.json()["totalBalance"])


class FloorReader:
    """The cheapest balance read httpx allows: a request built once and handed to the
    transport (``transport.handle_request``, httpx's transport API), the body streamed with
    ``iter_bytes`` and parsed with ``json.JSONDecoder.raw_decode`` (what ``json.loads``
    does once it has sniffed the encoding and skipped whitespace). creditguard reads the
    same way, so the guard's own logic is what a guarded call costs beyond the action and
    this many reads: the floor gets every shortcut the guard's own read takes.
    """

    def __init__(self, transport: httpx.BaseTransport, base_url: str, api_key: str = API_KEY):
        self._transport = transport
        self._request = httpx.Request("GET", base_url + BALANCE_PATH, headers=auth_headers(api_key))

    def read(self) -> int:
        response = self._transport.handle_request(self._request)
        try:
            body = b"".join(response.iter_bytes())
        finally:
            response.close()
        if response.status_code != 200:
            raise RuntimeError(f"balance read answered {response.status_code}")
        return int(_raw_decode(body.decode())[0]["totalBalance"])


class AsyncFloorReader:
    def __init__(
        self, transport: httpx.AsyncBaseTransport, base_url: str, api_key: str = API_KEY
    ) -> None:
        self._transport = transport
        self._request = httpx.Request("GET", base_url + BALANCE_PATH, headers=auth_headers(api_key))

    async def read(self) -> int:
        response = await self._transport.handle_async_request(self._request)
        try:
            body = b"".join([chunk async for chunk in response.aiter_bytes()])
        finally:
            await response.aclose()
        if response.status_code != 200:
            raise RuntimeError(f"balance read answered {response.status_code}")
        return int(_raw_decode(body.decode())[0]["totalBalance"])


class SendReader:
    """A balance read through ``httpx.Client.send`` with a request built once: the
    cheapest read through the client layer (cookies, auth, redirects, event hooks)."""

    def __init__(self, client: httpx.Client, base_url: str, api_key: str = API_KEY) -> None:
        self._client = client
        self._request = client.build_request(
            "GET", base_url + BALANCE_PATH, headers=auth_headers(api_key)
        )

    def read(self) -> int:
        response = self._client.send(self._request)
        response.raise_for_status()
        return int(json.loads(response.content)["totalBalance"])


class AsyncSendReader:
    def __init__(self, client: httpx.AsyncClient, base_url: str, api_key: str = API_KEY) -> None:
        self._client = client
        self._request = client.build_request(
            "GET", base_url + BALANCE_PATH, headers=auth_headers(api_key)
        )

    async def read(self) -> int:
        response = await self._client.send(self._request)
        response.raise_for_status()
        return int(json.loads(response.content)["totalBalance"])


class NaiveGuard:
    """GET the balance, compare, call, GET the balance again."""

    def __init__(self, reader: BalanceReader) -> None:
        self._read = reader.read
        self.balance_after: int | None = None

    def requires_credits(self, cost: int) -> Callable[[Callable[[], R]], Callable[[], R]]:
        def decorate(action: Callable[[], R]) -> Callable[[], R]:
            def guarded() -> R:
                balance = self._read()
                if balance < cost:
                    raise InsufficientCredits(cost, balance)
                result = action()
                self.balance_after = self._read()
                return result

            return guarded

        return decorate


class AsyncNaiveGuard:
    def __init__(self, reader: AsyncBalanceReader) -> None:
        self._read = reader.read
        self.balance_after: int | None = None

    def requires_credits(
        self, cost: int
    ) -> Callable[[Callable[[], Awaitable[R]]], Callable[[], Awaitable[R]]]:
        def decorate(action: Callable[[], Awaitable[R]]) -> Callable[[], Awaitable[R]]:
            async def guarded() -> R:
                balance = await self._read()
                if balance < cost:
                    raise InsufficientCredits(cost, balance)
                result = await action()
                self.balance_after = await self._read()
                return result

            return guarded

        return decorate


class CachetoolsGuard:
    """A ``cachetools.cached(TTLCache, lock=...)`` balance read before the call, cleared
    after it: concurrent misses each read (no single flight), nothing is reserved."""

    def __init__(self, reader: BalanceReader, ttl: float = TTL) -> None:
        self._read = cachetools.cached(
            cachetools.TTLCache(maxsize=1, ttl=ttl), lock=threading.Lock()
        )(reader.read)

    def requires_credits(self, cost: int) -> Callable[[Callable[[], R]], Callable[[], R]]:
        def decorate(action: Callable[[], R]) -> Callable[[], R]:
            def guarded() -> R:
                balance = self._read()
                if balance < cost:
                    raise InsufficientCredits(cost, balance)
                try:
                    return action()
                finally:
                    self._read.cache_clear()

            return guarded

        return decorate


class AsyncCachetoolsGuard:
    """The async twin of :class:`CachetoolsGuard`. ``cachetools.cached`` cannot wrap a
    coroutine function, so this is its locked wrapper written out: look up under the
    lock, read outside it on a miss (no single flight), store with ``setdefault``."""

    _KEY = "balance"

    def __init__(self, reader: AsyncBalanceReader, ttl: float = TTL) -> None:
        self._reader = reader
        self._cache: cachetools.TTLCache[str, int] = cachetools.TTLCache(maxsize=1, ttl=ttl)
        self._lock = threading.Lock()

    async def read(self) -> int:
        with self._lock:
            cached = self._cache.get(self._KEY)
        if cached is not None:
            return cached
        value = await self._reader.read()
        with self._lock:
            return self._cache.setdefault(self._KEY, value)

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()

    def requires_credits(
        self, cost: int
    ) -> Callable[[Callable[[], Awaitable[R]]], Callable[[], Awaitable[R]]]:
        def decorate(action: Callable[[], Awaitable[R]]) -> Callable[[], Awaitable[R]]:
            async def guarded() -> R:
                balance = await self.read()
                if balance < cost:
                    raise InsufficientCredits(cost, balance)
                try:
                    return await action()
                finally:
                    self.clear()

            return guarded

        return decorate


# --------------------------------------------------------------------------------------
# Building a variant around an action


@dataclasses.dataclass
class SyncVariant:
    call: SyncCall
    close: Callable[[], None]


@dataclasses.dataclass
class AsyncVariant:
    call: AsyncCall
    aclose: Callable[[], Awaitable[None]]


def _nothing() -> None:
    return None


async def _anothing() -> None:
    return None


# A guard flavour's name with this suffix: the action in a ``with guard.spend(cost):``
# block (``async with`` on the async side) instead of decorated.
SPEND_SUFFIX = "_spend"


def build_sync(
    name: str,
    action: SyncCall,
    *,
    client: httpx.Client,
    base_url: str,
    transport: httpx.BaseTransport | None,
    cost: int = 1,
    ttl: float = TTL,
) -> SyncVariant:
    """``name`` guarding ``action``; naive and cachetools read through ``client`` (the
    app's own), creditguard through its own client on ``transport`` (None: real HTTP).
    ``one_read`` is no guard: the action, then one balance read as cheap as httpx allows
    on a transport of its own, as creditguard reads (the least a guard that reads once
    after the action can cost). ``<flavour>_spend`` is the flavour's guard around the action
    as a ``with guard.spend(cost):`` block instead of a decorator. Guards admit calls of
    ``cost`` credits and trust a balance read for ``ttl`` seconds."""
    if name == "bare":
        return SyncVariant(action, _nothing)
    if name == "naive":
        naive = NaiveGuard(BalanceReader(client, base_url))
        return SyncVariant(naive.requires_credits(cost)(action), _nothing)
    if name == "cachetools":
        cached = CachetoolsGuard(BalanceReader(client, base_url), ttl=ttl)
        return SyncVariant(cached.requires_credits(cost)(action), _nothing)
    if name == "one_read":
        own = transport or httpx.HTTPTransport()
        read = FloorReader(own, base_url).read

        def action_then_read() -> None:
            action()
            read()

        return SyncVariant(action_then_read, own.close if transport is None else _nothing)
    flavour = name.removesuffix(SPEND_SUFFIX)
    guard = GUARDS[flavour](api_key=API_KEY, base_url=base_url, transport=transport, ttl=ttl)
    if flavour == name:
        return SyncVariant(guard.requires_credits(cost)(action), guard.close)
    spend = guard.spend

    def spending() -> object:
        with spend(cost):
            return action()

    return SyncVariant(spending, guard.close)


def build_async(
    name: str,
    action: AsyncCall,
    *,
    client: httpx.AsyncClient,
    base_url: str,
    transport: httpx.AsyncBaseTransport | None,
    cost: int = 1,
    ttl: float = TTL,
) -> AsyncVariant:
    if name == "bare":
        return AsyncVariant(action, _anothing)
    if name == "naive":
        naive = AsyncNaiveGuard(AsyncBalanceReader(client, base_url))
        return AsyncVariant(naive.requires_credits(cost)(action), _anothing)
    if name == "cachetools":
        cached = AsyncCachetoolsGuard(AsyncBalanceReader(client, base_url), ttl=ttl)
        return AsyncVariant(cached.requires_credits(cost)(action), _anothing)
    if name == "one_read":
        own = transport or httpx.AsyncHTTPTransport()
        aread = AsyncFloorReader(own, base_url).read

        async def action_then_read() -> None:
            await action()
            await aread()

        return AsyncVariant(action_then_read, own.aclose if transport is None else _anothing)
    flavour = name.removesuffix(SPEND_SUFFIX)
    guard = GUARDS[flavour](api_key=API_KEY, base_url=base_url, transport=transport, ttl=ttl)
    if flavour == name:
        return AsyncVariant(guard.requires_credits(cost)(action), guard.aclose)
    spend = guard.spend

    async def spending() -> object:
        async with spend(cost):
            return await action()

    return AsyncVariant(spending, guard.aclose)


def charge_action(client: httpx.Client) -> SyncCall:
    """The paid action: spend one credit through the sandbox's charge endpoint."""
    headers = auth_headers()

    def charge() -> None:
        client.post(CHARGE_PATH, params={"credits": "1"}, headers=headers).raise_for_status()

    return charge


def async_charge_action(client: httpx.AsyncClient) -> AsyncCall:
    headers = auth_headers()

    async def charge() -> None:
        response = await client.post(CHARGE_PATH, params={"credits": "1"}, headers=headers)
        response.raise_for_status()

    return charge


def unlock_action(client: httpx.Client) -> Callable[[], httpx.Response]:
    """A paid action that answers like Lensmor's event unlock: each call unlocks a new
    event (2000 credits) and returns the answer, with ``creditsUsed`` and
    ``balanceAfter``, from which the guard can settle without a balance read."""
    headers = auth_headers()
    ids = itertools.count()

    def unlock() -> httpx.Response:
        answer = client.post(f"/external/events/bench-{next(ids)}/unlock", headers=headers)
        return answer.raise_for_status()

    return unlock


def async_unlock_action(client: httpx.AsyncClient) -> Callable[[], Awaitable[httpx.Response]]:
    headers = auth_headers()
    ids = itertools.count()

    async def unlock() -> httpx.Response:
        answer = await client.post(f"/external/events/bench-{next(ids)}/unlock", headers=headers)
        return answer.raise_for_status()

    return unlock


# --------------------------------------------------------------------------------------
# Drivers


def run_threads(call: SyncCall, workers: int, per_worker: int) -> float:
    """``workers`` threads each making ``per_worker`` calls, released together; seconds."""
    barrier = threading.Barrier(workers + 1)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            barrier.wait()
            for _ in range(per_worker):
                call()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, daemon=True) for _ in range(workers)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return elapsed


async def run_tasks(call: AsyncCall, workers: int, per_worker: int) -> float:
    """``workers`` tasks each making ``per_worker`` calls; seconds."""

    async def work() -> None:
        for _ in range(per_worker):
            await call()

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(workers):
            tg.start_soon(work)
    return time.perf_counter() - start


def per_call_us(call: SyncCall, n: int) -> float:
    gc.collect()
    start = time.perf_counter()
    for _ in range(n):
        call()
    return (time.perf_counter() - start) / n * 1e6


async def aper_call_us(call: AsyncCall, n: int) -> float:
    gc.collect()
    start = time.perf_counter()
    for _ in range(n):
        await call()
    return (time.perf_counter() - start) / n * 1e6


def noop() -> None:
    return None


async def anoop() -> None:
    return None


def new_fake(latency: float) -> FakeLensmor:
    return FakeLensmor(api_key=API_KEY, subscription_balance=PLENTY, latency=latency)


# --------------------------------------------------------------------------------------
# The sandbox over real loopback HTTP, served by uvicorn in a process of its own


def _sandbox_main(conn: Connection, latency: float, resettable: bool = False) -> None:
    """Child process: serve a FakeLensmor over loopback HTTP; answer stats requests.

    With ``resettable``, the server hands every request to the current FakeLensmor, which
    ``("reset", balance)`` replaces with a fresh account holding ``balance`` credits (its
    counters at zero), and ``"account"`` also reports the balance. Without it, the server
    serves one FakeLensmor with plenty of credits directly."""
    current = [new_fake(latency)]

    async def switch(scope: Scope, receive: Receive, send: Send) -> None:
        await current[0].app(scope, receive, send)

    with serve(switch if resettable else current[0].app) as url:
        conn.send(url)
        while True:
            message = conn.recv()
            fake = current[0]
            if message == "stats":
                conn.send((fake.balance_requests, fake.charges))
            elif message == "account":
                conn.send((fake.balance_requests, fake.charges, fake.balance.total_balance))
            elif resettable and isinstance(message, tuple) and message[0] == "reset":
                current[0] = FakeLensmor(
                    api_key=API_KEY,
                    subscription_balance=message[1],
                    gift_balance=0,
                    latency=latency,
                )
                conn.send("reset")
            else:
                return


class Sandbox:
    """The sandbox in its own process, so its CPU time and GIL are not the client's."""

    def __init__(self, conn: Connection, url: str) -> None:
        self._conn = conn
        self.url = url

    def stats(self) -> tuple[int, int]:
        """(balance requests, charges) served so far."""
        self._conn.send("stats")
        reads, charges = self._conn.recv()
        return int(reads), int(charges)

    def account(self) -> tuple[int, int, int]:
        """(balance requests, charges, total balance): read from the sandbox's own state,
        so asking counts as no balance request."""
        self._conn.send("account")
        reads, charges, balance = self._conn.recv()
        return int(reads), int(charges), int(balance)

    def reset(self, balance: int) -> None:
        """A fresh account of ``balance`` credits with its counters at zero (a sandbox
        started with ``resettable=True`` only)."""
        self._conn.send(("reset", balance))
        if self._conn.recv() != "reset":
            raise RuntimeError("the sandbox did not reset")


@contextmanager
def sandbox_process(latency: float, *, resettable: bool = False) -> Iterator[Sandbox]:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_sandbox_main, args=(child, latency, resettable), daemon=True)
    process.start()
    try:
        if not parent.poll(60):
            raise RuntimeError("the sandbox process did not start")
        yield Sandbox(parent, str(parent.recv()))
    finally:
        parent.send("stop")
        process.join(15)
        if process.is_alive():
            process.terminate()
            process.join()
