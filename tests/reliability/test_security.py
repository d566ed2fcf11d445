"""The API key stays secret, and it only travels over verified TLS (or to loopback).

One distinctive key is driven through every path the guard has (success, denial, every
sandbox fault, a rejected key, fail-open, a failed refresh, a raising action, a
cancellation, a raising ``on_event`` hook) with every logger at DEBUG; then everything a
user or an operator could see is searched for it: log records (with tracebacks), captured
stdout/stderr of the process (uvicorn included), reprs, exceptions and their whole chain
(the ``request`` of chained httpx exceptions included), pickles, the account's state key
and the CLI's output.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pickle
import shutil
import ssl
import subprocess
import sys
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from creditguard import (
    BalanceUnavailable,
    CreditGuard,
    CreditGuardError,
    GuardEvent,
    InsecureTransportError,
    InsufficientCredits,
    RetryPolicy,
)
from creditguard.cli.main import main as cli_main
from creditguard.testing import FakeLensmor, serve

from .test_faults import FAULTS

SECRET = "sk-live-CANARY-7f3a9c1e5b2d"
FRAGMENTS = (SECRET, "CANARY-7f3a9c1e5b2d", "7f3a9c1e5b2d")
FAST = {"timeout": 0.25, "retry": RetryPolicy(attempts=2, deadline=0.6, backoff=0.01)}


class Boom(Exception):
    pass


class Surfaces:
    """Everything observable, as text, for a final search for the key."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.http_errors_seen = 0

    def add(self, label: str, text: object) -> None:
        self.texts.append(f"--- {label}\n{text}")

    def exception(self, label: str, exc: BaseException) -> None:
        self.add(label, "".join(traceback.format_exception(exc)))
        seen: set[int] = set()
        todo: list[BaseException | None] = [exc]
        while todo:
            current = todo.pop()
            if current is None or id(current) in seen:
                continue
            seen.add(id(current))
            self.add(f"{label}: {type(current).__name__}", f"{current!s} {current!r}")
            self.add(
                f"{label}: attributes", repr(vars(current)) if hasattr(current, "__dict__") else ""
            )
            if isinstance(current, httpx.RequestError):
                with contextlib.suppress(RuntimeError):
                    request = current.request
                    self.http_errors_seen += 1
                    self.add(f"{label}: request", f"{request!r} {request.headers!r}")
                    self.add(f"{label}: raw headers", repr(request.headers.raw))
                    auth = request.headers.get("authorization")
                    assert auth is None or SECRET not in auth
            with contextlib.suppress(Exception):
                self.add(f"{label}: pickle", repr(pickle.dumps(current)))
            todo += [current.__cause__, current.__context__]

    def event(self, event: GuardEvent) -> None:
        self.add("event", repr(event))
        if event.error is not None:
            self.exception(f"event {event.kind}", event.error)

    def assert_secret_absent(self) -> None:
        everything = "\n".join(self.texts)
        for fragment in FRAGMENTS:
            assert fragment not in everything, _context(everything, fragment)


def _context(text: str, fragment: str) -> str:
    at = text.index(fragment)
    return f"the key leaked: ...{text[max(0, at - 400) : at + 100]}..."


@pytest.fixture
def surfaces(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> Iterator[Surfaces]:
    found = Surfaces()
    loggers = ["", "creditguard", "httpx", "httpcore", "anyio", "trio", "asyncio", "hpack"]
    levels = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.DEBUG)
    caplog.set_level(logging.DEBUG)
    try:
        yield found
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s %(args)r")
    records = caplog.get_records("setup") + caplog.get_records("call")
    for record in records:
        found.add("log", formatter.format(record))
    out, err = capfd.readouterr()
    found.add("stdout", out)
    found.add("stderr", err)
    assert any(r.levelno == logging.DEBUG for r in records)  # DEBUG really was on
    found.assert_secret_absent()


@pytest.fixture
def secret_sandbox() -> Iterator[tuple[FakeLensmor, str]]:
    fake = FakeLensmor(subscription_balance=100, gift_balance=0, api_key=SECRET)
    with serve(fake.app, log_level="debug") as url:
        yield fake, url


