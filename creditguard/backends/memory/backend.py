"""``MemoryBackend``: where accounts live when their state is kept in this process (a
``StateBackend``), with the most recently used idle accounts cached."""

from __future__ import annotations

import os
import threading
import weakref

import cachetools

from creditguard.backends.memory.state import Account

__all__ = ["MemoryBackend"]

_backends: weakref.WeakSet[MemoryBackend] = weakref.WeakSet()


def _after_fork() -> None:
    """In a forked child: a lock of its own for each backend (a thread of the parent may
    have held this one; its accounts reset themselves, see ``AccountBase._forked``)."""
    for backend in list(_backends):
        backend._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


class MemoryBackend:
    """Account state in this process.

    The ``max_accounts`` most recently used idle accounts stay cached. An account that
    is busy (calls in flight, open holds, callers waiting at admission or at its gate)
    is never forgotten: pushed out of the recent ones, it is kept aside until it is idle
    again. (Calls that returned and only wait for a read do not keep it: an account made
    anew reads a balance that includes them.) So memory is bounded by ``max_accounts``
    idle accounts plus the accounts with work in flight, which holds bound by expiring.
    """

    def __init__(self, max_accounts: int = 10_000) -> None:
        if type(max_accounts) is not int or max_accounts < 1:
            raise ValueError(f"max_accounts must be an int >= 1, got {max_accounts!r}")
        # Accounts pushed out of the recent ones while busy, until they are idle.
        self._busy: dict[str, Account] = {}
        self._recent = _Recent(max_accounts, self._busy)
        self._live: weakref.WeakValueDictionary[str, Account] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()
        _backends.add(self)

    def account(self, fingerprint: str) -> Account:
        """The state of the account ``fingerprint``, created on first use."""
        with self._lock:
            account = self._live.get(fingerprint)
            if account is None:
                account = self._live[fingerprint] = Account(fingerprint)
            busy = self._busy
            if busy:
                busy.pop(fingerprint, None)
                if busy:  # look at one kept aside (in turn): forget it if idle now
                    name = next(iter(busy))
                    kept = busy.pop(name)
                    if kept.busy():
                        busy[name] = kept
            self._recent[fingerprint] = account
            return account

    def __len__(self) -> int:
        return len(self._live)


class _Recent(cachetools.LRUCache[str, Account]):
    """The most recently used accounts; one pushed out while busy is kept in ``busy``."""

    def __init__(self, maxsize: int, busy: dict[str, Account]) -> None:
        super().__init__(maxsize)
        self._busy = busy

    def popitem(self) -> tuple[str, Account]:
        name, account = super().popitem()
        if account.busy():
            self._busy[name] = account
        return name, account
