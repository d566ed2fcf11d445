"""HTTP edge: read the balance with httpx, sync and async, over one shared core.

The request, the response parsing and the error mapping live in
:class:`~creditguard.lensmor.reader._Reader`, the retry decisions in
:class:`~creditguard.lensmor.retry._Attempts` (no I/O). :class:`BalanceClient` and
:class:`AsyncBalanceClient` only add the transport calls and the waiting; the async one
keeps a transport per event loop with :class:`~creditguard.core.loops.LoopKeeper`.
"""

from __future__ import annotations

import functools
import os
import ssl
import threading
import time
import weakref
from collections.abc import Mapping

import anyio
import httpx

from creditguard.core.loops import LoopKeeper
from creditguard.core.models import CreditBalance
from creditguard.lensmor.reader import (
    MAX_BODY_BYTES,
    _aerror_body,
    _error_body,
    _Reader,
)
from creditguard.lensmor.retry import (
    RetryPolicy,
    _Attempts,
    _Retry,
    parse_retry_after,
    rate_limit_wait,
)

__all__ = [
    "AsyncBalanceClient",
    "BalanceClient",
    "RetryPolicy",
    "parse_retry_after",
    "rate_limit_wait",
]

_monotonic = time.monotonic

# The sync clients of this process, told when it forks (see :func:`_after_fork`).
_clients: weakref.WeakSet[BalanceClient] = weakref.WeakSet()


def _after_fork() -> None:
    """In a forked child: each sync client lets go of the transport it made, whose
    kept-alive connections the parent still uses (two processes writing to one socket
    read each other's answers), without closing it (closing could end the parent's TLS
    sessions); its next read opens connections of its own."""
    for client in list(_clients):
        client._lock = threading.Lock()  # a parent's thread may have held the old one
        client._transport = client._given


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


class BalanceClient:
    """Sync balance reads over one httpx transport (thread-safe, created on first use).

    The request goes straight to the transport (``httpx.HTTPTransport``, or the one the
    guard was given): a balance read uses none of what ``httpx.Client`` adds around it
    (cookie jar, auth flows, redirects, event hooks), and that layer costs more CPU per
    read than the rest of the read together. No cookie jar also means nothing an answer
    sets can reach the requests of another key.
    """

    def __init__(
        self,
        reader: _Reader,
        *,
        transport: httpx.BaseTransport | None = None,
        verify: bool | ssl.SSLContext = True,
        missing: bool = False,
    ) -> None:
        self._reader = reader
        self._given = transport
        self._verify = verify
        self._missing = missing
        self._transport: httpx.BaseTransport | None = transport
        self._lock = threading.Lock()
        _clients.add(self)

    @property
    def usable(self) -> bool:
        """Whether sync reads can be made (not when the guard was given an async-only
        transport)."""
        return not self._missing

    def _get_transport(self) -> httpx.BaseTransport:
        transport = self._transport
        if transport is None:
            if self._missing:
                raise TypeError(
                    "the transport given to CreditGuard is async-only; sync calls need one"
                )
            with self._lock:
                if self._transport is None:
                    self._transport = httpx.HTTPTransport(verify=self._verify, trust_env=False)
                transport = self._transport
        return transport

    def read(self, request: httpx.Request) -> tuple[CreditBalance, float | None]:
        """Read the balance with ``request`` (from :meth:`_Reader.build`), retrying; with
        it, the seconds until the rate limit resets when the answer says none is left.

        One loop, no helper per attempt: a read that succeeds at once makes no call it
        does not need."""
        reader = self._reader
        transport = self._get_transport()
        deadline = _monotonic() + reader.policy.deadline
        attempts: _Attempts | None = None
        while True:
            sent = reader.for_attempt(request, attempts, deadline)
            chunks: list[bytes] = []  # joined once: linear however the body is split
            size = 0
            coding: str | None = None
            try:
                response = transport.handle_request(sent)
                try:
                    if response.status_code != 200:
                        raise reader.status_error(response, _error_body(response, deadline), sent)
                    if response.is_stream_consumed:
                        chunks.append(reader.in_memory(response))
                    else:
                        # Raw bytes: the limit is on what crossed the wire, not decoded.
                        coding = response.headers.get("content-encoding")
                        for chunk in response.iter_raw():
                            size += len(chunk)
                            if size > MAX_BODY_BYTES or _monotonic() >= deadline:
                                raise reader.body_error(size)
                            chunks.append(chunk)
                finally:
                    response.close()
            except _Retry as exc:
                retry = exc
            except httpx.HTTPError as exc:
                retry = reader.attempt_error(exc, sent)
            else:
                body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                return reader.parse(body, coding, sent), rate_limit_wait(response.headers)
            if attempts is None:
                attempts = _Attempts(reader.policy, deadline)
            wait = attempts.delay(retry)
            time.sleep(wait)

    def send(self, request: httpx.Request) -> tuple[httpx.Response, bytes]:
        """Send a one-shot request (the precheck); its answer and body (at most
        ``MAX_BODY_BYTES`` on the wire). Not retried."""
        reader = self._reader
        transport = self._get_transport()
        chunks: list[bytes] = []
        size = 0
        try:
            response = transport.handle_request(request)
            try:
                if response.is_stream_consumed:
                    chunks.append(reader.in_memory(response))
                else:
                    for chunk in response.iter_raw():
                        size += len(chunk)
                        if size > MAX_BODY_BYTES:
                            raise reader.body_error(size)
                        chunks.append(chunk)
            finally:
                response.close()
        except httpx.HTTPError as exc:
            raise reader.send_error(exc, request) from None
        response.request = request  # what its error message must not show: the key
        return response, b"".join(chunks)

    def close(self) -> None:
        """Close the transport (the guard's own, or the one it was given, as
        ``httpx.Client`` would); a later read opens a new one of its own or reuses the
        given one."""
        with self._lock:
            transport, self._transport = self._transport, self._given
        if transport is not None:
            transport.close()


