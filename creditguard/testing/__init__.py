"""Test helpers for code that uses creditguard: an offline sandbox of the credits service.

``FakeLensmor`` is also available as the ``fake_lensmor`` pytest fixture (installed with
creditguard as a pytest plugin).
"""

from ._fake import FAULTS, FakeLensmor
from ._server import serve

__all__ = ["FAULTS", "FakeLensmor", "serve"]
