"""The ``creditguard`` command: ``balance``, ``demo`` and ``sandbox``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TextIO

import anyio

from ._errors import CreditGuardError, InsufficientCredits
from ._guard import CreditGuard, GuardEvent
from ._models import CreditBalance


def _fmt_balance(balance: CreditBalance) -> str:
    reset = (
        "no active subscription expiry"
        if balance.reset_at is None
        else balance.reset_at.strftime("%Y-%m-%d %H:%M UTC")
    )
    rows = [
        ("subscription", balance.subscription_balance, balance.subscription_amount),
        ("gift", balance.gift_balance, balance.gift_amount),
        ("total", balance.total_balance, balance.total_amount),
    ]
    lines = [f"  {'bucket':<14}{'balance':>12}{'granted':>12}"]
    lines += [f"  {name:<14}{left:>12,}{granted:>12,}" for name, left, granted in rows]
    lines.append(f"  {'resets at':<14}{reset:>24}")
    lines.append("  (subscription credits are spent before gift credits)")
    return "\n".join(lines)


def _cmd_balance(args: argparse.Namespace, out: TextIO) -> int:
    with CreditGuard() as guard:
        balance = guard.balance()
        if args.json:
            print(json.dumps(balance.to_api(), indent=2), file=out)
        else:
            print(f"Lensmor credits at {guard.base_url}", file=out)
            print(_fmt_balance(balance), file=out)
    return 0


def _short(balance: CreditBalance | None) -> str:
    if balance is None:
        return "?"
    return (
        f"{balance.total_balance:>4} = {balance.subscription_balance:>3} sub"
        f" + {balance.gift_balance:>3} gift"
    )


def _cmd_demo(args: argparse.Namespace, out: TextIO) -> int:
    from .testing import FakeLensmor

    fake = FakeLensmor(subscription_balance=60, gift_balance=15, api_key="demo-key")

    def show(event: GuardEvent) -> None:
        if event.kind == "spent":
            print(
                f"  {label:<42}{event.cost:>5}   {_short(event.balance_before):<26}"
                f"{_short(event.balance_after)}",
                file=out,
            )

    guard = CreditGuard(
        fake.api_key, base_url="https://sandbox.invalid", transport=fake.transport, on_event=show
    )

    @guard.requires_credits(10)
    def unlock_event(event_id: str) -> str:
        fake.charge(10)  # stands for the paid Lensmor call
        return event_id

    @guard.requires_credits(lambda contact_ids: 5 * len(contact_ids))
    async def unlock_contact_emails(contact_ids: list[str]) -> int:
        fake.charge(5 * len(contact_ids))
        return len(contact_ids)

    async def exhibitor_search() -> None:
        async with guard.spend(25):
            fake.charge(25)

    print("creditguard demo: guarded calls against an offline sandbox of Lensmor credits", file=out)
    print(f"starting balance: {_short(fake.balance)}\n", file=out)
    print(f"  {'guarded action':<42}{'cost':>5}   {'before':<26}after", file=out)
    label = "unlock_event('EV-1024')             sync"
    unlock_event("EV-1024")
    label = "unlock_contact_emails(4 ids)       async"
    anyio.run(unlock_contact_emails, ["c1", "c2", "c3", "c4"])
    label = "async with guard.spend(25)          trio"
    anyio.run(exhibitor_search, backend="trio") if _has_trio() else anyio.run(exhibitor_search)
    label = "with guard.spend(10)                sync"
    with guard.spend(10):
        fake.charge(10)
    try:
        anyio.run(unlock_contact_emails, ["c5", "c6", "c7"])
    except InsufficientCredits as exc:
        print(
            f"\n  refused: unlock_contact_emails(3 ids) needs {exc.required} credits,"
            f" {exc.available} available: InsufficientCredits, the paid call never ran",
            file=out,
        )
    final = guard.balance()
    print(
        f"\nfinal balance: {_short(final)}  (subscription credits went first, then gift)"
        f"\npaid calls: {fake.charges}; balance reads from the service: {fake.balance_requests}",
        file=out,
    )
    guard.close()
    return 0


def _has_trio() -> bool:
    try:
        import trio  # noqa: F401
    except ImportError:
        return False
    return True


def _cmd_sandbox(args: argparse.Namespace, out: TextIO) -> int:
    import contextlib
    import threading

    from .testing import FAULTS, FakeLensmor, serve

    try:
        import uvicorn  # noqa: F401
    except ImportError:
        raise CreditGuardError(
            "the sandbox server needs uvicorn: pip install 'creditguard[sandbox]'"
        ) from None
    fake = FakeLensmor(
        subscription_balance=args.subscription,
        gift_balance=args.gift,
        api_key=args.api_key,
        latency=args.latency,
        stall_seconds=args.stall_seconds,
    )
    retry_after = None if args.retry_after is None else {"Retry-After": args.retry_after}
    for fault, times in args.fail:
        fake.fail_next(fault, times=times, headers=retry_after if fault == 429 else None)
    with contextlib.ExitStack() as stack:
        try:
            url = stack.enter_context(
                serve(fake.app, host=args.host, port=args.port, log_level="warning")
            )
        except RuntimeError:
            raise CreditGuardError(
                f"could not serve the sandbox on {args.host}:{args.port}"
            ) from None
        scripted = ", ".join(f"{fault} x{times}" for fault, times in args.fail)
        print(
            f"creditguard sandbox on {url}  (Ctrl-C to stop)\n"
            f"  export LENSMOR_BASE_URL={url}\n"
            f"  GET  /external/credits/balance       (Authorization: Bearer <key>)\n"
            f"  POST /sandbox/charge?credits=N       (spend credits, subscription first)\n"
            f"  POST /sandbox/fail?fault=F&times=N   (script faults: a 4xx/5xx status or"
            f" {', '.join(FAULTS)}; &retry_after=S)\n"
            f"  POST /sandbox/latency?seconds=S      (delay every answer)\n"
            f"  GET  /sandbox/stats                  (requests served, faults pending)\n"
            f"  latency {args.latency:g}s; scripted faults: {scripted or 'none'}",
            file=out,
            flush=True,
        )
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
    return 0


def _fault_spec(text: str) -> tuple[int | str, int]:
    from .testing import parse_fault

    try:
        return parse_fault(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 3600:
        raise argparse.ArgumentTypeError("must be between 0 and 3600 seconds")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="creditguard",
        description="Check Lensmor credits before paid API calls.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p_balance = sub.add_parser(
        "balance", help="show the balance of LENSMOR_API_KEY (at LENSMOR_BASE_URL)"
    )
    p_balance.add_argument("--json", action="store_true", help="print the documented JSON")
    p_balance.set_defaults(run=_cmd_balance)
    p_demo = sub.add_parser("demo", help="guarded unlocks against the offline sandbox")
    p_demo.set_defaults(run=_cmd_demo)
    p_sandbox = sub.add_parser("sandbox", help="serve the sandbox over HTTP (needs uvicorn)")
    p_sandbox.add_argument("--host", default="127.0.0.1")
    p_sandbox.add_argument("--port", type=int, default=8787)
    p_sandbox.add_argument("--subscription", type=_non_negative, default=30000)
    p_sandbox.add_argument("--gift", type=_non_negative, default=50)
    p_sandbox.add_argument("--api-key", default="test-key")
    p_sandbox.add_argument(
        "--latency", type=_seconds, default=0.0, help="seconds added to every answer"
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
        default=None,
        metavar="VALUE",
        help="the Retry-After header of scripted 429s (delta-seconds or an HTTP date)",
    )
    p_sandbox.add_argument(
        "--stall-seconds",
        type=_seconds,
        default=30.0,
        help="how long a 'stall' fault holds the half-sent body (default 30)",
    )
    p_sandbox.set_defaults(run=_cmd_sandbox)
    return parser


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None) -> int:
    args = build_parser().parse_args(argv)
    stream = out if out is not None else sys.stdout
    try:
        code: int = args.run(args, stream)
    except CreditGuardError as exc:
        print(f"creditguard: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code