def _guard(url: str, surfaces: Surfaces, key: str = SECRET, **kwargs: Any) -> CreditGuard:
    return CreditGuard(key, base_url=url, on_event=surfaces.event, **{**FAST, **kwargs})


def _raising_hook(event: GuardEvent) -> None:
    raise Boom(f"hook saw {event.kind}")


def test_key_never_leaks_sync(secret_sandbox: tuple[FakeLensmor, str], surfaces: Surfaces) -> None:
    fake, url = secret_sandbox
    guard = _guard(url, surfaces)
    view = guard.for_key(SECRET)
    surfaces.add("reprs", f"{guard!r} {view!r} {guard.account} {guard._account!r}")
    surfaces.add("state keys", repr(list(guard._clients.backend._live)))  # type: ignore[attr-defined]
    surfaces.add("dir", repr([getattr(guard, name, None) for name in dir(guard)]))
    with pytest.raises(TypeError):
        pickle.dumps(guard)

    with guard.spend(10) as spend:  # success
        fake.charge(10)
    surfaces.add("spend", repr(spend))
    assert guard.balance(refresh=True).total_balance == 90
    with pytest.raises(InsufficientCredits) as denied, guard.spend(1000):
        pass
    surfaces.exception("denied", denied.value)
    with pytest.raises(Boom) as boom, guard.spend(1):
        raise Boom("the action failed")
    surfaces.exception("action", boom.value)
    with pytest.raises(KeyboardInterrupt), guard.spend(1):
        raise KeyboardInterrupt

    for fault in FAULTS:  # every sandbox fault, on admission and on the refresh
        fault.script(_Sandboxish(fake))
        guard.invalidate()
        with pytest.raises(BalanceUnavailable) as info, guard.spend(1):
            pass
        surfaces.exception(fault.id, info.value)
        fault.clear(_Sandboxish(fake))
        with guard.spend(1) as spend:
            fault.script(_Sandboxish(fake))
        assert spend.balance_after is None
        fault.clear(_Sandboxish(fake))

    open_guard = _guard(url, surfaces, on_unavailable="allow")
    fake.fail_next(503, times=10)
    with open_guard.spend(1):  # unchecked, logged
        pass
    fake.clear_faults()

    wrong = _guard(url, surfaces, key=SECRET + "-wrong")
    with pytest.raises(CreditGuardError) as rejected:
        wrong.balance()
    surfaces.exception("rejected", rejected.value)

    hooked = CreditGuard(SECRET, base_url=url, on_event=_raising_hook, **FAST)  # type: ignore[arg-type]
    with hooked.spend(1):
        pass
    assert surfaces.http_errors_seen > 0  # chained httpx exceptions were inspected
    for g in (guard, open_guard, wrong, hooked):
        g.close()


@pytest.mark.anyio
async def test_key_never_leaks_async(
    secret_sandbox: tuple[FakeLensmor, str], surfaces: Surfaces
) -> None:
    fake, url = secret_sandbox
    guard = _guard(url, surfaces)
    async with guard:
        async with guard.spend(10):
            fake.charge(10)
        for fault in FAULTS:
            fault.script(_Sandboxish(fake))
            guard.invalidate()
            with pytest.raises(BalanceUnavailable) as info:
                async with guard.spend(1):
                    pass
            surfaces.exception(fault.id, info.value)
            fault.clear(_Sandboxish(fake))
            async with guard.spend(1) as spend:
                fault.script(_Sandboxish(fake))
            assert spend.balance_after is None
            fault.clear(_Sandboxish(fake))
        fake.fail_next("stall")
        guard.invalidate()
        with anyio.move_on_after(0.1):  # cancelled mid-read
            async with guard.spend(1):
                pass
        fake.clear_faults()
        with pytest.raises(InsufficientCredits) as denied:
            async with guard.spend(1000):
                pass
        surfaces.exception("denied", denied.value)
    wrong = _guard(url, surfaces, key=SECRET + "-wrong")
    async with wrong:
        with pytest.raises(CreditGuardError) as rejected:
            await wrong.abalance()
        surfaces.exception("rejected", rejected.value)
    assert surfaces.http_errors_seen > 0


