"""A restart's handover at the edges the review found (issue 13): a record larger than one
datagram (many runs, each with the most tripwires a run may carry) is handed over and
adopted whole. Real daemon processes, runc, cgroups; needs root."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

from tests.support.daemon import Daemon, new_daemon, wait_for

# One datagram of the handover channel holds at most ~208 KiB (the socket's send buffer);
# 30 runs with 64 tripwires of the longest name each make a record well past that.
RUNS = 30
TRIPWIRES = [f"{n:02d}{'t' * 61}:memory_bytes>1e30" for n in range(64)]


def _rows(daemon: Daemon, verb: str) -> list[dict[str, Any]]:
    entries = daemon.client.audit(limit=1000)["entries"]
    return [e for e in entries if e["verb"] == verb]


def _finish(daemon: Daemon) -> None:
    daemon.stop()
    print(daemon.logs()[-20000:])  # shown when the test failed
    residue = daemon.clean()
    daemon.cleanup_host()
    assert residue == {}, f"{residue}\n{daemon.logs()[-6000:]}"


def test_a_record_larger_than_a_datagram_is_handed_over_whole(tmp_root: Path) -> None:
    daemon = new_daemon(tmp_root)
    daemon.start()
    try:
        flags = [arg for spec in TRIPWIRES for arg in ("--tripwire", spec)]
        for n in range(RUNS):
            daemon.agentctl("run", "--detach", "--name", f"many-{n:02d}", *flags, "--",
                            "sleep", "600", check=True)
        wait_for(lambda: len(daemon.agent_pids()) >= RUNS, timeout=120, what="every agent")
        runs = {daemon.client.agent(f"many-{n:02d}")["run"]["id"] for n in range(RUNS)}
        pids = sorted(daemon.agent_pids())

        assert daemon.stop(signal.SIGUSR2) == 0, daemon.logs()
        record = (daemon.root / "state" / "handover.json").read_bytes()
        # More than one datagram could hold (the default send buffer, wmem_default).
        assert len(record) > int(Path("/proc/sys/net/core/wmem_default").read_text()), \
            len(record)
        assert len(json.loads(record)["runs"]) == RUNS
        [handover] = _rows_after_start(daemon, "daemon_handover")
        assert {r["run_id"] for r in handover["detail"]["runs"]} == runs
        assert handover["detail"]["killed"] == {}
        adopted = [r for r in _rows(daemon, "adopt") if r["outcome"] == "ok"]
        assert {r["detail"]["run"] for r in adopted} == runs
        assert sorted(daemon.agent_pids()) == pids  # the same processes run on
        assert not _rows(daemon, "reap") and not _rows(daemon, "watchdog_kill")
        view = daemon.client.agent("many-00")
        assert view["state"] == "active"
        daemon.agentctl_json("kill", "--all", "--reason", "end of test")
    finally:
        _finish(daemon)


def _rows_after_start(daemon: Daemon, verb: str) -> list[dict[str, Any]]:
    daemon.start()
    return _rows(daemon, verb)
