"""How the sandbox's answers reach a client in process: the httpx transport (sync and
async) that serves :class:`~._fake.FakeLensmor`, and the answer bodies it streams (and the
scripted faults it acts out on them). Over real HTTP, see ``_asgi.py``."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator

import anyio
import httpx

from creditguard.testing._paid import Served, _Pending
from creditguard.testing._wire import _Answer


class _FakeTransport(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """The sandbox as an httpx transport for both sync and async clients."""

    def __init__(self, fake: Served) -> None:
        self._fake = fake

    def _result(self, request: httpx.Request, body: bytes) -> _Answer | _Pending:
        return self._fake._answer(
            request.method,
            request.url.path,
            request.url.query.decode("latin-1"),
            request.headers.get("authorization"),
            body,
        )

    @staticmethod
    def _checked(answer: _Answer, request: httpx.Request) -> _Answer:
        if answer.fault == "drop":
            raise httpx.RemoteProtocolError(
                "Server disconnected without sending a response.", request=request
            )
        return answer

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self._fake._serves_paid(request.url.path):
            result = self._result(request, request.read())
        else:
            if self._fake.latency:
                time.sleep(self._fake.latency)
            result = self._result(request, b"")
        if isinstance(result, _Pending):
            pending = result
            try:
                pending.wait()
                result = pending.finish()
            finally:
                pending.close()
        answer = self._checked(result, request)
        return httpx.Response(
            answer.status, headers=answer.headers, stream=_SyncBody(answer, request)
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._fake._serves_paid(request.url.path):
            result = self._result(request, await request.aread())
        else:
            if self._fake.latency:
                await anyio.sleep(self._fake.latency)
            result = self._result(request, b"")
        if isinstance(result, _Pending):
            pending = result
            try:
                await pending.await_()
                result = pending.finish()
            finally:
                pending.close()
        answer = self._checked(result, request)
        return httpx.Response(
            answer.status, headers=answer.headers, stream=_AsyncBody(answer, request)
        )


def _body_chunks(answer: _Answer, request: httpx.Request) -> Iterator[bytes]:
    if answer.fault in ("stall", "truncated"):
        yield answer.body[: len(answer.body) // 2]
        if answer.fault == "stall":
            # In process there is no socket to time out on: report what the client's read
            # timeout would have said.
            raise httpx.ReadTimeout("sandbox fault: the body stalled", request=request)
        raise httpx.RemoteProtocolError(
            "peer closed connection without sending complete message body", request=request
        )
    yield answer.body


class _SyncBody(httpx.SyncByteStream):
    def __init__(self, answer: _Answer, request: httpx.Request) -> None:
        self._answer = answer
        self._request = request

    def __iter__(self) -> Iterator[bytes]:
        return _body_chunks(self._answer, self._request)


class _AsyncBody(httpx.AsyncByteStream):
    def __init__(self, answer: _Answer, request: httpx.Request) -> None:
        self._answer = answer
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in _body_chunks(self._answer, self._request):
            yield chunk
