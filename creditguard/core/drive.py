"""The guard's two I/O edges: ``_drive`` runs an operation of the guard's logic (a
generator of steps, see ``_guard.py``) from sync code, ``_adrive`` from async code. They
perform balance reads and the backend's calls, and wait on what the account state says to
wait for; they are the only difference between sync and async callers."""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, TypeVar, cast

import httpx

from creditguard.core.engine import _Shared
from creditguard.core.errors import RateLimited
from creditguard.core.models import CreditBalance
from creditguard.core.roles import AccountState
from creditguard.core.secret import Secret
from creditguard.core.steps import Call, Flight, Ops, Step, Steps, Waiter, _Waitable

__all__ = ["_Edges"]

T = TypeVar("T")
logger = logging.getLogger("creditguard")


class _Edges:
    """The I/O edges of :class:`~creditguard.CreditGuard` (a base class of it)."""

    __slots__ = ()

    if TYPE_CHECKING:
        _account: AccountState
        _key: Secret
        _shared: _Shared

    # -- the two I/O edges -------------------------------------------------------------

    def _wait_until(self, waitable: _Waitable, until: float | None) -> float:
        """When a wait gives up: a release is waited for until the caller's admission
        deadline, someone else's read for at most the longest a read can take."""
        if until is not None:
            return until
        return cast(Flight, waitable).started + self._shared.read_budget

    def _gave_up(self, waitable: _Waitable) -> None:
        """After a wait: if what was waited for did not finish in time (or the wait was
        cancelled), stop waiting for it: a read that outlived the read budget is joined
        no more; a waiter leaves the account's list."""
        if waitable.done:
            return
        if isinstance(waitable, Waiter):
            self._account.forget(waitable)
        elif isinstance(waitable, Flight):
            self._account.overdue(waitable)
        # (A turn at the gate is given up by the operation that waits for it.)

    def _drive(self, steps: Steps[T]) -> T:
        """Run an operation from sync code: reads through the sync transport, waits on a
        thread event, performs the backend's calls with its sync client."""
        account = self._account
        try:
            step = next(steps)
            while True:
                if step.__class__ is Call:
                    try:
                        done = step.run()
                    except BaseException as exc:
                        step = steps.throw(exc)
                    else:
                        step = steps.send(done)
                    continue
                waitable, lead, until = cast(Step, step)
                try:
                    if lead:
                        flight = cast(Flight, waitable)
                        watching = account.watch(flight)
                        if watching is None:
                            self._read_sync(flight)
                        else:
                            self._run(watching)
                    else:
                        waitable.wait(account.lock, self._wait_until(waitable, until))
                        self._gave_up(waitable)
                except BaseException as exc:
                    step = steps.throw(exc)
                else:
                    step = steps.send(waitable)
        except StopIteration as stop:
            result: T = stop.value
            return result

    async def _adrive(self, steps: Steps[T]) -> T:
        """Run an operation from async code: reads with the async transport, waits on an
        event of this loop, awaits the backend's calls. (The read is inline: no await hop
        between caller and read.)"""
        account = self._account
        try:
            step = next(steps)
            while True:
                if step.__class__ is Call:
                    try:
                        done = await step.arun()
                    except BaseException as exc:
                        step = steps.throw(exc)
                    else:
                        step = steps.send(done)
                    continue
                waitable, lead, until = cast(Step, step)
                try:
                    if lead and (watching := account.watch(cast(Flight, waitable))) is not None:
                        await self._arun(watching)
                    elif lead:
                        flight = cast(Flight, waitable)
                        try:
                            self._check_rate_limit()
                            result, wait = await self._shared.aclient.read(self._balance_request())
                        except Exception as exc:
                            await self._arecord(flight, None, exc)
                            raise
                        except BaseException:
                            # Abandoned: a waiter leads the next. (No I/O while cancelled.)
                            self._record_now(flight)
                            raise
                        if wait is not None:  # the rate limit is used up: none until reset
                            account.block(wait)
                        await self._arecord(flight, result, None)
                        self._log_read(result)
                    else:
                        try:
                            await waitable.await_done(
                                account.lock, self._wait_until(waitable, until)
                            )
                        finally:
                            self._gave_up(waitable)
                except BaseException as exc:
                    step = steps.throw(exc)
                else:
                    step = steps.send(waitable)
        except StopIteration as stop:
            value: T = stop.value
            return value

    def _balance_request(self) -> httpx.Request:
        return self._shared.reader.request(self._account.fingerprint, self._key)

    def _read_sync(self, flight: Flight) -> None:
        """Perform the read ``flight`` from this thread and record how it ended."""
        try:
            self._check_rate_limit()
            result, wait = self._shared.client.read(self._balance_request())
        except Exception as exc:
            self._record(flight, None, exc)
            raise
        except BaseException:
            self._record_now(flight)
            raise
        if wait is not None:  # the answer used up the rate limit: no more until the reset
            self._account.block(wait)
        self._record(flight, result, None)
        self._log_read(result)

    def _record(
        self, flight: Flight, result: CreditBalance | None, error: BaseException | None
    ) -> None:
        """Record how a read ended, performing the backend's calls from sync code."""
        self._run(self._account.record(flight, result, error))

    async def _arecord(
        self, flight: Flight, result: CreditBalance | None, error: BaseException | None
    ) -> None:
        """Record how a read ended, awaiting the backend's calls."""
        await self._arun(self._account.record(flight, result, error))

    @staticmethod
    def _run(ops: Ops[None]) -> None:
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

    @staticmethod
    async def _arun(ops: Ops[None]) -> None:
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

    def _record_now(self, flight: Flight) -> None:
        """A read abandoned (cancelled, interrupted): record it without waiting for any
        I/O; the backend's calls, if it needs some, are not made."""
        ops = self._account.record(flight, None, None)
        with contextlib.suppress(StopIteration):
            next(ops)
        ops.close()

    def _check_rate_limit(self) -> None:
        """Fail fast, without a request, while the service's rate limit is used up."""
        left = self._account.blocked()
        if left is not None:
            raise RateLimited(
                f"the credits service's rate limit is used up; retry after {left:.0f}s",
                retry_after=left,
            )

    def _log_read(self, balance: CreditBalance) -> None:
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "read the balance of %s: %d total (%d subscription, %d gift)",
                self._account.fingerprint,
                balance.total_balance,
                balance.subscription_balance,
                balance.gift_balance,
            )
