"""OpenTelemetry metrics and spans of the guard (placeholder: see the telemetry branch)."""

from __future__ import annotations

from typing import Any

__all__ = ["instruments"]


def instruments() -> Any:
    """The guard's OpenTelemetry observer, or ``None`` when the API is not installed."""
    return None
