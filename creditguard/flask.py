"""``creditguard.flask``: the Flask extension (kept at this path; the code is in
:mod:`creditguard.web.flask`)."""

from creditguard.web.flask import *  # noqa: F403
from creditguard.web.flask import __all__ as __all__
