"""Webhooks from a real daemon to a test receiver on 127.0.0.1 that refuses the first deliveries
and is later down altogether: every event still arrives exactly once by id, in order per
agent, validly signed, across an orderly restart (SIGTERM) and a crash (SIGKILL). Needs root."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import Daemon, new_daemon, running_daemon, wait_for
from tests.support.webhooks import Receiver, ThreadedReceiver, check_deliveries, outbox_rows

SECRET = "e2e-webhook-secret"
SLEEPER = ["/bin/sh", "-c", "trap 'exit 0' TERM; sleep 600 & wait"]


@pytest.fixture
def receiver() -> Iterator[ThreadedReceiver]:
    threaded = ThreadedReceiver(Receiver(SECRET.encode(), fail_first=4))
    threaded.start()
    yield threaded
    threaded.stop()


@pytest.fixture
def hooked(tmp_root: Path, receiver: ThreadedReceiver) -> Iterator[Daemon]:
    secret = tmp_root / "webhook.secret"
    secret.write_text(SECRET + "\n")
    secret.chmod(0o600)
    with running_daemon(
        tmp_root,
        webhooks=[{"url": receiver.receiver.url, "secret_file": str(secret)}],
        webhook_delivery={"timeout": "2s", "backoff_initial": "50ms", "backoff_max": "500ms"},
    ) as daemon:
        yield daemon


def act(daemon: Daemon, verb: str, agent: str, **extra: Any) -> None:
    daemon.client.action(verb, {"agent": agent}, reason=f"{verb} {agent}", **extra)


def launch(daemon: Daemon, agent: str, command: list[str] = SLEEPER) -> None:
    daemon.client.run({"name": agent, "command": command})


def drained(daemon: Daemon, receiver: ThreadedReceiver) -> list[dict[str, Any]]:
    """The outbox once every row is delivered (bounded wait), checked against the receiver."""
    def done() -> list[dict[str, Any]] | None:
        rows = outbox_rows(daemon.state_db)
        return rows if rows and all(r["delivered_at"] for r in rows) else None

    rows: list[dict[str, Any]] = wait_for(done, timeout=15, what="the outbox to drain")
    check_deliveries(rows, receiver.receiver.received)
    return rows


def events_of(rows: list[dict[str, Any]], agent: str) -> list[str]:
    return [r["event_type"] for r in rows if r["agent"] == agent]


def test_every_event_arrives_once_in_order_signed_across_restarts(
        hooked: Daemon, receiver: ThreadedReceiver) -> None:
    daemon = hooked
    # Two agents through every verb, interleaved; the receiver answers 503 to the first four.
    launch(daemon, "w1")
    launch(daemon, "w2")
    act(daemon, "pause", "w1")
    act(daemon, "pause", "w2")
    act(daemon, "resume", "w1")
    act(daemon, "kill", "w1")
    act(daemon, "resume", "w2")
    act(daemon, "stop", "w2", grace="5s")
    act(daemon, "reactivate", "w1")
    launch(daemon, "w1", ["/bin/true"])
    wait_for(lambda: daemon.client.agent("w1")["state"] == "idle", what="w1 to exit")
    act(daemon, "kill", "w2")
    act(daemon, "reactivate", "w2")

    rows = drained(daemon, receiver)
    assert events_of(rows, "w1") == [
        "agent.launched", "agent.paused", "agent.resumed", "agent.killed",
        "agent.reactivated", "agent.launched", "agent.exited"]
    assert events_of(rows, "w2") == [
        "agent.launched", "agent.paused", "agent.resumed", "agent.exited", "agent.killed",
        "agent.reactivated"]
    assert sum(r.status == 503 for r in receiver.receiver.received) == 4
    killed = next(r.payload for r in receiver.receiver.accepted()
                  if r.event_type == "agent.killed" and r.payload["agent"] == "w1")
    assert killed["actor"].startswith("root(uid=0)") and killed["reason"] == "kill w1"
    assert (killed["previous_state"], killed["new_state"]) == ("active", "killed")
    assert killed["time_to_halt_ms"] > 0 and killed["run"]

    # The receiver goes away; events keep coming; the daemon stops in order meanwhile.
    receiver.stop()
    launch(daemon, "w1")
    launch(daemon, "w2")
    act(daemon, "kill", "w1")
    assert daemon.stop(signal.SIGTERM) == 0
    pending = [r for r in outbox_rows(daemon.state_db) if not r["delivered_at"]]
    assert Counter(r["event_type"] for r in pending if r["event_type"].startswith(
        "agent.")) == Counter(
        {"agent.launched": 2, "agent.killed": 1, "agent.exited": 1})  # exited: the shutdown
    # The audit checkpoints (after the kill, the shutdown, the stop) wait to leave the host too.
    assert {r["event_type"] for r in pending} - {"agent.launched", "agent.killed",
                                                  "agent.exited"} == {"audit.checkpoint"}
    receiver.start()
    daemon.start()
    rows = drained(daemon, receiver)
    assert events_of(rows, "w2")[-2:] == ["agent.launched", "agent.exited"]

    # Again, but the daemon is SIGKILLed: its watchdog kills the agents, the next instance
    # reaps them (agent.killed) and delivers what the dead one could not.
    receiver.stop()
    act(daemon, "reactivate", "w1")
    launch(daemon, "w1")
    act(daemon, "pause", "w1")
    daemon.stop(signal.SIGKILL)
    receiver.start()
    daemon.start()
    rows = drained(daemon, receiver)
    assert events_of(rows, "w1")[-4:] == [
        "agent.reactivated", "agent.launched", "agent.paused", "agent.killed"]
    last_of_w1 = [r for r in rows if r["agent"] == "w1"][-1]
    reaped = next(r.payload for r in receiver.receiver.accepted()
                  if r.event_id == last_of_w1["event_id"])
    assert reaped["verb"] == "reap" and reaped["agent"] == "w1"
    assert reaped["reason"].startswith("reaped at startup")
    assert daemon.client.audit_verify()["ok"]
    # Each signed audit checkpoint left the host too (issue 11, item 10): the receiver holds
    # them, every one the same as the host's checkpoint file, signature and all.
    filed = [json.loads(line) for line in daemon.checkpoint_file.read_text().splitlines()]
    sent = [json.dumps(r.payload, sort_keys=True) for r in receiver.receiver.accepted()
            if r.event_type == "audit.checkpoint"]
    assert len(sent) >= 3, sent
    for payload in sent:
        assert any(c["sig"] in payload and str(c["seq"]) in payload for c in filed), payload


def test_a_readable_secret_stops_the_daemon_naming_the_endpoint(tmp_root: Path) -> None:
    secret = tmp_root / "webhook.secret"
    secret.write_text(SECRET)
    secret.chmod(0o644)
    daemon = new_daemon(tmp_root, webhooks=[{"url": "https://hooks.example.com/T0/B0/PathKey-Q7",
                                             "secret_file": str(secret)}])
    try:
        with pytest.raises(RuntimeError, match="daemon exited 78"):
            daemon.start()
        logs = daemon.logs()
        assert "agent-supervisord: webhooks[0] (https://hooks.example.com/…)" in logs
        assert "is accessible by group or others (mode 0644); chmod 600 it" in logs
        assert "PathKey-Q7" not in logs  # a Slack URL's path is its credential
        assert not daemon.socket.exists()
        # Refused before anything started: no watchdog, no state, nothing to sweep.
        assert not (daemon.root / "state").exists()
        check = subprocess.run(
            [sys.executable, "-m", "supervisor.daemon", "--config", str(daemon.config_path),
             "--check-config"], capture_output=True, text=True)
        assert check.returncode == 78 and "webhooks[0]" in check.stderr
    finally:
        daemon.cleanup_host()
