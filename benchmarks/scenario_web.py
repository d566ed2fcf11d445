"""``web``: requests to a guarded web app over real loopback HTTP.

Three processes: this one (the clients), the **app server** (spawned), and the sandbox
(``FakeLensmor`` under uvicorn, ``latency = 0.005``, in a process of its own: the app's
upstream). The app server serves, each on a port of its own:

* ``fastapi_<kind>``: a FastAPI app under uvicorn (``creditguard.testing.serve``); the
  route is ``POST /events/{event_id}/unlock``, guarded with
  ``Depends(RequireCredits(1, guard=guard))``;
* ``flask_<kind>``: a Flask app under werkzeug's threaded server (a thread per
  connection, HTTP/1.1 keep-alive), the view decorated with ``@requires_credits(1)`` and
  the app with ``CreditGuardExtension(app, guard=guard)``;

where ``<kind>`` is ``unguarded`` (the same app without the guard), ``memory`` (a
``CreditGuard`` on ``MemoryBackend``) or ``redis`` (on ``RedisBackend``, on the run's
redis-server, a key prefix of its own: left out when the run has no redis-server). Every
request makes the paid call: the route POSTs ``/sandbox/charge?credits=1`` to the sandbox
through the app's own httpx client (created once per app), so the unguarded app is not
free either. Each guard has the library's default TTL (5 s) and plenty of credits.

The clients speak HTTP/1.1 over keep-alive connections with the least work a client can
do (a request prepared once, the answer parsed by its ``Content-Length``), so that on a
machine of few cores the client process takes as little CPU from the app server as it can.

Two loads per round, the frameworks' order rotating from round to round:

* ``@seq``: one request at a time from one connection; the three apps of a framework
  take turns in blocks of :data:`BLOCK` requests (the order rotating from block to
  block), every request timed;
* ``@conc<N>``: ``N`` (50) clients on asyncio, each with its own connection, making
  requests back to back; one app after another (the order rotating from round to round).

Per variant and round: throughput (requests per second: the entry's value), ``p50_ms`` and
``p99_ms`` (client-side request times), ``reads_per_request`` (balance requests the
sandbox served during the timed requests / requests), ``round_trips_per_request`` (Redis
variants: requests redis-py sent from the app server, see ``_redis.count_round_trips``)
and ``vs_unguarded`` (throughput / the unguarded app's, same framework, round and load).
A warm-up request per connection before timing opens the connections and reads the
balance once. An app may settle a request after its answer was sent (a balance read,
Redis round trips): each count after requests is taken once the counts have not moved
for :data:`QUIET` seconds, so that work is counted with the requests it belongs to and
not with the next variant's. Every timed request must answer 200 and make one charge.

Targets (reported, never asserted), per framework: guarded sequential requests at
least 0.9x the unguarded app's throughput with at most 0.05 balance reads per request
(memory); Redis adds at most 0.5 ms p50 per sequential request over memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import socket
import statistics
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager, suppress
from multiprocessing.connection import Connection
from typing import Any
from urllib.parse import urlsplit

import _redis
from _harness import (
    API_KEY,
    CHARGE_PATH,
    TTL,
    Recorder,
    RedisBenchGuard,
    Settings,
    Targets,
    add_target,
    median_ratio,
    rotated,
)
from _variants import Sandbox, auth_headers, sandbox_process

from creditguard import CreditGuard, MemoryBackend

SCENARIO = "web"
USES_REDIS = True
FRAMEWORKS = ("fastapi", "flask")
KINDS = ("unguarded", "memory", "redis")
COST = 1  # credits per request
BLOCK = 10  # requests per turn of an app in the sequential runs
QUIET = 0.03  # s: counts unmoved this long after requests: the apps' work after answering
PATH = "/events/ev-1/unlock"
# Targets (reported, never asserted)
SEQ_VS_UNGUARDED = 0.9
SEQ_READS_PER_REQUEST = 0.05
REDIS_P50_OVER_MEMORY_MS = 0.5


# --------------------------------------------------------------------------------------
# The app server process


def _guard(kind: str, sandbox_url: str, redis_url: str | None) -> CreditGuard | None:
    if kind == "unguarded":
        return None
    if kind == "memory":
        return CreditGuard(API_KEY, base_url=sandbox_url, ttl=TTL, backend=MemoryBackend())
    from creditguard.redis import RedisBackend

    assert redis_url is not None
    backend = RedisBackend(redis_url, prefix=f"bench-web-{uuid.uuid4().hex[:12]}:")
    return RedisBenchGuard(backend, api_key=API_KEY, base_url=sandbox_url, ttl=TTL)


def _upstream_limits() -> Any:
    import httpx

    # Every connection of the concurrent runs kept alive: no reconnecting to the sandbox
    # for some requests and not others.
    return httpx.Limits(max_connections=100, max_keepalive_connections=100)


def _fastapi_app(guard: CreditGuard | None, sandbox_url: str) -> Any:
    import httpx
    from fastapi import Depends, FastAPI

    from creditguard.fastapi import RequireCredits

    clients: list[httpx.AsyncClient] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        # The app's client, made on the server's event loop, closed with it.
        async with httpx.AsyncClient(
            base_url=sandbox_url, timeout=30, limits=_upstream_limits()
        ) as client:
            clients.append(client)
            try:
                yield
            finally:
                if guard is not None:
                    await guard.aclose()

    app = FastAPI(lifespan=lifespan)
    deps = [] if guard is None else [Depends(RequireCredits(COST, guard=guard))]
    params, headers = {"credits": str(COST)}, auth_headers()

    @app.post("/events/{event_id}/unlock", dependencies=deps)
    async def unlock(event_id: str) -> dict[str, str]:
        paid = await clients[0].post(CHARGE_PATH, params=params, headers=headers)
        paid.raise_for_status()
        return {"event": event_id}

    return app


def _flask_app(name: str, guard: CreditGuard | None, sandbox_url: str) -> tuple[Any, Any]:
    import httpx
    from flask import Flask

    from creditguard.flask import CreditGuardExtension, requires_credits

    client = httpx.Client(base_url=sandbox_url, timeout=30, limits=_upstream_limits())
    params, headers = {"credits": str(COST)}, auth_headers()
    app = Flask(f"bench_web_{name}")

    def unlock(event_id: str) -> dict[str, str]:
        client.post(CHARGE_PATH, params=params, headers=headers).raise_for_status()
        return {"event": event_id}

    view = unlock
    if guard is not None:
        CreditGuardExtension(app, guard=guard)
        view = requires_credits(COST)(unlock)
    app.add_url_rule("/events/<event_id>/unlock", view_func=view, methods=["POST"])
    return app, client


@contextmanager
def _serve_wsgi(app: Any) -> Iterator[str]:
    """``app`` under werkzeug's threaded server (HTTP/1.1, keep-alive) in a thread."""
    from werkzeug.serving import WSGIRequestHandler, make_server

    class Quiet(WSGIRequestHandler):
        def log(self, type: str, message: str, *args: Any) -> None:
            pass

    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def _app_main(conn: Connection, sandbox_url: str, redis_url: str | None) -> None:
    """Child process: serve every app; answer ``"trips"`` (Redis round trips so far)."""
    from creditguard.testing import serve

    try:
        kinds = [k for k in KINDS if k != "redis" or redis_url is not None]
        with contextlib.ExitStack() as stack, _redis.count_round_trips() as trips:
            urls: dict[str, str] = {}
            for kind in kinds:
                guard = _guard(kind, sandbox_url, redis_url)  # closed in the app's lifespan
                urls[f"fastapi_{kind}"] = stack.enter_context(
                    serve(_fastapi_app(guard, sandbox_url))
                )
            for kind in kinds:
                guard = _guard(kind, sandbox_url, redis_url)
                if guard is not None:
                    stack.callback(guard.close)
                app, client = _flask_app(kind, guard, sandbox_url)
                stack.callback(client.close)
                urls[f"flask_{kind}"] = stack.enter_context(_serve_wsgi(app))
            conn.send(urls)
            while conn.recv() == "trips":
                conn.send(trips.count)
    except BaseException as exc:
        with suppress(OSError):
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        raise


