"""A pause is a hold that survives the daemon (issue 11, item 11): after an orderly restart or
a SIGKILL of the daemon, a paused agent comes back `paused`, no caller (root included) can run
it, and only resume or reactivate lifts the hold. Real daemon processes; needs root."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.support.daemon import Daemon, new_daemon, wait_for


def _paused_agent(daemon: Daemon) -> list[int]:
    daemon.agentctl("run", "--detach", "--name", "held", "--", "sleep", "600", check=True)
    wait_for(lambda: daemon.agent_pids(), timeout=30, what="the agent to run")
    pids = daemon.agent_pids()
    paused = daemon.agentctl_json("pause", "held", "--reason", "looks wrong")
    assert paused["results"][0]["new_state"] == "paused"
    return pids


def _launch_is_refused(daemon: Daemon) -> None:
    refused = daemon.agentctl("run", "--detach", "--name", "held", "--", "sleep", "600")
    assert refused.returncode != 0, refused.stdout
    assert "paused" in refused.stderr
    assert daemon.agent_pids() == []
    assert daemon.client.agent("held")["state"] == "paused"
    last = daemon.client.audit(limit=1)["entries"][-1]
    assert (last["verb"], last["outcome"]) == ("launch", "refused:illegal_transition")


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["orderly", "sigkill"])
def test_paused_stays_paused_across_a_restart(tmp_root: Path, how: signal.Signals) -> None:
    daemon = new_daemon(tmp_root)
    daemon.start()
    try:
        pids = _paused_agent(daemon)
        daemon.stop(how)
        # Orderly: the kill path ended the run; SIGKILL: the watchdog did.
        wait_for(lambda: not any(Path(f"/proc/{p}").exists() for p in pids), timeout=10,
                 what="the paused agent's processes to be gone")
        daemon.start()
        view = daemon.client.agent("held")
        assert view["state"] == "paused", view
        assert view["run"]["state"] == "killed"
        _launch_is_refused(daemon)

        # The hold stays until lifted, through any number of restarts.
        daemon.stop()
        daemon.start()
        assert daemon.client.agent("held")["state"] == "paused"

        resumed = daemon.agentctl_json("resume", "held", "--reason", "checked")
        assert resumed["results"][0]["new_state"] == "idle"
        daemon.agentctl("run", "--detach", "--name", "held", "--", "sleep", "600", check=True)
        assert daemon.client.agent("held")["state"] == "active"
        daemon.agentctl_json("kill", "held", "--reason", "done")
        assert daemon.client.audit_verify()["ok"]
    finally:
        daemon.stop()
        assert daemon.residue() == {}
        daemon.cleanup_host()


def test_reactivate_also_lifts_a_held_pause(tmp_root: Path) -> None:
    daemon = new_daemon(tmp_root)
    daemon.start()
    try:
        _paused_agent(daemon)
        daemon.stop()
        daemon.start()
        lifted = daemon.agentctl_json("reactivate", "held", "--reason", "owner decides")
        assert (lifted["results"][0]["previous_state"],
                lifted["results"][0]["new_state"]) == ("paused", "idle")
        assert daemon.client.agent("held")["state"] == "idle"
    finally:
        daemon.stop()
        assert daemon.residue() == {}
        daemon.cleanup_host()
