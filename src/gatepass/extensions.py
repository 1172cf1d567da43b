"""Features that add routes or background work to the app register a hook here."""

from __future__ import annotations

from typing import Any


def hooks() -> list[Any]:
    found: list[Any] = []
    return found
