"""A docker gateway run's network gate (supervisor/runtime/network_gate.py): the container's
process reads one line from the run's FIFO before it execs gosu; the daemon writes it once
the network is in place, and not before. No root; the shell is the host's."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

from supervisor.errors import EnforcementError
from supervisor.runtime.network_gate import GATE_PATH, SHELL_PATH, Gate, NetworkGate

WAIT = 10.0


def test_the_command_waits_at_the_gate_then_execs_gosus_argv() -> None:
    argv = NetworkGate().wrap(["/dev/drop-to-agent", "1000:1000", "/dev/init", "--", "x"])
    assert argv[:3] == [SHELL_PATH, "sh", "-c"]
    assert argv[4:] == [GATE_PATH, "/dev/drop-to-agent", "1000:1000", "/dev/init", "--", "x"]


def test_the_gate_holds_the_process_until_it_is_opened_even_once_unlinked(
        tmp_path: Path) -> None:
    gate = Gate(tmp_path / "gate")
    try:
        info = (tmp_path / "gate").stat()
        assert stat.S_ISFIFO(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
        shell = shutil.which("sh")
        assert shell is not None
        script = NetworkGate().wrap(["echo", "through"])[3]
        with subprocess.Popen([shell, "-c", script, str(gate.path), "echo", "through"],
                              stdout=subprocess.PIPE, text=True) as proc:
            assert proc.stdout is not None
            _until_open(proc.pid, info)  # as the container's bind holds it from its start
            gate.unlink()
            assert not gate.path.exists()
            with pytest.raises(subprocess.TimeoutExpired):
                proc.wait(timeout=0.5)  # shut: the shell still waits
            gate.open()
            assert proc.stdout.read() == "through\n"
            assert proc.wait(timeout=WAIT) == 0
    finally:
        gate.close()


def _until_open(pid: int, fifo: os.stat_result) -> None:
    """Until process `pid` holds the FIFO open (the files behind its descriptors)."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        for name in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(FileNotFoundError):
                held = os.stat(f"/proc/{pid}/fd/{name}")
                if (held.st_dev, held.st_ino) == (fifo.st_dev, fifo.st_ino):
                    return
        time.sleep(0.01)
    raise AssertionError("the shell never opened the gate")


def test_closing_a_gate_leaves_nothing_and_a_stale_fifo_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "gate"
    os.mkfifo(path, 0o644)  # a previous daemon's, of a run that never started
    gate = Gate(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    gate.close()
    gate.close()
    assert not path.exists()


def test_without_busybox_no_gateway_run_starts(tmp_path: Path) -> None:
    with pytest.raises(EnforcementError) as refused:
        NetworkGate(tmp_path / "busybox").check()
    assert refused.value.hint == "apt-get install busybox-static"
    assert refused.value.detail["binary"] == str(tmp_path / "busybox")
