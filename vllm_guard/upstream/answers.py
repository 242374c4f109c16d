"""Reading what the engine answers. The engine is trusted, but an unexpected answer — a
body of another shape, not JSON, a count that is not a count — is "unknown" (None) to the
guard, never an exception that ends a request, a background task or the process."""

from __future__ import annotations

import json
import math
from typing import Any

_decode = json.JSONDecoder().decode


def parse_json(data: bytes) -> Any:
    """The JSON value of `data`; None when it is not JSON (or nests beyond Python's
    recursion limit)."""
    try:
        return _decode(data.decode())
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None


def dig(value: Any, *keys: str) -> Any:
    """`value[k1][k2]...` through JSON objects only; None where a level is not an object
    or lacks the key."""
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def count(value: Any) -> int | None:
    """A JSON count: an int (not a bool) >= 0, else None."""
    return value if type(value) is int and value >= 0 else None


def finite(value: float) -> float | None:
    """A metric's sample value when it is a finite number >= 0, else None."""
    return value if math.isfinite(value) and value >= 0 else None