class AppServer:
    """The app server process, behind a pipe."""

    def __init__(self, conn: Connection, urls: dict[str, str]) -> None:
        self._conn = conn
        self.urls = urls

    def round_trips(self) -> int:
        """Requests redis-py has sent from the app server so far."""
        self._conn.send("trips")
        return int(self._conn.recv())


@contextmanager
def app_server(sandbox_url: str, redis_url: str | None) -> Iterator[AppServer]:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_app_main, args=(child, sandbox_url, redis_url), daemon=True)
    process.start()
    try:
        if not parent.poll(120):
            raise RuntimeError("the app server process did not start")
        urls = parent.recv()
        if isinstance(urls, tuple):
            raise RuntimeError(f"the app server process failed: {urls[1]}")
        yield AppServer(parent, urls)
    finally:
        with suppress(OSError):
            parent.send("stop")
        process.join(15)
        if process.is_alive():
            process.terminate()
            process.join()


# --------------------------------------------------------------------------------------
# The clients: keep-alive HTTP/1.1, as little work per request as a client can do


class BadAnswer(RuntimeError):
    pass


def _request_bytes(url: str) -> tuple[str, int, bytes]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = f"POST {PATH} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: 0\r\n\r\n"
    return host, port, request.encode()


def _parse_head(head: bytes) -> tuple[int, int, bool]:
    """(status, content length, whether the server closes the connection)."""
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length, close = -1, False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "connection":
            close = value.strip().lower() == "close"
    if length < 0:
        raise BadAnswer(f"an answer without Content-Length: {head!r}")
    return status, length, close


