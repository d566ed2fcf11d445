"""``Precheck``: a cost that Lensmor works out before the action."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from creditguard.core.checks import _check_cost

__all__ = ["Cost", "Precheck"]


class Precheck:
    """A cost Lensmor works out: ``Precheck(action_type, params)`` is accepted wherever a
    cost is (``requires_credits``, ``spend``).

    Before the action, the guard asks ``POST /external/actions/precheck`` what it would
    charge (never charging, reserving or locking anything) and admits for exactly that:
    nothing reserved and no refresh when it would charge nothing (already-unlocked
    contacts are free), :class:`InsufficientCredits` when Lensmor says the balance is
    short, :class:`ActionNotAllowed` for its other refusals. ``params`` is the precheck's
    ``params`` object, or (for a decorator) a callable of the decorated function's
    arguments returning it. With ``at_most``, the worst case the action can cost, no
    precheck is sent while the cached balance covers that bound: the call is admitted for
    ``at_most`` instead.
    """

    __slots__ = ("action_type", "at_most", "params")

    def __init__(
        self,
        action_type: str,
        params: Mapping[str, Any] | Callable[..., Mapping[str, Any]],
        *,
        at_most: int | None = None,
    ) -> None:
        if not isinstance(action_type, str) or not action_type:
            raise TypeError("action_type must be a non-empty str")
        if not callable(params) and not isinstance(params, Mapping):
            raise TypeError(
                "params must be a mapping, or a callable of the guarded function's"
                f" arguments returning one; got {type(params).__name__}"
            )
        self.action_type = action_type
        self.params = params
        self.at_most = None if at_most is None else _check_cost(at_most)

    def __repr__(self) -> str:
        return f"Precheck({self.action_type!r}, at_most={self.at_most!r})"

    def params_for(self, *args: Any, **kwargs: Any) -> Mapping[str, Any]:
        """The precheck ``params`` for a call with these arguments."""
        params = self.params
        value = params(*args, **kwargs) if callable(params) else params
        if not isinstance(value, Mapping):
            raise TypeError(f"precheck params must be a mapping, got {type(value).__name__}")
        return value


Cost = int | Callable[..., int] | Precheck
