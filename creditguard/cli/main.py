"""The ``creditguard`` command: ``balance``, ``status``, ``report``, ``demo`` and ``sandbox``.

Exit status: 0 on success, 1 for an error of the guard (one line on stderr, in terms of
the environment variables and flags, not of Python arguments), 2 for a usage error, 130
on Ctrl-C, and 141 when standard output is a pipe closed early (``creditguard balance |
head -2``), as for a command ended by SIGPIPE, without a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import shlex
import socket
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

import httpx

from creditguard.cli import report
from creditguard.cli.status import redis_backend, shown_url, status_json, status_table, survey
from creditguard.core.errors import (
    AuthenticationError,
    BalanceUnavailable,
    CreditGuardError,
    InsecureTransportError,
)
from creditguard.core.models import CreditBalance
from creditguard.guard.guard import DEFAULT_BASE_URL, CreditGuard

EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a command the pipe ended
SANDBOX_KEY = "test-key"  # the sandbox's built-in test key (FakeLensmor's default)
WAITING_NOTE_AFTER = 1.0  # seconds without an answer before saying the command is waiting


def _fmt_balance(balance: CreditBalance) -> str:
    reset = (
        "no active subscription expiry"
        if balance.reset_at is None
        else balance.reset_at.strftime("%Y-%m-%d %H:%M UTC")
    )
    rows = [("subscription", balance.subscription_balance, balance.subscription_amount)]
    if balance.addon_fields or balance.addon_amount or balance.addon_balance:
        rows.append(("add-on", balance.addon_balance, balance.addon_amount))
    rows += [
        ("gift", balance.gift_balance, balance.gift_amount),
        ("total", balance.total_balance, balance.total_amount),
    ]
    lines = [f"  {'bucket':<14}{'balance':>12}{'granted':>12}"]
    lines += [f"  {name:<14}{left:>12,}{granted:>12,}" for name, left, granted in rows]
    lines.append(f"  {'resets at':<14}{reset:>24}")
    if balance.addon_expire_at is not None:
        expiry = balance.addon_expire_at.strftime("%Y-%m-%d %H:%M UTC")
        lines.append(f"  {'add-on expires':<14}{expiry:>24}")
    lines.append("  (subscription credits are spent before gift credits)")
    return "\n".join(lines)


def _in_cli_terms(message: str) -> str:
    """A configuration error in terms of what a command-line user sets."""
    for python, cli in (
        ("pass api_key=... or set the LENSMOR_API_KEY environment variable", "set LENSMOR_API_KEY"),
        ("the API key", "LENSMOR_API_KEY"),
        ("base_url", "LENSMOR_BASE_URL"),
    ):
        message = message.replace(python, cli)
    return message


def _guard_from_env(allow_insecure_http: bool, backend: object = None) -> CreditGuard:
    """The guard of ``LENSMOR_API_KEY`` at ``LENSMOR_BASE_URL``, with errors that speak of
    those variables and of the command's flags."""
    key = os.environ.get("LENSMOR_API_KEY")
    if not key:
        raise CreditGuardError("no API key: set the LENSMOR_API_KEY environment variable")
    base_url = os.environ.get("LENSMOR_BASE_URL") or DEFAULT_BASE_URL
    options: dict[str, Any] = {} if backend is None else {"backend": backend}
    try:
        return CreditGuard(base_url=base_url, allow_insecure_http=allow_insecure_http, **options)
    except InsecureTransportError:
        host = httpx.URL(base_url).host
        raise CreditGuardError(
            f"refusing to send LENSMOR_API_KEY over plain http:// to {host}: set"
            " LENSMOR_BASE_URL to an https:// URL or a loopback address, or pass"
            " --allow-insecure-http"
        ) from None
    except CreditGuardError as exc:
        message = _in_cli_terms(str(exc))
        if "LENSMOR_BASE_URL" in message:
            message += f"; got {shown_url(base_url, key)}"
        raise CreditGuardError(message) from None