class Client:
    """One keep-alive connection, one request at a time."""

    def __init__(self, url: str) -> None:
        self._host, self._port, self._request = _request_bytes(url)
        self._sock: socket.socket | None = None
        self._buf = b""

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self._host, self._port), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = b""
        return sock

    def post(self) -> None:
        sock = self._sock or self._connect()
        self._sock = None
        sock.sendall(self._request)
        buf = self._buf
        while (end := buf.find(b"\r\n\r\n")) < 0:
            chunk = sock.recv(65536)
            if not chunk:
                raise BadAnswer("the server closed the connection")
            buf += chunk
        status, length, close = _parse_head(buf[:end])
        buf = buf[end + 4 :]
        while len(buf) < length:
            chunk = sock.recv(65536)
            if not chunk:
                raise BadAnswer("the server closed the connection mid-answer")
            buf += chunk
        if status != 200:
            raise BadAnswer(f"answered {status}: {buf[:length]!r}")
        self._buf = buf[length:]
        if close:
            sock.close()
        else:
            self._sock = sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class AsyncClient:
    """The asyncio twin of :class:`Client`."""

    def __init__(self, url: str) -> None:
        self._host, self._port, self._request = _request_bytes(url)
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post(self) -> None:
        if self._streams is None:
            self._streams = await asyncio.open_connection(self._host, self._port)
            sock = self._streams[1].get_extra_info("socket")
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader, writer = self._streams
        writer.write(self._request)
        head = await reader.readuntil(b"\r\n\r\n")
        status, length, close = _parse_head(head[:-4])
        body = await reader.readexactly(length)
        if status != 200:
            raise BadAnswer(f"answered {status}: {body!r}")
        if close:
            await self.aclose()

    async def aclose(self) -> None:
        if self._streams is not None:
            writer = self._streams[1]
            self._streams = None
            writer.close()
            with suppress(OSError):
                await writer.wait_closed()