class _Sandboxish:
    """What ``Fault.script`` needs of the reliability suite's ``Sandbox``."""

    def __init__(self, fake: FakeLensmor) -> None:
        self.fake = fake


# -- the command line ----------------------------------------------------------------------


def test_cli_output_never_shows_the_key(
    secret_sandbox: tuple[FakeLensmor, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake, url = secret_sandbox
    monkeypatch.setenv("LENSMOR_BASE_URL", url)
    outputs = []

    def run(*argv: str) -> int:
        out = io.StringIO()
        code = cli_main(list(argv), out=out)
        captured = capsys.readouterr()
        outputs.append(out.getvalue() + captured.out + captured.err)
        return code

    monkeypatch.setenv("LENSMOR_API_KEY", SECRET)
    assert run("balance") == 0
    assert run("balance", "--json") == 0
    assert "100" in outputs[-1]
    for fault in ("not-json", "wrong-types", 503, 429, "drop"):
        fake.fail_next(fault, times=10)  # type: ignore[arg-type]
        assert run("balance") == 1
        fake.clear_faults()
    monkeypatch.setenv("LENSMOR_API_KEY", SECRET + "-wrong")
    assert run("balance") == 1
    assert "rejected" in outputs[-1]
    monkeypatch.setenv("LENSMOR_API_KEY", SECRET + " with a space")
    assert run("balance") == 1
    monkeypatch.setenv("LENSMOR_BASE_URL", "http://example.com")
    monkeypatch.setenv("LENSMOR_API_KEY", SECRET)
    assert run("balance") == 1
    assert "--allow-insecure-http" in outputs[-1]
    text = "\n".join(outputs)
    for fragment in FRAGMENTS:
        assert fragment not in text, _context(text, fragment)


def test_sandbox_cli_output_never_shows_the_key() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "creditguard", "sandbox", "--port", "0", "--api-key", SECRET],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        banner = [process.stdout.readline()]
        while banner[-1] and "scripted faults" not in banner[-1]:
            banner.append(process.stdout.readline())
        url = banner[0].split()[3]
        response = httpx.get(
            f"{url}/external/credits/balance", headers={"Authorization": f"Bearer {SECRET}"}
        )
        assert response.status_code == 200
    finally:
        process.terminate()
        rest, _ = process.communicate(timeout=10)
    text = "".join(banner) + rest
    assert "creditguard sandbox on http://127.0.0.1:" in text
    for fragment in FRAGMENTS:
        assert fragment not in text


# -- transport security ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://platform.lensmor.com",
        "HTTP://PLATFORM.LENSMOR.COM",
        "http://10.0.0.5:8080",
        "http://0.0.0.0:8787",
        "http://[::ffff:8.8.8.8]",
        "http://127.0.0.1.nip.io",
        "http://localhost.example.com",
        "http://127.0.0.1@evil.example",
        "http://evil.example#@127.0.0.1",
    ],
)
def test_plain_http_to_a_remote_host_is_refused_before_any_request(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    requests: list[httpx.Request] = []
    transport = httpx.MockTransport(lambda r: requests.append(r) or httpx.Response(500))
    with pytest.raises(InsecureTransportError) as info:
        CreditGuard(SECRET, base_url=url, transport=transport)
    assert isinstance(info.value, CreditGuardError)
    assert SECRET not in str(info.value)
    monkeypatch.setenv("LENSMOR_BASE_URL", url)  # the same through the environment
    with pytest.raises(InsecureTransportError):
        CreditGuard(SECRET, transport=transport)
    assert requests == []


def test_plain_http_to_a_remote_host_with_explicit_opt_in() -> None:
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return httpx.Response(200, json=FakeLensmor().balance.to_api())

    guard = CreditGuard(
        SECRET,
        base_url="http://platform.lensmor.com",
        transport=httpx.MockTransport(handler),
        allow_insecure_http=True,
    )
    guard.balance()
    assert seen == [f"Bearer {SECRET}"]


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:1", "http://127.8.9.10", "http://localhost:1", "http://[::1]:1"]
)
def test_plain_http_to_loopback_needs_no_opt_in(url: str) -> None:
    CreditGuard(SECRET, base_url=url)


