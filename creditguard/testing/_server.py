"""Serve an ASGI app (the sandbox) over real loopback HTTP with uvicorn, in a thread."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

from creditguard.testing._asgi import _Dropped


class _QuietFaults(logging.Filter):
    """Drop uvicorn's "Exception in ASGI application" for the sandbox's scripted drops."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, _Dropped)


def _quiet_scripted_faults() -> None:
    log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _QuietFaults) for f in log.filters):
        log.addFilter(_QuietFaults())


@contextlib.contextmanager
def serve(
    app: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
    log_level: str = "error",
) -> Iterator[str]:
    """Run ``app`` under uvicorn in a background thread; yield its base URL.

    ``port=0`` picks a free port. With ``ssl_certfile`` (and ``ssl_keyfile``) it serves
    HTTPS and yields an ``https://`` URL. Leaving the block stops the server (requests
    still running get a second to finish). Idle connections are kept 75 s, longer than
    clients keep them. Needs the ``sandbox`` extra (uvicorn).
    """
    try:
        import uvicorn
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "serving the sandbox needs uvicorn: pip install 'creditguard[sandbox]'"
        ) from exc

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        # A bound method (FakeLensmor.app) is not recognised as ASGI 3 by "auto".
        interface="asgi3",
        log_level=log_level,
        lifespan="on",
        access_log=False,
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
        timeout_graceful_shutdown=1,
        # Longer than any client's pool keeps an idle connection (httpx: 5 s), so the
        # client always closes first: with equal timeouts, a client could reuse a
        # connection the server is closing and get "connection reset" (a real race on a
        # loaded machine).
        timeout_keep_alive=75,
    )
    _quiet_scripted_faults()
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="creditguard-sandbox", daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError(f"the sandbox server could not start on {host}:{port}")
            thread.join(0.01)
        sock = server.servers[0].sockets[0]
        bound_port = sock.getsockname()[1]
        url_host = f"[{host}]" if ":" in host else host
        scheme = "https" if ssl_certfile else "http"
        yield f"{scheme}://{url_host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(10)