@contextlib.contextmanager
def _waiting_note(url: str) -> Iterator[None]:
    """Say on stderr that the command is waiting for ``url``, once it has waited
    ``WAITING_NOTE_AFTER`` seconds (a stalled service is not a hung command)."""

    def note() -> None:
        with contextlib.suppress(OSError, ValueError):
            print(
                f"creditguard: waiting for the credits service at {url}...",
                file=sys.stderr,
                flush=True,
            )

    timer = threading.Timer(WAITING_NOTE_AFTER, note)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _read_balance(guard: CreditGuard) -> CreditBalance:
    with _waiting_note(guard.base_url):
        try:
            return guard.balance()
        except AuthenticationError as exc:
            raise AuthenticationError(
                f"{exc}; check LENSMOR_API_KEY", status_code=exc.status_code
            ) from None


def _cmd_balance(args: argparse.Namespace, out: TextIO) -> int:
    with _guard_from_env(args.allow_insecure_http) as guard:
        balance = _read_balance(guard)
        if args.json:
            print(json.dumps(balance.to_api(), indent=2), file=out)
        else:
            print(f"Lensmor credits at {guard.base_url}", file=out)
            print(_fmt_balance(balance), file=out)
    return 0


def _cmd_status(args: argparse.Namespace, out: TextIO) -> int:
    backend = None if args.redis_url is None else redis_backend(args.redis_url, args.prefix)
    try:
        with _guard_from_env(args.allow_insecure_http, backend) as guard:
            snapshot = survey(guard, args.redis_url)
            error: str | None = None
            if snapshot.balance is None:  # none cached (a fresh process): read it
                try:
                    _read_balance(guard)
                except AuthenticationError:
                    raise
                except BalanceUnavailable as exc:
                    error = str(exc)
                snapshot = survey(guard, args.redis_url)
            now = time.time()
            if args.json:
                print(json.dumps(status_json(guard, snapshot, error, now), indent=2), file=out)
            else:
                print(status_table(guard, snapshot, error, now), file=out)
    finally:
        if backend is not None:
            backend.close()
    return 0 if error is None else 1


def _cmd_demo(args: argparse.Namespace, out: TextIO) -> int:
    from creditguard.cli.demo import run_demo

    return run_demo(out)


def _shown_key(key: str) -> str:
    """The sandbox key for the banner: the built-in test key as it is; a key given with
    ``--api-key`` is not echoed (it may be a real one, typed by habit)."""
    if key == SANDBOX_KEY:
        return shlex.quote(key)
    return "<the key given with --api-key>"