# --------------------------------------------------------------------------------------
# Measuring


def _p99(times: Sequence[float]) -> float:
    ordered = sorted(times)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


class Counts:
    """What the upstreams saw during timed requests: balance reads, charges, Redis round
    trips (asked for only when a Redis variant is timed)."""

    def __init__(self, sandbox: Sandbox, app: AppServer) -> None:
        self._sandbox, self._app = sandbox, app

    def now(self, redis: bool, *, after: bool = False) -> tuple[int, int, int]:
        """The counts so far; ``after`` timed requests, once they have not moved for
        :data:`QUIET` seconds: an app may settle a request (a balance read, Redis round
        trips) after its answer was sent, and that work is the request's, not the next
        variant's."""
        counts = self._counts(redis)
        while after:  # until nothing moved for QUIET seconds
            time.sleep(QUIET)
            counts, before = self._counts(redis), counts
            after = counts != before
        return counts

    def _counts(self, redis: bool) -> tuple[int, int, int]:
        reads, charges = self._sandbox.stats()
        return reads, charges, self._app.round_trips() if redis else 0


# variant -> (requests, seconds, balance reads, Redis round trips, each request's seconds)
Result = dict[str, tuple[int, float, int, int, list[float]]]


def _sequential(names: Sequence[str], app: AppServer, counts: Counts, n: int, r: int) -> Result:
    """The apps ``names`` side by side, one request at a time, in interleaved blocks."""
    clients = {name: Client(app.urls[name]) for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    reads = dict.fromkeys(names, 0)
    trips = dict.fromkeys(names, 0)
    clock = time.perf_counter
    try:
        for client in clients.values():
            client.post()  # warm-up: the connection, the guard's first balance read
        counts.now(False, after=True)  # the warm-ups' own work done before counting
        for b in range(max(1, math.ceil(n / BLOCK))):
            for name in rotated(names, r + b):
                redis = name.endswith("_redis")
                post, each = clients[name].post, times[name]
                reads0, charges0, trips0 = counts.now(redis)
                for _ in range(BLOCK):
                    start = clock()
                    post()
                    each.append(clock() - start)
                reads1, charges1, trips1 = counts.now(redis, after=True)
                assert charges1 - charges0 == BLOCK, (name, charges1 - charges0)
                reads[name] += reads1 - reads0
                trips[name] += trips1 - trips0
    finally:
        for client in clients.values():
            client.close()
    return {name: (len(ts), sum(ts), reads[name], trips[name], ts) for name, ts in times.items()}


async def _burst(
    name: str, app: AppServer, counts: Counts, concurrency: int, per_client: int
) -> Result:
    """``concurrency`` clients, each on its own connection, ``per_client`` requests each,
    released together after one untimed warm-up request each."""
    clients = [AsyncClient(app.urls[name]) for _ in range(concurrency)]
    times: list[float] = []
    clock = time.perf_counter
    redis = name.endswith("_redis")
    go = asyncio.Event()

    async def work(client: AsyncClient) -> None:
        await go.wait()
        post, each = client.post, times.append
        for _ in range(per_client):
            start = clock()
            await post()
            each(clock() - start)

    try:
        await asyncio.gather(*(client.post() for client in clients))  # warm-up
        reads0, charges0, trips0 = counts.now(redis, after=True)  # untimed
        tasks = [asyncio.create_task(work(client)) for client in clients]
        await asyncio.sleep(0)  # every task waiting on go
        start = clock()
        go.set()
        await asyncio.gather(*tasks)
        seconds = clock() - start
        reads1, charges1, trips1 = counts.now(redis, after=True)
    finally:
        await asyncio.gather(*(client.aclose() for client in clients))
    done = concurrency * per_client
    assert charges1 - charges0 == done, (name, charges1 - charges0)
    return {name: (done, seconds, reads1 - reads0, trips1 - trips0, times)}


def _concurrent(name: str, app: AppServer, counts: Counts, concurrency: int, n: int) -> Result:
    per_client = max(1, math.ceil(n / concurrency))
    return asyncio.run(_burst(name, app, counts, concurrency, per_client))


def _record(rec: Recorder, level: str, results: Result, framework: str) -> None:
    unguarded = results.get(f"{framework}_unguarded")
    for name, (done, seconds, reads, trips, each) in results.items():
        extra: dict[str, float] = {
            "p50_ms": statistics.median(each) * 1e3,
            "p99_ms": _p99(each) * 1e3,
            "reads_per_request": reads / done,
        }
        if name.endswith("_redis"):
            extra["round_trips_per_request"] = trips / done
        if unguarded is not None:
            extra["vs_unguarded"] = (done / seconds) / (unguarded[0] / unguarded[1])
        rec.add(SCENARIO, f"{name}@{level}", done / seconds, "req/s", requests=done, **extra)


def run(settings: Settings, rec: Recorder) -> None:
    redis_url = _redis.SERVER.url
    kinds = [k for k in KINDS if k != "redis" or redis_url is not None]
    conc = settings.web_concurrency
    with sandbox_process(settings.latency) as sandbox, app_server(sandbox.url, redis_url) as app:
        counts = Counts(sandbox, app)
        for r in range(settings.rounds):
            for framework in rotated(FRAMEWORKS, r):
                names = [f"{framework}_{kind}" for kind in kinds]
                seq = _sequential(names, app, counts, settings.web_sequential_requests, r)
                _record(rec, "seq", seq, framework)
                burst: Result = {}
                for name in rotated(names, r):
                    burst |= _concurrent(name, app, counts, conc, settings.web_concurrent_requests)
                _record(rec, f"conc{conc}", {name: burst[name] for name in names}, framework)


def _median_extra(rec: Recorder, variant: str, name: str) -> float | None:
    values = rec.extras(SCENARIO, variant, name)
    return statistics.median(values) if values else None


def _median_difference(rec: Recorder, a: str, b: str, name: str) -> float | None:
    """Median over rounds of (``a``'s ``name`` - ``b``'s) in the same round."""
    xs, ys = rec.extras(SCENARIO, a, name), rec.extras(SCENARIO, b, name)
    if not xs or len(xs) != len(ys):
        return None
    return statistics.median(x - y for x, y in zip(xs, ys, strict=True))


def targets(rec: Recorder, settings: Settings) -> Targets:
    out: Targets = {}
    for fw in FRAMEWORKS:
        server = "uvicorn" if fw == "fastapi" else "werkzeug, threaded"
        add_target(
            out,
            f"web.{fw}_memory_seq_vs_unguarded",
            f"{fw} ({server}), one request at a time, memory backend: guarded / unguarded"
            " app's throughput (median of per-round ratios)",
            median_ratio(rec, SCENARIO, f"{fw}_memory@seq", f"{fw}_unguarded@seq"),
            ">=",
            SEQ_VS_UNGUARDED,
        )
        add_target(
            out,
            f"web.{fw}_memory_seq_reads_per_request",
            f"{fw}, one request at a time, memory backend: upstream balance reads per request"
            " (median over rounds)",
            _median_extra(rec, f"{fw}_memory@seq", "reads_per_request"),
            "<=",
            SEQ_READS_PER_REQUEST,
        )
        add_target(
            out,
            f"web.{fw}_redis_seq_p50_over_memory_ms",
            f"{fw}, one request at a time: the Redis backend's p50 request time - the memory"
            " backend's, ms (median of per-round differences)",
            _median_difference(rec, f"{fw}_redis@seq", f"{fw}_memory@seq", "p50_ms"),
            "<=",
            REDIS_P50_OVER_MEMORY_MS,
        )
    return out
