"""The ``requires_credits`` decorator: one wrapper for sync and async functions, which
keeps their signatures (``ParamSpec``), and checks a cost function against the function it
guards."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, Protocol, TypeVar, cast

from creditguard.core.checks import _check_cost
from creditguard.core.policy import check_subject
from creditguard.guard.spend import Guard, Spend, acost_of, cost_of
from creditguard.lensmor.precheck import Cost, Precheck

__all__ = ["Subject", "_CostDecorator", "_Decorator", "_decorator"]

P = ParamSpec("P")
R = TypeVar("R")


class _Decorator(Protocol):
    """``requires_credits(int)``: keeps the decorated function's signature."""

    def __call__(self, func: Callable[P, R], /) -> Callable[P, R]: ...


class _CostDecorator(Protocol[P]):
    """``requires_credits(cost_function)``: the function must take the cost function's
    parameters (checked by type checkers, and at decoration time)."""

    def __call__(self, func: Callable[P, R], /) -> Callable[P, R]: ...


def _check_cost_signature(cost: Callable[..., object], func: Callable[..., object]) -> None:
    """Raise ``TypeError`` at decoration time when ``cost`` cannot take the arguments
    ``func`` is called with (as far as the two signatures tell)."""
    try:
        func_sig = inspect.signature(func)
        cost_sig = inspect.signature(cost)
    except (TypeError, ValueError):  # no signature to compare (some builtins)
        return
    args: list[object] = []
    kwargs: dict[str, object] = {}
    for param in func_sig.parameters.values():
        if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            args.append(None)
        elif param.kind is param.KEYWORD_ONLY:
            kwargs[param.name] = None
    try:
        cost_sig.bind(*args, **kwargs)
    except TypeError as exc:
        name = getattr(func, "__name__", type(func).__name__)
        raise TypeError(
            f"the cost function {cost_sig} cannot take the arguments of {name}{func_sig}"
            f" ({exc}): it is called with the same arguments as the function it guards"
        ) from None


def _is_async(func: Callable[..., object]) -> bool:
    """A coroutine function, or a callable object whose ``__call__`` is one."""
    if inspect.iscoroutinefunction(func):
        return True
    call = getattr(func, "__call__", None)  # noqa: B004 - the method itself is inspected
    return not inspect.isfunction(func) and inspect.iscoroutinefunction(call)


Subject = str | Callable[..., str] | None
"""Who a decorated call spends for: a str, or a callable of the function's arguments."""


def _subject_of(subject: Subject, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    if subject is None or isinstance(subject, str):
        return subject
    return check_subject(subject(*args, **kwargs))


def _decorator(cost: Cost, get_guard: Callable[[], Guard], subject: Subject = None) -> _Decorator:
    if isinstance(subject, str):
        subject = check_subject(subject)
    elif subject is not None and not callable(subject):
        raise TypeError(
            f"subject must be a str or a callable of the function's arguments, got {subject!r}"
        )
    precheck: Precheck | None = None
    static: int | None = None
    if isinstance(cost, Precheck):
        precheck = cost
    elif callable(cost):
        compute: Callable[..., int] = cost
    else:
        static = _check_cost(cost)

    def decorate(func: Callable[P, R]) -> Callable[P, R]:
        if not callable(func):
            raise TypeError(f"requires_credits decorates a function, got {type(func).__name__}")
        if inspect.isasyncgenfunction(func) or inspect.isgeneratorfunction(func):
            raise TypeError(
                "requires_credits cannot guard a generator: its body runs after the call"
                " returns; guard the code that spends with `guard.spend()` instead"
            )
        if precheck is not None:
            if callable(precheck.params):
                _check_cost_signature(precheck.params, func)
        elif static is None:
            _check_cost_signature(compute, func)
        if callable(subject):
            _check_cost_signature(subject, func)
        if _is_async(func):
            afunc = cast(Callable[P, Awaitable[Any]], func)

            @functools.wraps(func)
            async def async_guarded(*args: P.args, **kwargs: P.kwargs) -> Any:
                guard = get_guard()
                if precheck is not None:
                    params = precheck.params_for(*args, **kwargs)
                    amount = await acost_of(guard._engine, precheck, params)
                    if not amount:  # nothing to charge: no reservation, no refresh
                        return await afunc(*args, **kwargs)
                elif static is not None:
                    amount = static
                else:
                    amount = _check_cost(compute(*args, **kwargs))
                who = _subject_of(subject, args, kwargs)
                async with Spend(guard, amount, defer=True, subject=who) as spend:
                    result = await afunc(*args, **kwargs)
                    if spend._result is None:  # current_spend().report() comes first
                        spend._result = result
                    return result

            return cast(Callable[P, R], async_guarded)

        @functools.wraps(func)
        def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
            guard = get_guard()
            if precheck is not None:
                amount = cost_of(guard._engine, precheck, precheck.params_for(*args, **kwargs))
                if not amount:  # nothing to charge: no reservation, no refresh
                    return func(*args, **kwargs)
            elif static is not None:
                amount = static
            else:
                amount = _check_cost(compute(*args, **kwargs))
            who = _subject_of(subject, args, kwargs)
            with Spend(guard, amount, defer=True, subject=who) as spend:
                result = func(*args, **kwargs)
                if spend._result is None:  # current_spend().report() comes first
                    spend._result = result
                return result

        return guarded

    return cast(_Decorator, decorate)
