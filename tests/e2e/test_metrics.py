"""The metrics endpoint of a real daemon: scraped over loopback TCP and over a Unix socket while
agents are launched and killed by class and globally; a busy or non-loopback address stops the
start with an error naming it. Needs root."""

from __future__ import annotations

import http.client
import os
import socket
import stat
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.daemon import Daemon, new_daemon, running_daemon, wait_for
from tests.unit.test_metrics_web import promtool_check

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def raw_tcp(port: int) -> bytes:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        body: bytes = response.read()
        return body


def scrape_tcp(port: int) -> Samples:
    return parse(raw_tcp(port).decode())


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=10)
        self._path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(self._path)
        self.sock = sock


def scrape_unix(path: Path) -> Samples:
    conn = _UnixConnection(path)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        assert response.status == 200
        return parse(response.read().decode())
    finally:
        conn.close()


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def agents(samples: Samples, state: str, agent_class: str) -> float:
    return value(samples, "agent_supervisor_agents", state=state, **{"class": agent_class})


def launch(daemon: Daemon, name: str, agent_class: str) -> None:
    daemon.agentctl("run", "--detach", "--name", name, "--class", agent_class, "--",
                    "sleep", "600", check=True)


def test_scraped_numbers_follow_launches_and_kills_by_class(tmp_root: Path) -> None:
    port = free_port()
    with running_daemon(tmp_root, metrics={"listen": f"127.0.0.1:{port}"}) as daemon:
        before = scrape_tcp(port)
        assert value(before, "agent_supervisor_active_runs") == 0
        assert value(before, "agent_supervisor_global_halt") == 0
        assert value(before, "agent_supervisor_build_info", version=daemon.client.health()[
            "version"]) == 1
        for name, agent_class in (("w1", "web"), ("w2", "web"), ("b1", "batch")):
            launch(daemon, name, agent_class)
        samples = scrape_tcp(port)
        assert agents(samples, "active", "web") == 2
        assert agents(samples, "active", "batch") == 1
        assert value(samples, "agent_supervisor_active_runs") == 3

        killed = daemon.agentctl_json("kill", "--class", "web", "--reason", "bad push")
        assert {r["agent"] for r in killed["results"]} == {"w1", "w2"}
        samples = scrape_tcp(port)
        assert agents(samples, "killed", "web") == 2
        assert agents(samples, "active", "web") == 0
        assert agents(samples, "active", "batch") == 1
        assert value(samples, "agent_supervisor_active_runs") == 1
        assert value(samples, "agent_supervisor_kills_total", scope="class",
                     actor_kind="operator", outcome="ok") == 2
        halt = "agent_supervisor_time_to_halt_seconds"
        assert value(samples, f"{halt}_count", verb="kill") == 2
        # The histogram holds exactly the audited times (ms in the log, seconds here).
        audited = [r["time_to_halt_ms"] for r in killed["results"]]
        assert value(samples, f"{halt}_sum", verb="kill") == pytest.approx(sum(audited) / 1000)
        assert value(samples, f"{halt}_bucket", verb="kill", le="+Inf") == 2
        # The kill answers before its cleanup is audited (issue 12): the two agree once the
        # cleanup row is written.
        wait_for(lambda: value(scrape_tcp(port), "agent_supervisor_audit_rows")
                 == daemon.agentctl_json("audit", "verify")["rows"], timeout=30,
                 what="the audit_rows gauge to match the verified log")

        # Issue 16's series, from a real daemon: pauses, seccomp attempts by syscall; and the
        # whole exposition passes promtool's lint.
        daemon.agentctl("pause", "b1", "--reason", "look", check=True)
        daemon.agentctl("resume", "b1", "--reason", "looked", check=True)
        # Output bytes: a run that writes 5,000 bytes and ends moves the counters by as much
        # (no other agent here writes anything).
        before = scrape_tcp(port)
        daemon.agentctl("run", "--name", "o1", "--class", "probe", "--", "/bin/sh", "-c",
                        "head -c 5000 /dev/zero", check=True)
        after = scrape_tcp(port)
        for name in ("output_bytes_total", "output_recorded_bytes_total"):
            moved = (value(after, f"agent_supervisor_{name}")
                     - value(before, f"agent_supervisor_{name}"))
            assert moved == 5000, name
        daemon.agentctl("rm", "o1", "--reason", "counted", check=True)  # out of the kills below
        daemon.agentctl("run", "--detach", "--name", "s1", "--class", "probe", "--", "/bin/sh",
                        "-c", "unshare --user true; sleep 600", check=True)
        samples = wait_for(lambda: (lambda s: s if value(
            s, "agent_supervisor_seccomp_attempts_total", syscall="unshare") >= 1 else None)(
            scrape_tcp(port)), timeout=30, what="the unshare attempt counted")
        assert value(samples, "agent_supervisor_pauses_total", scope="agent",
                     actor_kind="operator") == 1
        assert value(samples, "agent_supervisor_approvals_pending") == 0
        promtool_check(raw_tcp(port))
        daemon.agentctl("kill", "s1", "--reason", "probe done", check=True)

        daemon.agentctl_json("kill", "--all", "--reason", "incident")
        samples = scrape_tcp(port)
        assert value(samples, "agent_supervisor_global_halt") == 1
        assert agents(samples, "killed", "batch") == 1
        assert value(samples, "agent_supervisor_kills_total", scope="global",
                     actor_kind="operator", outcome="ok") == 1  # w1, w2 killed already: skipped
        assert value(samples, f"{halt}_count", verb="kill") == 4  # w1, w2, s1, b1
        daemon.agentctl_json("reactivate", "--all", "--reason", "test over")
        assert value(scrape_tcp(port), "agent_supervisor_global_halt") == 0
    # The endpoint goes away with the daemon.
    with pytest.raises(OSError):
        scrape_tcp(port)


