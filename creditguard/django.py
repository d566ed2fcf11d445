"""``creditguard.django``: the Django middleware and decorator (kept at this path; the code is in
:mod:`creditguard.web.django`)."""

from creditguard.web.django import *  # noqa: F403
from creditguard.web.django import __all__ as __all__
