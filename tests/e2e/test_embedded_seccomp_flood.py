"""An embedded run whose agent floods the seccomp notify listener with denied syscalls: every
attempt is refused and counted in the report, and the supervisor's memory does not grow with
the number of attempts (it once kept each one: +807 MB for 1.9 M attempts). Real runc, seccomp
user notification and cgroups; needs root."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_root_and_runc
from tests.support.embedded import agentctl_command, agentctl_env, host_residue

pytestmark = pytest.mark.e2e

LIMIT = 400_000
# An embedded run peaks at ~60 MB however many attempts it sees; the old code, which kept every
# attempt (~425 bytes each), would add 100 MB or more past MEANINGFUL attempts, above the bound.
MEANINGFUL = 250_000
PEAK_BOUND_KB = 150 * 1024

# socket(AF_VSOCK, ...) is a notify rule of the default profile (families above 16): each call
# is a round trip to the listener. Bounded by count and by a wall-clock cap, whichever first.
FLOOD = f"""
import ctypes, errno, time
libc = ctypes.CDLL(None, use_errno=True)
made = refused = other = 0
deadline = time.monotonic() + 40
while made < {LIMIT}:
    if made % 1024 == 0 and time.monotonic() >= deadline:
        break
    fd = libc.socket(40, 1, 0)
    made += 1
    if fd == -1 and ctypes.get_errno() == errno.EPERM:
        refused += 1
    else:
        other += 1
        if fd >= 0:
            libc.close(fd)
print(f"attempts={{made}} refused={{refused}} other={{other}}", flush=True)
"""

# Runs agentctl as its only child and reports the peak RSS of it and its waited descendants,
# so nothing else this test process ever ran counts.
PEAK_WRAPPER = """
import resource, subprocess, sys
status = subprocess.run(sys.argv[1:]).returncode
print(f"peak_rss_kb={resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}", flush=True)
sys.exit(status)
"""


@pytest.fixture
def ci(tmp_root: Path) -> Iterator[Path]:
    require_root_and_runc()
    state_root = tmp_root / "ci-state"
    yield state_root
    residue = host_residue(state_root)
    assert residue == {}, f"embedded runs left things behind: {residue}"


def test_a_flood_of_denied_syscalls_is_counted_in_bounded_memory(ci: Path,
                                                                 tmp_root: Path) -> None:
    python = shutil.which("python3", path="/usr/bin")
    assert python is not None
    report_path = tmp_root / "report.json"
    result = subprocess.run(
        [sys.executable, "-c", PEAK_WRAPPER,
         *agentctl_command("run", "--embedded", "--report", str(report_path), "--",
                           python, "-c", FLOOD)],
        env=agentctl_env(ci), capture_output=True, text=True, timeout=600, cwd="/")
    assert result.returncode == 0, result.stdout + result.stderr
    made = re.search(r"attempts=(\d+) refused=(\d+) other=(\d+)", result.stdout)
    peak = re.search(r"peak_rss_kb=(\d+)", result.stdout)
    assert made is not None and peak is not None, result.stdout + result.stderr
    attempts, refused, other = (int(g) for g in made.groups())
    peak_kb = int(peak.group(1))
    print(f"attempts={attempts} peak_rss_kb={peak_kb}")
    assert attempts >= MEANINGFUL, f"only {attempts} attempts: too few to tell a leak"
    assert refused == attempts and other == 0
    report = json.loads(report_path.read_text())
    assert report["ending"] == "exited" and report["agent_exit_status"] == 0
    assert report["teardown"] == {"clean": True, "residue": {}}
    # The listener hands its last coalesced counts over when it stops, before the report is
    # collected: the count is exact, not sampled.
    assert report["denied_syscalls"] == {"count": attempts, "by_syscall": {"socket": attempts}}
    assert peak_kb < PEAK_BOUND_KB, f"supervisor peaked at {peak_kb} KiB for {attempts} attempts"
