"""``creditguard.redis``: the Redis backend (kept at this path; the code is in
:mod:`creditguard.backends.redis.backend`)."""

from creditguard.backends.redis.backend import *  # noqa: F403
from creditguard.backends.redis.backend import __all__ as __all__
