"""The script calls of one account beside admission and settling (a mixin of
``RedisAccountState``): what a subject's allowance window holds, which side of a
low-balance threshold the balance was last seen on, and the rate limit. Each window is
a hash beside the account's keys (same hash tag: one slot), named by a hash of its
subject and its start; the admission script checks and reserves in it (``state.lua``,
"admit")."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from creditguard.backends.redis.answers import _blocked, _int, _text
from creditguard.core.steps import Window

__all__ = ["MAX_MS", "SideScripts", "duration_ms", "window_spec"]

# The longest duration a script is given, in ms (``_config.MAX_SECONDS``): added to the
# server's time it stays far below 2**53, where Lua's doubles and '%d' are exact.
MAX_MS = 1_000_000_000_000


def duration_ms(name: str, value: object, low: int = 1) -> int:
    """A duration in ms a script may add to the time: an int from ``low`` to
    :data:`MAX_MS`."""
    if type(value) is not int or not low <= value <= MAX_MS:
        raise ValueError(f"{name} must be an int of ms from {low} to {MAX_MS}, got {value!r}")
    return value


def window_spec(window: Window) -> str:
    """The admission's window argument: ``name|limit|end_ms|warn`` (warn ``-1``: none),
    the name what follows the account's keys' common start (``w:<subject hash>:<start>``:
    the backend's prefix, which may hold any character, is never in an argument)."""
    warn = -1 if window.warn is None else window.warn
    return f"w:{window.key}|{window.limit}|{int(window.end * 1000)}|{warn}"


class SideScripts:
    """The account's script calls beside admission; ``keys[0]`` is its state key."""

    keys: tuple[str, ...]

    def _run(self, name: str, args: Sequence[str | int]) -> Any: ...  # pragma: no cover

    async def _arun(self, name: str, args: Sequence[str | int]) -> Any: ...  # pragma: no cover

    @property
    def base(self) -> str:
        """What every key of the account starts with (its hash tag included)."""
        return self.keys[0][: -len("state")]

    def window(self, window: Window) -> tuple[int, int]:
        """What ``window`` holds: (charged, reserved by calls in flight)."""
        raw = self._run("window", [f"{self.base}w:{window.key}"])
        return _int(raw[0]), _int(raw[1])

    async def awindow(self, window: Window) -> tuple[int, int]:
        """Async twin of :meth:`window`."""
        raw = await self._arun("window", [f"{self.base}w:{window.key}"])
        return _int(raw[0]), _int(raw[1])

    def flip(self, name: str, low: bool) -> bool | None:
        """Record the side of threshold ``name`` the balance is on; the side before."""
        return _side(self._run("flip", [name, "1" if low else "0"]))

    async def aflip(self, name: str, low: bool) -> bool | None:
        """Async twin of :meth:`flip`."""
        return _side(await self._arun("flip", [name, "1" if low else "0"]))

    # -- rate limit ----------------------------------------------------------------------

    def block(self, ms: int) -> None:
        """Make no balance request for ``ms`` milliseconds from now (server time), in any
        process: the rate limit is used up. A later block never shortens an earlier one."""
        self._run("block", [duration_ms("ms", ms, 0)])

    async def ablock(self, ms: int) -> None:
        """Async twin of :meth:`block`."""
        await self._arun("block", [duration_ms("ms", ms, 0)])

    def blocked(self) -> int | None:
        """Milliseconds left before a balance request may be made, or ``None``."""
        return _blocked(self._run("blocked", ()))

    async def ablocked(self) -> int | None:
        """Async twin of :meth:`blocked`."""
        return _blocked(await self._arun("blocked", ()))


def _side(raw: object) -> bool | None:
    text = _text(raw)
    return None if text == "" else text == "1"
