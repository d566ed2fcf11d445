"""``creditguard.fastapi``: the FastAPI dependency (kept at this path; the code is in
:mod:`creditguard.web.fastapi`)."""

from creditguard.web.fastapi import *  # noqa: F403
from creditguard.web.fastapi import __all__ as __all__
