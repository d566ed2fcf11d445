"""The two drivers: ``drive`` runs a flow (a generator of steps, see ``flows.py``) from
sync code, ``adrive`` from async code. They perform balance reads and the backend's calls,
and wait on what the account state says to wait for; they are the only difference between
sync and async callers. ``run``/``arun`` perform a backend operation's calls alone."""

from __future__ import annotations

import contextlib
from typing import TypeVar, cast

from creditguard.core import alerts, outcomes
from creditguard.core.engine import Engine
from creditguard.core.errors import RateLimited
from creditguard.core.steps import Call, Flight, Ops, Steps, Waiter, _Waitable

__all__ = ["adrive", "arun", "drive", "run"]

T = TypeVar("T")


def _wait_until(engine: Engine, waitable: _Waitable, until: float | None) -> float:
    """When a wait gives up: a release is waited for until the caller's admission
    deadline, someone else's read for at most the longest a read can take."""
    if until is not None:
        return until
    return cast(Flight, waitable).started + engine.settings.read_budget


def _gave_up(engine: Engine, waitable: _Waitable) -> None:
    """After a wait: if what was waited for did not finish in time (or the wait was
    cancelled), stop waiting for it: a read that outlived the read budget is joined no
    more; a waiter leaves the account's list."""
    if waitable.done:
        return
    if isinstance(waitable, Waiter):
        engine.account.forget(waitable)
    elif isinstance(waitable, Flight):
        engine.account.overdue(waitable)
    # (A turn at the gate is given up by the operation that waits for it.)


def drive(engine: Engine, steps: Steps[T]) -> T:
    """Run a flow from sync code: reads through the sync transport, waits on a thread
    event, performs the backend's calls with its sync client."""
    account = engine.account
    try:
        step = next(steps)
        while True:
            if isinstance(step, Call):
                try:
                    done = step.run()
                except BaseException as exc:
                    step = steps.throw(exc)
                else:
                    step = steps.send(done)
                continue
            waitable, lead, until = step
            try:
                if lead:
                    flight = cast(Flight, waitable)
                    watching = account.watch(flight)
                    if watching is None:
                        _read_sync(engine, flight)
                    else:
                        run(watching)
                else:
                    waitable.wait(account.lock, _wait_until(engine, waitable, until))
                    _gave_up(engine, waitable)
            except BaseException as exc:
                step = steps.throw(exc)
            else:
                step = steps.send(waitable)
    except StopIteration as stop:
        result: T = stop.value
        return result


async def adrive(engine: Engine, steps: Steps[T]) -> T:
    """Run a flow from async code: reads with the async transport, waits on an event of
    this loop, awaits the backend's calls. (The read is inline: no await hop between
    caller and read.)"""
    account = engine.account
    try:
        step = next(steps)
        while True:
            if isinstance(step, Call):
                try:
                    done = await step.arun()
                except BaseException as exc:
                    step = steps.throw(exc)
                else:
                    step = steps.send(done)
                continue
            waitable, lead, until = step
            try:
                if lead and (watching := account.watch(cast(Flight, waitable))) is not None:
                    await arun(watching)
                elif lead:
                    flight = cast(Flight, waitable)
                    try:
                        _check_rate_limit(engine)
                        result, wait = await engine.upstream.aread(account.fingerprint)
                    except Exception as exc:
                        await arun(account.record(flight, None, exc))
                        raise
                    except BaseException:
                        # Abandoned: a waiter leads the next. (No I/O while cancelled.)
                        _record_now(engine, flight)
                        raise
                    if wait is not None:  # the rate limit is used up: none until reset
                        account.block(wait)
                    await arun(account.record(flight, result, None))
                    outcomes.read(engine, result)
                    if engine.settings.policy.watchers:
                        await arun(alerts.observe(engine, result))
                else:
                    try:
                        await waitable.await_done(
                            account.lock, _wait_until(engine, waitable, until)
                        )
                    finally:
                        _gave_up(engine, waitable)
            except BaseException as exc:
                step = steps.throw(exc)
            else:
                step = steps.send(waitable)
    except StopIteration as stop:
        value: T = stop.value
        return value


def _read_sync(engine: Engine, flight: Flight) -> None:
    """Perform the read ``flight`` from this thread and record how it ended."""
    account = engine.account
    try:
        _check_rate_limit(engine)
        result, wait = engine.upstream.read(account.fingerprint)
    except Exception as exc:
        run(account.record(flight, None, exc))
        raise
    except BaseException:
        _record_now(engine, flight)
        raise
    if wait is not None:  # the answer used up the rate limit: no more until the reset
        account.block(wait)
    run(account.record(flight, result, None))
    outcomes.read(engine, result)
    if engine.settings.policy.watchers:
        run(alerts.observe(engine, result))


def run(ops: Ops[None]) -> None:
    """Perform a backend operation's calls from sync code (their errors go back in)."""
    try:
        call = next(ops)
        while True:
            try:
                done = call.run()
            except BaseException as exc:
                call = ops.throw(exc)
            else:
                call = ops.send(done)
    except StopIteration:
        return


async def arun(ops: Ops[None]) -> None:
    """Perform a backend operation's calls from async code."""
    try:
        call = next(ops)
        while True:
            try:
                done = await call.arun()
            except BaseException as exc:
                call = ops.throw(exc)
            else:
                call = ops.send(done)
    except StopIteration:
        return


def _record_now(engine: Engine, flight: Flight) -> None:
    """A read abandoned (cancelled, interrupted): record it without waiting for any I/O;
    the backend's calls, if it needs some, are not made."""
    ops = engine.account.record(flight, None, None)
    with contextlib.suppress(StopIteration):
        next(ops)
    ops.close()


def _check_rate_limit(engine: Engine) -> None:
    """Fail fast, without a request, while the service's rate limit is used up."""
    left = engine.account.blocked()
    if left is not None:
        raise RateLimited(
            f"the credits service's rate limit is used up; retry after {left:.0f}s",
            retry_after=left,
        )
