"""Durations ("10s", "1m30s", "250ms") and sizes ("64M", "1G") as pydantic field types.
No I/O."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_SIZE = re.compile(r"^(\d+)([KMGT]?)(i?B?)?$", re.IGNORECASE)
_SIZE_FACTORS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_DURATION_FACTORS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
# Longer than any window, retention or interval a host needs; anything above is a typo or an
# attack on arithmetic that follows (timers, milliseconds, JSON that cannot hold infinity).
DURATION_MAX = 366 * 24 * 3600.0
_SIZE_MAX = 1024**5


def parse_duration(value: Any) -> float:
    """Seconds from a number of seconds or a string like "1m30s"; strictly positive."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as '10s'")
    if isinstance(value, int) and abs(value) > DURATION_MAX:
        raise ValueError(f"a duration must be at most {DURATION_MAX:.0f}s (366 days)")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        if len(value) > 64:
            raise ValueError("a duration is at most 64 characters, such as '1h30m'")
        text = value.strip().lower()
        pos, seconds = 0, 0.0
        for match in _DURATION_PART.finditer(text):
            if match.start() != pos:
                break
            seconds += float(match.group(1)) * _DURATION_FACTORS[match.group(2)]
            pos = match.end()
        if pos != len(text) or not text:
            raise ValueError(f"{value!r} is not a duration; use forms like 500ms, 10s, 2m, 1h")
    else:
        raise ValueError("expected a duration such as '10s'")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError("a duration must be a finite number greater than zero")
    if seconds > DURATION_MAX:
        raise ValueError(f"a duration must be at most {DURATION_MAX:.0f}s (366 days)")
    return seconds


def parse_size(value: Any) -> int:
    """Bytes from an integer or a string like "512M" (binary units)."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as '512M'")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        match = _SIZE.match(value.strip()) if len(value) <= 64 else None
        if not match:
            raise ValueError(f"{value!r} is not a size; use forms like 65536, 64K, 512M, 2G")
        size = int(match.group(1)) * _SIZE_FACTORS[match.group(2).upper()]
    else:
        raise ValueError("expected a size such as '512M'")
    if size <= 0:
        raise ValueError("a size must be greater than zero")
    if size > _SIZE_MAX:
        raise ValueError("a size must be at most 1P")
    return size


def format_duration(seconds: float) -> str:
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{seconds:g}s"


def duration_within(maximum: float) -> Callable[[Any], float]:
    """A duration parser that also refuses more than `maximum` seconds."""

    def bounded(value: Any) -> float:
        seconds = parse_duration(value)
        if seconds > maximum:
            raise ValueError(f"must be at most {format_duration(maximum)}")
        return seconds

    return bounded


def duration_schema(maximum: float = DURATION_MAX) -> WithJsonSchema:
    """What a request may send as a duration: seconds, or a string such as "1m30s"."""
    return WithJsonSchema({"anyOf": [
        {"type": "number", "exclusiveMinimum": 0, "maximum": maximum},
        {"type": "string", "maxLength": 64,
         "pattern": r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"}]}, mode="validation")


Duration = Annotated[float, BeforeValidator(parse_duration), duration_schema()]
Size = Annotated[int, BeforeValidator(parse_size), PlainSerializer(int)]
