"""``creditguard.wsgi``: the WSGI middleware (kept at this path; the code is in
:mod:`creditguard.web.wsgi`)."""

from creditguard.web.wsgi import *  # noqa: F403
from creditguard.web.wsgi import __all__ as __all__
