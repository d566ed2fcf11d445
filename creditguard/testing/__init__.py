"""Test helpers for code that uses creditguard: an offline sandbox of Lensmor (the credits
balance and the paid endpoints, at their published costs).

``FakeLensmor`` is also available as the ``fake_lensmor`` pytest fixture (installed with
creditguard as a pytest plugin). Names load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from creditguard.testing._fake import FakeLensmor
    from creditguard.testing._faults import FAULTS, parse_fault
    from creditguard.testing._server import serve

_EXPORTS = {
    "FAULTS": "._faults",
    "FakeLensmor": "._fake",
    "parse_fault": "._faults",
    "serve": "._server",
}

__all__ = ["FAULTS", "FakeLensmor", "parse_fault", "serve"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'creditguard.testing' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
