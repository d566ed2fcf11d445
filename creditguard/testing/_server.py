"""Serve an ASGI app (the sandbox) over real loopback HTTP with uvicorn, in a thread."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def serve(app: Any, *, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run ``app`` under uvicorn in a background thread; yield its base URL.

    ``port=0`` picks a free port. Needs the ``sandbox`` extra (uvicorn).
    """
    try:
        import uvicorn
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "serving the sandbox needs uvicorn: pip install 'creditguard[sandbox]'"
        ) from exc

    config = uvicorn.Config(
        app, host=host, port=port, log_level="error", lifespan="on", access_log=False
    )
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
        yield f"http://{url_host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(10)
