"""``creditguard status``: an operator's look at what the guard holds for one account
(``guard.snapshot()``), in this process's memory or across a deployment sharing Redis."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from creditguard.core.errors import CreditGuardError

if TYPE_CHECKING:
    from creditguard.core.models import AccountSnapshot
    from creditguard.guard.guard import CreditGuard

__all__ = ["redis_backend", "shown_url", "status_json", "status_table", "survey"]

_SHOWN_URL = 200  # longest URL echoed in an error


def shown_url(text: str, secret: str | None = None) -> str:
    """A URL fit for an error message: without credentials (``user:password@``), its query
    and fragment (which may hold tokens) as ``?...``, ``secret`` redacted, quoted."""
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "", text
    cut = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:cut], rest[cut:]
    authority = authority.rpartition("@")[2]
    for mark in "?#":
        if mark in tail:
            tail = tail[: tail.index(mark)] + mark + "..."
    shown = f"{scheme}{sep}{authority}{tail}"
    if secret:
        shown = shown.replace(secret, "[redacted]")
    shown = "".join(c if c.isprintable() else "?" for c in shown)
    if len(shown) > _SHOWN_URL:
        shown = shown[: _SHOWN_URL - 3] + "..."
    return repr(shown)


def redis_backend(url: str, prefix: str | None) -> Any:
    try:
        import redis

        from creditguard.backends.redis.backend import RedisBackend
    except ImportError:
        raise CreditGuardError(
            "--redis-url needs redis-py: pip install 'creditguard[redis]'"
        ) from None
    try:
        if prefix is None:
            return RedisBackend(url)
        return RedisBackend(url, prefix=prefix)
    except (ValueError, TypeError, redis.RedisError) as exc:
        raise CreditGuardError(
            f"--redis-url is not a usable Redis URL ({type(exc).__name__}); got {shown_url(url)}"
        ) from None


def survey(guard: CreditGuard, redis_url: str | None) -> AccountSnapshot:
    if redis_url is None:
        return guard.snapshot()
    import redis

    try:
        return guard.snapshot()
    except redis.RedisError as exc:
        raise CreditGuardError(
            f"could not reach Redis at {shown_url(redis_url)} ({type(exc).__name__})"
        ) from None


def _expires_in(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def _plural(n: int, one: str, many: str) -> str:
    return f"{n:,} {one if n == 1 else many}"


def status_json(
    guard: CreditGuard, snapshot: AccountSnapshot, error: str | None, now: float
) -> dict[str, Any]:
    balance = snapshot.balance
    return {
        "account": guard.account,
        "base_url": guard.base_url,
        "backend": snapshot.backend,
        "balance": None if balance is None else balance.to_api(),
        "balance_error": error,
        "reserved": snapshot.reserved,
        "in_flight": snapshot.in_flight,
        "held": snapshot.held,
        "holds": snapshot.holds,
        "settling": snapshot.settling,
        "gate_waiting": snapshot.gate_waiting,
        "open_holds": [
            {
                "id": hold.id,
                "cost": hold.cost,
                "expires_at": hold.expires_at,
                "expires_in": round(max(0.0, hold.expires_at - now), 1),
            }
            for hold in sorted(snapshot.open_holds, key=lambda h: h.expires_at)
        ],
    }


def status_table(
    guard: CreditGuard, snapshot: AccountSnapshot, error: str | None, now: float
) -> str:
    balance = snapshot.balance
    if balance is not None:
        shown = f"{balance.total_balance:,} credits"
    else:
        shown = f"unavailable: {error}" if error else "none cached"
    lines = [
        f"creditguard status of {guard.account} at {guard.base_url} ({snapshot.backend} backend)",
        f"  {'balance':<12}{shown}",
        f"  {'reserved':<12}{_plural(snapshot.reserved, 'credit', 'credits')} by"
        f" {_plural(snapshot.in_flight, 'guarded call', 'guarded calls')} in flight",
        f"  {'held':<12}{_plural(snapshot.held, 'credit', 'credits')} by"
        f" {_plural(snapshot.holds, 'open hold', 'open holds')}",
        f"  {'settling':<12}"
        f"{_plural(snapshot.settling, 'finished call', 'finished calls')} waiting for a read",
        f"  {'gate queue':<12}{_plural(snapshot.gate_waiting, 'caller', 'callers')} waiting",
    ]
    if snapshot.open_holds:
        width = max(len(hold.id) for hold in snapshot.open_holds)
        lines.append(f"  open holds\n    {'id':<{width}}  {'cost':>10}  {'expires in':>10}")
        lines += [
            f"    {hold.id:<{width}}  {hold.cost:>10,}  {_expires_in(hold.expires_at - now):>10}"
            for hold in sorted(snapshot.open_holds, key=lambda h: h.expires_at)
        ]
    return "\n".join(lines)
