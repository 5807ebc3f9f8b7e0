"""Every benchmark script still starts: `python bench/NAME.py --help` imports everything the
script imports and builds its arguments. Benchmarks are run by hand, outside the tiers, so a
name they import that moved (as `grant_to_wire` did, out of the gateway worker's module)
would otherwise be found only by the next person who needs a figure. No root; no timing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if p.name != "stats.py")


def test_the_benchmarks_are_found() -> None:
    assert "mcp_gateway.py" in SCRIPTS and len(SCRIPTS) >= 10


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_benchmark_script_starts(script: str) -> None:
    done = subprocess.run([sys.executable, str(BENCH / script), "--help"],
                          capture_output=True, text=True, timeout=120, cwd=BENCH.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout
