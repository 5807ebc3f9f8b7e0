"""What an embedded CI run imports before it knows it needs it: pyroute2's package import (the
largest part of the runner's import time) only for a gateway run's veth, never for the netns
every run gets. A subprocess with a clean interpreter; no privilege."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_ci_runner_does_not_import_pyroute2_or_aiohttp() -> None:
    probe = ("import sys, supervisor.ci.runner\n"
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'pyroute2', 'aiohttp'}))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            cwd=REPO, check=True)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
