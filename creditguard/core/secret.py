"""The API key as the guard keeps it: never shown in a repr, a str or a pickle."""

from __future__ import annotations

__all__ = ["Secret"]


class Secret:
    """An API key that does not show itself: its repr and str are redacted."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("an API key is not pickled")