def _self_signed(directory: Path) -> tuple[str, str]:
    openssl = shutil.which("openssl")
    if openssl is None:  # pragma: no cover - openssl is part of the base system here
        pytest.skip("needs the openssl command to make a self-signed certificate")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            openssl,
            *("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
            *("-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return str(cert), str(key)


@pytest.fixture(scope="module")
def tls_sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FakeLensmor, str, str]]:
    cert, key = _self_signed(tmp_path_factory.mktemp("tls"))
    fake = FakeLensmor(api_key=SECRET)
    with serve(fake.app, ssl_certfile=cert, ssl_keyfile=key) as url:
        yield fake, url, cert


def test_tls_verification_is_on_by_default(tls_sandbox: tuple[FakeLensmor, str, str]) -> None:
    fake, url, cert = tls_sandbox
    assert url.startswith("https://")
    before = fake.balance_requests
    with CreditGuard(SECRET, base_url=url, **FAST) as guard:  # type: ignore[arg-type]
        with pytest.raises(BalanceUnavailable) as info:
            guard.balance()
        chain = "".join(traceback.format_exception(info.value))
        assert "CERTIFICATE_VERIFY_FAILED" in chain
    assert fake.balance_requests == before  # no request (and no key) reached the server
    context = ssl.create_default_context(cafile=cert)
    with CreditGuard(SECRET, base_url=url, verify=context) as trusted:  # type: ignore[arg-type]
        assert trusted.balance() == fake.balance
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # httpx: verify=<str> deprecated
        with CreditGuard(SECRET, base_url=url, verify=cert) as by_path:
            assert by_path.balance() == fake.balance


@pytest.mark.anyio
async def test_tls_verification_is_on_by_default_async(
    tls_sandbox: tuple[FakeLensmor, str, str], anyio_backend: str
) -> None:
    fake, url, _ = tls_sandbox
    before = fake.balance_requests
    async with CreditGuard(SECRET, base_url=url, **FAST) as guard:  # type: ignore[arg-type]
        with pytest.raises(BalanceUnavailable) as info:
            await guard.abalance()
        assert isinstance(info.value.__cause__, httpx.ConnectError)
        if anyio_backend == "asyncio":  # (trio reports a broken stream, not the reason)
            assert "CERTIFICATE_VERIFY_FAILED" in "".join(traceback.format_exception(info.value))
    assert fake.balance_requests == before


class _Recorder:
    """An ASGI app that records the Authorization header of every request it gets."""

    def __init__(self, status: int = 200, location: str | None = None) -> None:
        self.status = status
        self.location = location
        self.authorizations: list[str | None] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        headers = dict(scope["headers"])
        auth = headers.get(b"authorization")
        self.authorizations.append(None if auth is None else auth.decode())
        extra = [] if self.location is None else [(b"location", self.location.encode())]
        await send({"type": "http.response.start", "status": self.status, "headers": extra})
        await send({"type": "http.response.body", "body": b""})


def test_redirects_are_not_followed() -> None:
    """A redirect is an unexpected answer: the key is not replayed to its target."""
    elsewhere = _Recorder()
    with serve(elsewhere) as target:
        redirector = _Recorder(307, location=f"{target}/external/credits/balance")
        with serve(redirector) as url, CreditGuard(SECRET, base_url=url, **FAST) as guard:  # type: ignore[arg-type]
            with pytest.raises(BalanceUnavailable) as info:
                guard.balance()
            assert info.value.status_code == 307
    assert redirector.authorizations == [f"Bearer {SECRET}"]
    assert elsewhere.authorizations == []


def test_proxy_environment_is_ignored(
    secret_sandbox: tuple[FakeLensmor, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTP(S)_PROXY from the environment cannot divert the key (trust_env=False)."""
    fake, url = secret_sandbox
    proxy = _Recorder(502)
    with serve(proxy) as proxy_url:
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "all_proxy"):
            monkeypatch.setenv(name, proxy_url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        with CreditGuard(SECRET, base_url=url) as guard:
            assert guard.balance() == fake.balance
    assert proxy.authorizations == []
    assert "HTTP_PROXY" in os.environ  # (still set: the guard ignored it)
