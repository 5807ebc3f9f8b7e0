"""A restart or a stop with callers attached to the control socket (issue 13, audit F3): a
foreground `agentctl run` and `agentctl logs -f` are told at once that the daemon is
restarting (one line) while their agent is handed over, and follow it again from where they
stopped once the next daemon has adopted it; a `stop --grace` in its grace period goes on to
the kill path and answers its caller before the handover; a stop (SIGTERM) ends the streams
(one line, exit 75) and the stop the same way. Before, the daemon waited for them (aiohttp's
60 s, twice) into systemd's SIGKILL, which killed every agent with no handover. Real daemon
processes, runc, cgroups; needs root."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import Daemon, new_daemon, wait_for
from tests.support.procs import alive as _alive
from tests.support.procs import lasting as _lasting

TICKER = ["/bin/sh", "-c", "i=0; while true; do i=$((i+1)); echo tick-$i; sleep 0.1; done"]
# Says when SIGTERM came and goes on: only the kill path ends it. (Its `sleep` children take
# the stop's SIGTERM and die; the loop starts another.)
STUBBORN = ["/bin/sh", "-c", "trap 'echo got-term' TERM; while true; do sleep 0.1; done"]
RESTARTING = ("agentctl: the daemon is restarting; run {run} keeps running: following it "
              "again once the daemon is back (up to 120s)")
STOPPING = "agentctl: the daemon is stopping and kills every agent, run {run} among them"


@dataclass
class Attached:
    """An agentctl process attached to the daemon, its output in files."""

    proc: subprocess.Popen[bytes]
    out: Path
    err: Path

    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def finish(self) -> int:
        """Its exit status (a hung client is a failure, not a hang of the suite)."""
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"agentctl did not end\nstdout: {self.stdout()[-2000:]}\n"
                                 f"stderr: {self.stderr()}") from None


def attach(daemon: Daemon, name: str, *args: str) -> Attached:
    out, err = daemon.root / f"{name}.out", daemon.root / f"{name}.err"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor.cli", *args], stdout=stdout, stderr=stderr,
            stdin=subprocess.DEVNULL, cwd=daemon.root,
            env={**os.environ, "AGENT_SUPERVISOR_SOCKET": str(daemon.socket)})
    return Attached(proc, out, err)


def _ticks(text: str) -> list[int]:
    return [int(line[5:]) for line in text.splitlines() if line.startswith("tick-")]


def _adopted_alive(daemon: Daemon, name: str, run: dict[str, Any], pids: list[int]) -> None:
    """After daemon.start(): the run was handed over and adopted whole, its processes the
    same, and its output goes on."""
    view = daemon.client.agent(name)
    assert view["state"] == "active", view
    assert view["run"]["id"] == run["id"] and view["run"]["pid"] == run["pid"]
    assert _alive(pids) == pids and set(pids) <= set(daemon.agent_pids())
    [handover] = daemon.audit_rows("daemon_handover")
    assert run["id"] in [r["run_id"] for r in handover["detail"]["runs"]], handover
    assert handover["detail"]["killed"] == {}, handover
    assert [r["outcome"] for r in daemon.audit_rows("adopt")
            if r["detail"]["run"] == run["id"]] == ["ok"]
    seen = len(_ticks(daemon.agentctl("logs", name, check=True).stdout))
    wait_for(lambda: len(_ticks(daemon.agentctl("logs", name, check=True).stdout)) > seen,
             timeout=30, what="the adopted agent's output to go on")


@pytest.mark.parametrize("stream", ["run", "logs -f"])
def test_a_restart_tells_an_attached_stream_and_keeps_its_agent(tmp_root: Path,
                                                              stream: str) -> None:
    daemon = new_daemon(tmp_root)
    daemon.start()
    try:
        if stream == "run":  # the foreground run: agentctl follows its own agent
            client = attach(daemon, "client", "run", "--name", "ticker", "--", *TICKER)
            wait_for(lambda: len(_ticks(client.stdout())) >= 3, timeout=30,
                     what="the foreground run's output")
        else:
            daemon.agentctl("run", "--detach", "--name", "ticker", "--", *TICKER, check=True)
            client = attach(daemon, "client", "logs", "-f", "ticker")
            wait_for(lambda: len(_ticks(client.stdout())) >= 3, timeout=30,
                     what="the followed output")
        run = daemon.client.agent("ticker")["run"]
        wait_for(lambda: len(_lasting(run["pid"])) == 2, timeout=30, what="init and shell")
        pids = _lasting(run["pid"])

        assert daemon.stop(signal.SIGUSR2) == 0, daemon.logs()[-6000:]
        # Told at once, on one line; agentctl then waits for the next daemon.
        wait_for(lambda: client.stderr(), timeout=30, what="agentctl's notice")
        assert client.stderr() == RESTARTING.format(run=run["id"]) + "\n", client.stderr()
        assert client.proc.poll() is None
        before = _ticks(client.stdout())
        assert before == list(range(1, len(before) + 1)) and len(before) >= 3
        assert _alive(pids) == pids  # no daemon: the agent runs on

        daemon.start()
        _adopted_alive(daemon, "ticker", run, pids)
        # Followed again from where the stream stopped: nothing lost, nothing twice, and
        # the output written while no daemon was there comes first.
        wait_for(lambda: len(_ticks(client.stdout())) > len(before) + 5, timeout=30,
                 what="agentctl to follow the adopted run again")
        daemon.agentctl_json("kill", "ticker", "--reason", "end of test")
        assert client.finish() == (137 if stream == "run" else 0), client.stderr()
        printed = _ticks(client.stdout())
        assert printed == list(range(1, len(printed) + 1)), printed
        assert "agent-supervisor:" not in client.stdout()  # the notice is not output
        lines = client.stderr().splitlines()
        assert lines[0] == RESTARTING.format(run=run["id"]), lines
        assert len(lines) == (2 if stream == "run" else 1), lines  # run: "agent killed"
    finally:
        daemon.finish()


def test_a_restart_ends_a_stop_in_its_grace_and_answers_it(tmp_root: Path) -> None:
    """The stop completes first: its grace is cut short (the kill path, audited as the stop),
    its caller gets the answer, and the restart hands the other agents over."""
    daemon = new_daemon(tmp_root)
    daemon.start()
    try:
        daemon.agentctl("run", "--detach", "--name", "kept", "--", *TICKER, check=True)
        daemon.agentctl("run", "--detach", "--name", "stopping", "--", *STUBBORN, check=True)
        kept = daemon.client.agent("kept")["run"]
        stopping = daemon.client.agent("stopping")["run"]
        wait_for(lambda: len(_lasting(kept["pid"])) == 2, timeout=30, what="init and shell")
        kept_pids = _lasting(kept["pid"])
        stop = attach(daemon, "stop", "stop", "stopping", "--grace", "10m", "--reason",
                      "rollout")
        wait_for(lambda: "got-term" in daemon.agentctl("logs", "stopping").stdout,
                 timeout=30, what="the stop's SIGTERM")

        assert daemon.stop(signal.SIGUSR2) == 0, daemon.logs()[-6000:]
        assert stop.finish() == 0, (stop.stdout(), stop.stderr())
        assert "stopping" in stop.stdout() and "active -> idle" in stop.stdout(), stop.stdout()
        assert _alive(kept_pids) == kept_pids

        daemon.start()
        _adopted_alive(daemon, "kept", kept, kept_pids)
        [handover] = daemon.audit_rows("daemon_handover")
        assert stopping["id"] not in [r["run_id"] for r in handover["detail"]["runs"]]
        [row] = [r for r in daemon.audit_rows("stop") if r["target"] == "stopping"]
        assert row["reason"] == "rollout (grace cut short: the daemon is restarting)", row
        assert row["detail"]["confirmed_empty"] is True
        view = daemon.client.agent("stopping")
        assert view["state"] == "idle" and view["run"]["state"] == "killed", view
        daemon.agentctl_json("kill", "kept", "--reason", "end of test")
    finally:
        daemon.finish()


def test_a_stop_ends_the_streams_and_the_stops_in_their_grace(tmp_root: Path) -> None:
    """SIGTERM (`systemctl stop`): every agent is killed as before; a follow stream is told
    so at once and a stop in its grace answers, instead of holding the daemon."""
    daemon = new_daemon(tmp_root)
    daemon.start()
    try:
        daemon.agentctl("run", "--detach", "--name", "ticker", "--", *TICKER, check=True)
        daemon.agentctl("run", "--detach", "--name", "stopping", "--", *STUBBORN, check=True)
        run = daemon.client.agent("ticker")["run"]
        follow = attach(daemon, "follow", "logs", "-f", "ticker")
        wait_for(lambda: len(_ticks(follow.stdout())) >= 3, timeout=30, what="the output")
        stop = attach(daemon, "stop", "stop", "stopping", "--grace", "10m", "--reason",
                      "rollout")
        wait_for(lambda: "got-term" in daemon.agentctl("logs", "stopping").stdout,
                 timeout=30, what="the stop's SIGTERM")

        assert daemon.stop(signal.SIGTERM) == 0, daemon.logs()[-6000:]
        assert follow.finish() == 75, (follow.stdout()[-500:], follow.stderr())
        lines = follow.stderr().splitlines()
        assert len(lines) == 1 and lines[0].startswith(STOPPING.format(run=run["id"])), lines
        assert stop.finish() == 0, (stop.stdout(), stop.stderr())
        assert "active -> idle" in stop.stdout(), stop.stdout()
        assert daemon.agent_pids() == []

        daemon.start()
        assert not daemon.audit_rows("daemon_handover")
        [row] = [r for r in daemon.audit_rows("stop") if r["target"] == "stopping"]
        assert row["reason"] == "rollout (grace cut short: the daemon is stopping)", row
        assert daemon.client.agent("ticker")["run"]["state"] == "killed"
    finally:
        daemon.finish()
