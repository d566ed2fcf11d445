"""The sandbox over real HTTP: :class:`~._fake.FakeLensmor` as a pure ASGI app (HTTP and
lifespan), the request body it reads, and the scripted faults it acts out on the
connection (``_Dropped`` has the server close it)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import anyio

from creditguard.testing._lensmor import MAX_BODY
from creditguard.testing._paid import Served, _Pending

__all__ = ["Receive", "Scope", "Send", "_Dropped", "_asgi_app", "_read_body"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


async def _read_body(receive: Receive) -> bytes | None:
    """The request's body (at most ``MAX_BODY`` bytes and one more, so the endpoint can
    refuse it); ``None`` when the client went away first."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        if size <= MAX_BODY:
            chunks.append(chunk[: MAX_BODY + 1 - size])
            size += len(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class _Dropped(Exception):
    """Raised inside the ASGI app so the server closes the connection (a scripted fault)."""


async def _asgi_app(fake: Served, scope: Scope, receive: Receive, send: Send) -> None:
    """``fake`` as a pure ASGI app (HTTP and lifespan)."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    headers = dict(scope.get("headers") or [])
    auth = headers.get(b"authorization")
    path = scope["path"]
    body = b""
    if fake._serves_paid(path):
        read = await _read_body(receive)
        if read is None:
            return
        body = read
    result = fake._answer(
        scope["method"],
        path,
        scope.get("query_string", b"").decode("latin-1"),
        None if auth is None else auth.decode("latin-1"),
        body,
    )
    if isinstance(result, _Pending):
        try:
            await result.await_()
            answer = result.finish()
        finally:
            result.close()
    else:
        answer = result
        if fake.latency:
            await anyio.sleep(fake.latency)
    body = answer.body
    length = len(body)
    raw_headers = [(k.encode(), v.encode()) for k, v in answer.headers.items()]
    raw_headers.append((b"content-length", str(length).encode()))
    await send({"type": "http.response.start", "status": answer.status, "headers": raw_headers})
    if answer.fault == "drop":
        raise _Dropped("sandbox fault: connection dropped before the body")
    if answer.fault in ("stall", "truncated"):
        await send({"type": "http.response.body", "body": body[: length // 2], "more_body": True})
        if answer.fault == "truncated":
            raise _Dropped("sandbox fault: connection dropped mid-body")
        with anyio.move_on_after(fake.stall_seconds):
            while (await receive())["type"] != "http.disconnect":
                pass
        return
    await send({"type": "http.response.body", "body": body})
