"""The memory backend: account state in this process.

``Account`` (``state.py``) is the state of one account, built in layers: ``base.py`` (its
state and shared bookkeeping), ``reads.py`` (the balance cache and reads in flight),
``reservations.py`` (admission and settling), ``state.py`` (holds, the gate, snapshots);
``commitments.py`` holds its gate and holds. ``MemoryBackend`` (``backend.py``) keeps the
accounts of this process.
"""

from creditguard.backends.memory.backend import MemoryBackend
from creditguard.backends.memory.state import Account

__all__ = ["Account", "MemoryBackend"]
