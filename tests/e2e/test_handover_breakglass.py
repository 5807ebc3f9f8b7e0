"""The HALT file across a restart with agents kept (issue 13, review): once the next daemon has
taken the handed-over runs, the watchdog that held them (and watched the HALT file) has stood
down, so the daemon's own break-glass must already be watching it: nothing later in its start
(here the wait for an earlier watchdog, which the test holds open with a stand-in in the
watchdogs' cgroup) may hold a halt back. Before the fix break-glass started only once the
whole start was done (reconcile, fleet, self-test, metrics, control socket), and an adopted
agent outlived a HALT file for that long. (SIGUSR1 at that moment: test_handover_robust.py.)
Real daemon processes, runc, cgroups; needs root."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

from supervisor.daemon.watchdog import TRACKING
from supervisor.sandbox.cgroups import Cgroup
from tests.e2e.test_handover import _alive, _sleeper_handed_over
from tests.support.daemon import new_daemon, wait_for

# The stand-in keeps the next daemon in its wait for earlier watchdogs this long at most
# (2 x confirm_timeout + 2 s), far longer than the test waits for the halt.
CONFIRM_TIMEOUT = "30s"


def test_a_halt_file_reaches_adopted_agents_while_the_start_goes_on(tmp_root: Path) -> None:
    daemon = new_daemon(tmp_root, daemon={"adopt_window": "10m"},
                        kill={"confirm_timeout": CONFIRM_TIMEOUT})
    daemon.start()
    stand_in: subprocess.Popen[bytes] | None = None
    starting: threading.Thread | None = None
    failed: list[BaseException] = []
    try:
        watchdogs = Cgroup(daemon.cgroup_parent.rstrip("/") + "-watchdog")
        pids = _sleeper_handed_over(daemon, "kept")
        [holder] = watchdogs.pids()
        # An earlier watchdog still at work, as far as the next daemon can tell.
        stand_in = subprocess.Popen(["sleep", "600"])
        watchdogs.place(stand_in.pid, TRACKING)

        def start() -> None:
            try:
                daemon.start(timeout=120)
            except BaseException as exc:  # reported by the test's thread
                failed.append(exc)

        starting = threading.Thread(target=start)
        starting.start()
        # The give is complete once the watchdog that held the runs has stood down: from here
        # on only the next daemon holds them, and it is still starting.
        wait_for(lambda: not _alive([holder]), timeout=30, what="the adoption")
        assert _alive(pids) == pids
        assert starting.is_alive() and not failed, failed
        (daemon.root / "run" / "HALT").write_text("incident during a restart\n")
        wait_for(lambda: not _alive(pids), timeout=10,
                 what="break-glass to kill the adopted agent while the start goes on")
        assert starting.is_alive(), "the start ended before the halt: the test proves nothing"

        stand_in.kill()
        stand_in.wait()
        starting.join()
        assert not failed, failed
        [adopted] = [r for r in daemon.audit_rows("adopt") if r["target"] == "kept"]
        assert adopted["outcome"] == "ok", adopted
        assert daemon.audit_rows("break_glass"), daemon.logs()[-4000:]
        assert daemon.client.health()["global_halt"] is True
        assert daemon.client.agent("kept")["run"]["state"] == "killed"
    finally:
        if stand_in is not None and stand_in.poll() is None:
            stand_in.kill()
            stand_in.wait()
        if starting is not None:
            starting.join()
        daemon.finish()