async def _aclose_transport(transport: httpx.AsyncBaseTransport) -> None:
    await transport.aclose()


class AsyncBalanceClient:
    """Async balance reads over an httpx async transport, one per event loop.

    The guard's own ``httpx.AsyncHTTPTransport`` holds connections of the loop it first
    ran on, so a guard used from ``asyncio.run`` or ``anyio.run`` several times, from
    pytest's per-test loops or from loops in several threads opens one for each loop.
    Each is closed in its loop when that loop shuts down (see
    :class:`~creditguard.core.loops.LoopKeeper`), so a finished loop leaves no socket open
    and is not kept alive. A loop closed without finalizing its async generators
    (``loop.close()`` without ``shutdown_asyncgens()``) is let go, with its transport, the
    next time the guard meets a new loop or is closed. A transport the guard was given is
    used from every loop, as given.
    """

    def __init__(
        self,
        reader: _Reader,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        verify: bool | ssl.SSLContext = True,
        missing: bool = False,
    ) -> None:
        self._reader = reader
        self._given = transport
        self._missing = missing
        self._loops: LoopKeeper[httpx.AsyncBaseTransport] = LoopKeeper(_aclose_transport)
        self._new_transport = functools.partial(
            httpx.AsyncHTTPTransport, verify=verify, trust_env=False
        )

    @property
    def _transports(self) -> Mapping[object, httpx.AsyncBaseTransport]:
        """The guard's own transports held now, by loop (or trio token)."""
        return self._loops.held

    def _get_transport(self) -> httpx.AsyncBaseTransport:
        given = self._given
        if given is not None:
            return given
        if self._missing:
            raise TypeError("the transport given to CreditGuard is sync-only; async calls need one")
        return self._loops.get(self._new_transport)

    async def read(self, request: httpx.Request) -> tuple[CreditBalance, float | None]:
        """Read the balance with ``request`` (from :meth:`_Reader.build`), retrying; with
        it, the seconds until the rate limit resets when the answer says none is left.

        One loop, no helper per attempt: a read that succeeds at once makes no call it
        does not need (and no extra await hop)."""
        reader = self._reader
        transport = self._get_transport()
        deadline = _monotonic() + reader.policy.deadline
        attempts: _Attempts | None = None
        while True:
            sent = reader.for_attempt(request, attempts, deadline)
            chunks: list[bytes] = []  # joined once: linear however the body is split
            size = 0
            coding: str | None = None
            try:
                response = await transport.handle_async_request(sent)
                try:
                    if response.status_code != 200:
                        error_body = await _aerror_body(response, deadline)
                        raise reader.status_error(response, error_body, sent)
                    if response.is_stream_consumed:
                        chunks.append(reader.in_memory(response))
                    else:
                        # Raw bytes: the limit is on what crossed the wire, not decoded.
                        coding = response.headers.get("content-encoding")
                        async for chunk in response.aiter_raw():
                            size += len(chunk)
                            if size > MAX_BODY_BYTES or _monotonic() >= deadline:
                                raise reader.body_error(size)
                            chunks.append(chunk)
                finally:
                    await response.aclose()
            except _Retry as exc:
                retry = exc
            except httpx.HTTPError as exc:
                retry = reader.attempt_error(exc, sent)
            else:
                body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                return reader.parse(body, coding, sent), rate_limit_wait(response.headers)
            if attempts is None:
                attempts = _Attempts(reader.policy, deadline)
            wait = attempts.delay(retry)
            await anyio.sleep(wait)

    async def send(self, request: httpx.Request) -> tuple[httpx.Response, bytes]:
        """Async :meth:`BalanceClient.send`."""
        reader = self._reader
        transport = self._get_transport()
        chunks: list[bytes] = []
        size = 0
        try:
            response = await transport.handle_async_request(request)
            try:
                if response.is_stream_consumed:
                    chunks.append(reader.in_memory(response))
                else:
                    async for chunk in response.aiter_raw():
                        size += len(chunk)
                        if size > MAX_BODY_BYTES:
                            raise reader.body_error(size)
                        chunks.append(chunk)
            finally:
                await response.aclose()
        except httpx.HTTPError as exc:
            raise reader.send_error(exc, request) from None
        response.request = request  # what its error message must not show: the key
        return response, b"".join(chunks)

    async def aclose(self) -> None:
        """Close the transport of the current loop (or the given one) and have every other
        loop close its own."""
        if self._given is not None:
            await self._given.aclose()
        else:
            await self._loops.aclose(everywhere=True)

    def drop(self) -> None:
        """Let go of every per-loop transport (for sync ``close()``, which cannot await):
        each is closed in its own loop, at once for a loop that is gone."""
        self._loops.drop()
