"""Durations and sizes (supervisor/models/units.py). Pure; no I/O."""

from __future__ import annotations

import math
from typing import Any

import pytest

from supervisor.models.units import format_duration, parse_duration, parse_size

MIB = 1024**2
GIB = 1024**3


@pytest.mark.parametrize(("value", "seconds"), [
    ("10s", 10.0),
    ("1m30s", 90.0),
    ("250ms", 0.25),
    ("2m", 120.0),
    ("1h", 3600.0),
    ("1h1m1s", 3661.0),
    ("1.5s", 1.5),
    (" 10S ", 10.0),
    (5, 5.0),
    (0.05, 0.05),
    (2.5, 2.5),
])
def test_parse_duration_good(value: Any, seconds: float) -> None:
    result = parse_duration(value)
    assert isinstance(result, float)
    assert result == pytest.approx(seconds)


@pytest.mark.parametrize("value", [
    "", "   ", "10", "-1s", "1x", "s", "ms", "1m 30s", "10s!", "1d", "0s", "0ms", "+1s",
    True, False, 0, 0.0, -5, None, [10], {"s": 1},
])
def test_parse_duration_bad(value: Any) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


def test_parse_duration_rejects_nan() -> None:
    """NaN is not 'strictly positive': as a kill confirm timeout it never expires, so the
    kill would never escalate."""
    with pytest.raises(ValueError):
        parse_duration(math.nan)


def test_parse_duration_error_names_the_forms() -> None:
    with pytest.raises(ValueError, match="10s"):
        parse_duration("1x")


@pytest.mark.parametrize(("value", "size"), [
    ("512M", 512 * MIB),
    ("1G", GIB),
    ("64K", 64 * 1024),
    ("2T", 2 * 1024**4),
    ("1g", GIB),
    ("512MiB", 512 * MIB),
    ("1GB", GIB),
    ("65536", 65536),
    (" 1G ", GIB),
    (5, 5),
    (4096, 4096),
])
def test_parse_size_good(value: Any, size: int) -> None:
    result = parse_size(value)
    assert isinstance(result, int)
    assert result == size


@pytest.mark.parametrize("value", [
    "", "   ", "-1", "-1M", "1x", "12Q", "1.5G", "G", "1 G", "0", "0M", "1M1K",
    True, False, 0, -1, 1.5, None, ["1G"],
])
def test_parse_size_bad(value: Any) -> None:
    with pytest.raises(ValueError):
        parse_size(value)


@pytest.mark.parametrize(("seconds", "text"), [(0.25, "250ms"), (10.0, "10s"), (1.5, "1.5s")])
def test_format_duration_round_trips(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == pytest.approx(seconds)
