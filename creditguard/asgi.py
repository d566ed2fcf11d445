"""``creditguard.asgi``: the ASGI middleware (kept at this path; the code is in
:mod:`creditguard.web.asgi`)."""

from creditguard.web.asgi import *  # noqa: F403
from creditguard.web.asgi import __all__ as __all__