def test_metrics_on_a_unix_socket(tmp_root: Path) -> None:
    daemon = new_daemon(tmp_root)
    path = daemon.root / "run" / "metrics.sock"
    daemon.extra_config["metrics"] = {"listen": f"unix:{path}"}
    daemon.start()
    try:
        mode = path.stat()
        assert stat.S_ISSOCK(mode.st_mode) and stat.S_IMODE(mode.st_mode) == 0o660
        assert mode.st_uid == 0
        launch(daemon, "u1", "unix")
        samples = scrape_unix(path)
        assert agents(samples, "active", "unix") == 1
    finally:
        assert daemon.stop() == 0
        daemon.cleanup_host()
    assert not path.exists()
    assert daemon.clean() == {}


def test_the_webhook_backlog_is_the_outboxs(tmp_root: Path) -> None:
    port = free_port()
    secret = tmp_root / "webhook.secret"
    secret.write_text("metrics-test-secret\n")
    secret.chmod(0o600)
    # Nothing listens on the hook's port: every event stays in the outbox.
    hook = {"url": f"http://127.0.0.1:{free_port()}/hook", "secret_file": str(secret)}
    with running_daemon(tmp_root, metrics={"listen": f"127.0.0.1:{port}"},
                        webhooks=[hook]) as daemon:
        launch(daemon, "h1", "hooks")
        daemon.agentctl("kill", "h1", "--reason", "test over", check=True)
        backlog = wait_for(lambda: value(scrape_tcp(port), "agent_supervisor_webhook_backlog"),
                           what="a webhook backlog")
        assert backlog >= 2  # agent.launched and agent.killed at least


def _start_fails(daemon: Daemon) -> str:
    with pytest.raises(RuntimeError) as info:
        daemon.start()
    assert daemon.proc is not None
    assert daemon.proc.returncode == 78  # EX_CONFIG
    return str(info.value)


def test_a_busy_port_stops_the_start_naming_the_address(tmp_root: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        daemon = new_daemon(tmp_root, metrics={"listen": listen})
        try:
            message = _start_fails(daemon)
        finally:
            daemon.cleanup_host()
    assert f"cannot serve metrics on {listen}" in message
    assert "in use" in message
    # Disarmed in order: the watchdog did not fire, and nothing of the daemon stayed behind.
    assert not (daemon.root / "state" / "watchdog.jsonl").exists()
    assert not daemon.socket.exists()
    assert daemon.clean() == {}


def test_a_non_loopback_address_is_refused_at_start(tmp_root: Path) -> None:
    daemon = new_daemon(tmp_root, metrics={"listen": f"0.0.0.0:{free_port()}"})
    try:
        message = _start_fails(daemon)
    finally:
        daemon.cleanup_host()
    assert "[metrics] listen = '0.0.0.0:" in message and "loopback" in message


def test_metrics_are_off_by_default_in_test_daemons(daemon: Daemon) -> None:
    assert "listen = \"\"" in daemon.config_path.read_text()
    wait_for(lambda: "ready on" in daemon.logs(), what="the ready line")
    assert "metrics on" not in daemon.logs()
    assert os.path.exists(daemon.socket)
