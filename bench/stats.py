"""What every benchmark here reports the same way: percentiles by nearest rank and the
machine it ran on. Imported by the scripts beside it (`python bench/NAME.py`)."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path


def nearest_rank(values: list[float], fraction: float) -> float:
    """The smallest value with at least `fraction` of the values at or below it (p95: 0.95)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "?"