def _port_in_use(host: str, port: int) -> bool:
    """Whether another program listens on ``host``:``port`` (binding as the server would)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def _port_taken(host: str, port: int) -> str:
    return (
        f"port {port} on {host} is in use: pick another with --port, or pass --port 0 for"
        " any free port (the banner shows which)"
    )


def _cmd_sandbox(args: argparse.Namespace, out: TextIO) -> int:
    from creditguard.testing import FAULTS, FakeLensmor, serve

    try:
        import uvicorn  # noqa: F401
    except ImportError:
        raise CreditGuardError(
            "the sandbox server needs uvicorn: pip install 'creditguard[sandbox]'"
        ) from None
    if args.addon and args.balance_shape == "0.22":
        raise CreditGuardError("--addon needs --balance-shape 0.24 (0.22 has no add-on keys)")
    fake = FakeLensmor(
        subscription_balance=args.subscription,
        gift_balance=args.gift,
        api_key=args.api_key,
        latency=args.latency,
        stall_seconds=args.stall_seconds,
        addon_balance=args.addon,
        balance_shape=args.balance_shape,
        float_numbers=args.float_numbers,
        task_polls=args.task_polls,
        rate_limit=args.rate_limit,
    )
    if args.port and _port_in_use(args.host, args.port):
        raise CreditGuardError(_port_taken(args.host, args.port))
    retry_after = None if args.retry_after is None else {"Retry-After": args.retry_after}
    for fault, times in args.fail:
        fake.fail_next(fault, times=times, headers=retry_after if fault == 429 else None)
    with contextlib.ExitStack() as stack:
        try:
            url = stack.enter_context(
                serve(fake.app, host=args.host, port=args.port, log_level="warning")
            )
        except RuntimeError:
            if args.port and _port_in_use(args.host, args.port):
                raise CreditGuardError(_port_taken(args.host, args.port)) from None
            raise CreditGuardError(
                f"could not serve the sandbox on {args.host}:{args.port}"
            ) from None
        scripted = ", ".join(f"{fault} x{times}" for fault, times in args.fail)
        print(
            f"creditguard sandbox on {url}  (Ctrl-C to stop)\n"
            f"  export LENSMOR_BASE_URL={url}\n"
            f"  export LENSMOR_API_KEY={_shown_key(args.api_key)}"
            "   (the one key the sandbox accepts)\n"
            f"  GET  /external/credits/balance       (Authorization: Bearer <key>)\n"
            f"  POST /sandbox/charge?credits=N       (spend credits, subscription first)\n"
            f"  POST /sandbox/fail?fault=F&times=N   (script faults: a 4xx/5xx status or"
            f" {', '.join(FAULTS)}; &retry_after=S)\n"
            f"  POST /sandbox/latency?seconds=S      (delay every answer)\n"
            f"  GET  /sandbox/stats                  (requests served, faults pending)\n"
            f"  POST /sandbox/spend-outside?credits=N (the web app spending from the pool)\n"
            "  Lensmor's paid endpoints, at their published costs:\n"
            "    POST /external/events/{id}/unlock                (2000; free when unlocked)\n"
            "    POST /external/contacts/unlock                   (15 per contact)\n"
            "    GET  /external/contacts/unlock-tasks/{taskId}"
            f"    (completed on poll {args.task_polls})\n"
            "    POST /external/exhibitors/search-events          (50; free when empty)\n"
            "    POST /external/exhibitors/search-by-company-name (50; free when empty)\n"
            "    POST /external/actions/precheck                  (free)\n"
            f"  balance shape {fake.balance_shape}"
            f"{', float numbers' if args.float_numbers else ''};"
            f" rate limit {f'{args.rate_limit}/min' if args.rate_limit else 'none'}\n"
            f"  latency {args.latency:g}s; scripted faults: {scripted or 'none'}",
            file=out,
            flush=True,
        )
        # Ctrl-C: stop the server (leaving the stack), then report the interruption.
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
    return 130


def _fault_spec(text: str) -> tuple[int | str, int]:
    from creditguard.testing import parse_fault

    try:
        return parse_fault(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _refuse_negative(text: str) -> None:
    """A negative number is refused in those words (not as "not a decimal number")."""
    digits = text.strip()[1:].replace(".", "", 1)
    if text.strip().startswith("-") and digits.isascii() and digits.isdigit():
        raise argparse.ArgumentTypeError(f"the value must not be negative, got {text.strip()}")


def _seconds(text: str) -> float:
    from creditguard.testing._faults import _seconds as seconds

    _refuse_negative(text)
    try:
        return seconds(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _non_negative(text: str) -> int:
    from creditguard.testing._faults import _count

    _refuse_negative(text)
    try:
        return _count(text, "the value")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> int:
    from creditguard.testing._faults import _count

    try:
        return _count(text, "the value", least=1)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _port(text: str) -> int:
    from creditguard.testing._faults import _count

    try:
        return _count(text, "the port", most=65535)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _header_value(text: str) -> str:
    from creditguard.testing._faults import _check_headers

    try:
        return _check_headers({"Retry-After": text})["Retry-After"]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="creditguard",
        description="Check Lensmor credits before paid API calls.",
    )
    from creditguard import __version__

    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__}", help="print the version"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p_balance = sub.add_parser(
        "balance", help="show the balance of LENSMOR_API_KEY (at LENSMOR_BASE_URL)"
    )
    p_balance.add_argument("--json", action="store_true", help="print the documented JSON")
    p_balance.add_argument(
        "--allow-insecure-http",
        action="store_true",
        help="allow a plain http:// LENSMOR_BASE_URL to a host that is not a loopback address"
        " (a sandbox on another machine): the key then travels in clear text",
    )
    p_balance.set_defaults(run=_cmd_balance)
    p_status = sub.add_parser(
        "status",
        help="what the guard holds for LENSMOR_API_KEY's account: balance, calls in flight,"
        " open holds, gate queue",
    )
    p_status.add_argument(
        "--redis-url",
        default=None,
        metavar="URL",
        help="look at the deployment sharing this Redis (RedisBackend); without it, this"
        " process's memory, which shows only the balance",
    )
    p_status.add_argument(
        "--prefix",
        default=None,
        metavar="PREFIX",
        help="the key prefix the deployment's RedisBackend uses (default: its default)",
    )
    p_status.add_argument("--json", action="store_true", help="print JSON")
    p_status.add_argument(
        "--allow-insecure-http",
        action="store_true",
        help="allow a plain http:// LENSMOR_BASE_URL to a host that is not a loopback address",
    )
    p_status.set_defaults(run=_cmd_status)
    report.add_parser(sub)
    p_demo = sub.add_parser("demo", help="guarded unlocks against the offline sandbox")
    p_demo.set_defaults(run=_cmd_demo)
    p_sandbox = sub.add_parser("sandbox", help="serve the sandbox over HTTP (needs uvicorn)")
    p_sandbox.add_argument(
        "--host",
        default="127.0.0.1",
        help="the address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)",
    )
    p_sandbox.add_argument(
        "--port", type=_port, default=8787, help="the port to listen on (default 8787; 0: any free)"
    )
    p_sandbox.add_argument(
        "--subscription",
        type=_non_negative,
        default=30000,
        metavar="N",
        help="subscription credits to start with (default 30000)",
    )
    p_sandbox.add_argument(
        "--gift",
        type=_non_negative,
        default=50,
        metavar="N",
        help="gift credits to start with (default 50)",
    )
    p_sandbox.add_argument(
        "--api-key",
        default=SANDBOX_KEY,
        metavar="KEY",
        help="the one API key the sandbox accepts (default test-key); 401 for any other",
    )
    p_sandbox.add_argument(
        "--latency",
        type=_seconds,
        default=0.0,
        metavar="S",
        help="seconds added to every answer (default 0)",
    )
    p_sandbox.add_argument(
        "--fail",
        type=_fault_spec,
        action="append",
        default=[],
        metavar="FAULT[:TIMES]",
        help="answer the next TIMES (default 1) balance requests with FAULT: an HTTP error"
        " status (429, 500, 502, 503, 504...) or one of drop, stall, truncated, not-json,"
        " wrong-types; repeat to queue several",
    )
    p_sandbox.add_argument(
        "--retry-after",
        type=_header_value,
        default=None,
        metavar="VALUE",
        help="the Retry-After header of scripted 429s (delta-seconds or an HTTP date)",
    )
    p_sandbox.add_argument(
        "--stall-seconds",
        type=_seconds,
        default=30.0,
        metavar="S",
        help="how long a 'stall' fault holds the half-sent body (default 30)",
    )
    p_sandbox.add_argument(
        "--addon",
        type=_non_negative,
        default=0,
        metavar="N",
        help="add-on credits to start with (default 0; needs the 0.24 balance shape)",
    )
    p_sandbox.add_argument(
        "--balance-shape",
        choices=("0.22", "0.24"),
        default=None,
        help="the balance JSON: 0.22 (no add-on keys; the default without --addon) or 0.24"
        " (with addonAmount, addonBalance, addonExpireAt)",
    )
    p_sandbox.add_argument(
        "--float-numbers",
        action="store_true",
        help="send the balance's numbers as JSON floats (30050.0), as the schema allows",
    )
    p_sandbox.add_argument(
        "--task-polls",
        type=_positive,
        default=2,
        metavar="N",
        help="a contact unlock task completes on its Nth poll (default 2)",
    )
    p_sandbox.add_argument(
        "--rate-limit",
        type=_positive,
        default=None,
        metavar="N",
        help="requests per minute served to the key, with X-RateLimit-* headers and 429"
        " beyond (default: unlimited, no headers)",
    )
    p_sandbox.set_defaults(run=_cmd_sandbox)
    return parser


def _quiet_stdout() -> None:
    """After a broken pipe: point standard output at /dev/null, so that the interpreter's
    last flush at exit does not fail (and print a traceback) once more."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by something without a file
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None) -> int:
    """Run the command; return its exit status (see the module's docstring)."""
    args = build_parser().parse_args(argv)
    stream = out if out is not None else sys.stdout
    try:
        code: int = args.run(args, stream)
        stream.flush()  # a closed pipe is found here, not at the interpreter's exit
    except BrokenPipeError:
        if stream is sys.stdout:
            _quiet_stdout()
        return EXIT_BROKEN_PIPE
    except CreditGuardError as exc:
        print(f"creditguard: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code
