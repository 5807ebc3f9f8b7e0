"""The runs' parent cgroup across a restart: a parent an earlier daemon made without the mark
(sandbox/runs_parent.py) is still taken and its handed-over runs adopted; a reload that
changes [sandbox] cgroup_parent says the next restart drops the running agents, and that
restart's log names the changed parent as the reason. A reload to an invalid [egress] is
refused. Needs root and runc."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from supervisor.sandbox import runs_parent
from supervisor.sandbox.cgroups import Cgroup, sigkill
from tests.e2e.test_handover import _alive, _sleeper_handed_over
from tests.support.daemon import new_daemon, wait_for


def test_an_unmarked_parent_with_handed_over_runs_is_adopted(tmp_root: Path) -> None:
    """As after an upgrade from a daemon that did not mark its parent: its runs' cgroups are
    the only ones there, so the parent is taken, marked, and the runs adopted."""
    daemon = new_daemon(tmp_root)
    daemon.start()
    try:
        pids = _sleeper_handed_over(daemon, "kept")
        os.removexattr(daemon.cgroup_dir(), runs_parent.MARK)
        assert not runs_parent.is_marked(daemon.cgroup_parent)
        daemon.start()
        assert daemon.client.agent("kept")["state"] == "active"
        assert daemon.audit_rows("adopt")[-1]["outcome"] == "ok"
        assert _alive(pids) == pids
        assert runs_parent.is_marked(daemon.cgroup_parent)
        daemon.agentctl("kill", "kept", "--reason", "done", check=True)
    finally:
        daemon.finish()


def test_a_changed_parent_is_said_at_the_reload_and_named_at_the_restart(
        tmp_root: Path) -> None:
    daemon = new_daemon(tmp_root)
    daemon.start()
    old_parent = daemon.cgroup_parent
    new_parent = f"{old_parent}-moved"
    try:
        daemon.agentctl("run", "--detach", "--name", "moved", "--", "sleep", "600",
                        check=True)
        pids = wait_for(lambda: daemon.agent_pids(), timeout=30, what="the agent running")
        # A reload to an invalid [egress] is refused whole, like any bad configuration.
        daemon.extra_config["egress"] = {"pool": "10.0.0.0/33", "worker_user": "as-nobody-here"}
        daemon.write_config()
        refused = daemon.agentctl("reload", "--json")
        assert refused.returncode == 78, refused.stdout + refused.stderr
        keys = {e["key"] for e in json.loads(refused.stdout)["error"]["detail"]["errors"]}
        assert "egress.pool" in keys
        del daemon.extra_config["egress"]
        # The parent's change is applied at the restart only, and the reload says what that
        # restart will do to the running agent.
        daemon.cgroup_parent = new_parent
        daemon.write_config()
        reloaded = daemon.agentctl_json("reload", "--reason", "move the runs")
        assert "sandbox" in reloaded["restart_required"]
        warning = next(w for w in reloaded["warnings"] if w["key"] == "sandbox.cgroup_parent")
        assert "not adopt the running agents (1 now)" in warning["reason"]
        assert "killed" in warning["reason"]
        assert daemon.stop(signal.SIGUSR2) == 0
        daemon.start()
        log = daemon.logs()
        assert f"under [sandbox] cgroup_parent {old_parent!r}" in log, log[-4000:]
        assert "a changed cgroup_parent does not take them" in log
        assert daemon.client.agent("moved")["state"] != "active"
        wait_for(lambda: not _alive(pids), timeout=30, what="the dropped agent dead")
    finally:
        daemon.finish()
        # The first daemon's watchdog still holds nothing until its window ends: this test's
        # own process, ended here so its cgroup can go.
        old_watchdog = Cgroup(f"{old_parent}-watchdog")
        for pid in old_watchdog.pids() if old_watchdog.exists() else []:
            sigkill(pid)
        wait_for(lambda: not old_watchdog.exists() or not old_watchdog.pids(), timeout=30,
                 what="the first watchdog gone")
        daemon.cgroup_parent = old_parent
        daemon.cleanup_host()
        Cgroup(new_parent).remove(strict=False)
        assert not Cgroup(old_parent).exists() and not old_watchdog.exists()


def _nested_parent_kept_out(tmp_root: Path, *, unmark: bool) -> None:
    """The attack: an agent runs; cgroup_parent is moved inside the old parent and the daemon
    restarted with a handover. The old watchdog, its runs not adopted, would cgroup.kill the
    old parent at its window's end, and with it the new daemon's agents. The reload refuses
    the change, the restart refuses the parent (exit 78) and touches nothing; set back, the
    next start adopts the agent within the window."""
    daemon = new_daemon(tmp_root)
    daemon.start()
    old_parent = daemon.cgroup_parent
    nested = f"{old_parent}/sub"
    try:
        pids = _sleeper_handed_over(daemon, "kept")
        daemon.start()  # adopts it: the handover below is of a running daemon's agent
        if unmark:  # only the handover's record names the old parent
            os.removexattr(daemon.cgroup_dir(), runs_parent.MARK)
        daemon.cgroup_parent = nested
        daemon.write_config()
        refused = daemon.agentctl("reload", "--json")
        assert refused.returncode == 78, refused.stdout + refused.stderr
        errors = json.loads(refused.stdout)["error"]["detail"]["errors"]
        assert [e["key"] for e in errors] == ["sandbox.cgroup_parent"], errors
        assert daemon.stop(signal.SIGUSR2) == 0
        try:
            daemon.start()
        except RuntimeError as exc:
            assert "daemon exited 78" in str(exc)
        else:
            raise AssertionError("a start inside the old parent was not refused")
        log = daemon.logs()
        assert "sandbox.cgroup_parent" in log and "Traceback" not in log
        assert not Cgroup(nested).exists()
        assert _alive(pids) == pids
        daemon.cgroup_parent = old_parent
        daemon.start()
        assert daemon.client.agent("kept")["state"] == "active"
        assert _alive(pids) == pids
        daemon.agentctl("kill", "kept", "--reason", "done", check=True)
    finally:
        daemon.cgroup_parent = old_parent
        daemon.finish()


def test_a_parent_moved_inside_the_old_one_is_refused_and_the_agent_kept(
        tmp_root: Path) -> None:
    _nested_parent_kept_out(tmp_root, unmark=False)


def test_a_parent_moved_inside_an_unmarked_old_one_is_refused_by_the_handover(
        tmp_root: Path) -> None:
    _nested_parent_kept_out(tmp_root, unmark=True)


def test_a_cosmetic_parent_change_keeps_the_agents(tmp_root: Path) -> None:
    """"/P" written "/P/" or "//P" is the same cgroup: the restart adopts its runs."""
    daemon = new_daemon(tmp_root)
    daemon.start()
    parent = daemon.cgroup_parent
    try:
        pids = _sleeper_handed_over(daemon, "kept")
        daemon.cgroup_parent = "/" + parent + "/"
        daemon.start()
        assert daemon.client.agent("kept")["state"] == "active"
        assert _alive(pids) == pids
        assert daemon.audit_rows("adopt")[-1]["outcome"] == "ok"
        daemon.agentctl("kill", "kept", "--reason", "done", check=True)
    finally:
        daemon.cgroup_parent = parent
        daemon.finish()
