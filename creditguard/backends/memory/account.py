"""The import path the guard (``creditguard.guard.guard``) and the Redis backend (its
fallback to memory) use for the memory backend: ``Account`` is defined in ``state.py``,
``MemoryBackend`` in ``backend.py``. New code imports them from
``creditguard.backends.memory``."""

from __future__ import annotations

from creditguard.backends.memory.backend import MemoryBackend
from creditguard.backends.memory.state import Account

__all__ = ["Account", "MemoryBackend"]
