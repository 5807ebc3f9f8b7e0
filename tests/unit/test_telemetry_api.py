"""Telemetry through the control plane, without root: the arbiter's sampler at a run's start
and end, GET /v1/runs/{ref}/telemetry and the summary in GET /v1/agents/{name}, `agentctl
telemetry` and `agentctl inspect`. The real API on a Unix socket in tmp, the FakeRuntime, and a
hub whose cgroups are directories in tmp (ticks are driven by the test, not by a thread)."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from click.testing import CliRunner, Result

from supervisor.api.client import Client
from supervisor.api.server import build_app
from supervisor.audit import AuditLog
from supervisor.cli.main import cli
from supervisor.config import RolesSection
from supervisor.daemon.arbiter import Arbiter
from supervisor.daemon.observers import RunObservers
from supervisor.daemon.store import Store, connect
from supervisor.errors import AgentNotFound, InvalidRequest, RouteNotFound
from supervisor.models import ActionRequest, RunRequest, Scope
from supervisor.sandbox.cgroups import Cgroup
from supervisor.telemetry.sampler import TelemetryHub
from supervisor.telemetry.store import SummaryStore
from tests.unit.conftest import (
    ALICE,
    WAIT,
    ArbiterEnv,
    ServerThread,
    make_config,
    raw_request,
    spend_request_key_warning,
    wait_done,
)
from tests.unit.test_telemetry import MIB, FakeProcess, PlainReader

# ----------------------------------------------------------------------------- arbiter hooks


@dataclass
class RecordingSampler:
    """A `Sampler` (daemon/observers.py) that keeps what it was told."""

    started: list[tuple[str, str, float]] = field(default_factory=list)
    ended: list[str] = field(default_factory=list)

    def run_started(self, run_id: str, cgroup: str, started_at: float) -> None:
        self.started.append((run_id, cgroup, started_at))

    def run_ended(self, run_id: str) -> None:
        self.ended.append(run_id)


def test_the_arbiter_tells_its_sampler_when_a_run_starts_and_ends(env: ArbiterEnv) -> None:
    async def body() -> None:
        arbiter = env.arbiter()
        sampler = RecordingSampler()
        arbiter.observers = RunObservers(sampler=sampler)
        started, ended = sampler.started, sampler.ended
        request = RunRequest(name="a1", command=["sleep", "infinity"])
        first = await arbiter.launch(request, ALICE)
        record = env.store.run(first.id)
        assert record is not None
        assert started == [(first.id, record.cgroup, record.started_at)]
        assert ended == []
        env.runtime.handles[first.id].finish(0)  # exits by itself
        await wait_done(arbiter, first.id)
        assert ended == [first.id]
        second = await arbiter.launch(request, ALICE)
        await arbiter.act("kill", ActionRequest(scope=Scope(agent="a1")), ALICE)
        assert [s[0] for s in started] == [first.id, second.id]
        # A kill's runs are told after its answer (test_killpath.py holds that order).
        await asyncio.wait_for(arbiter.settled(second.id), WAIT)
        assert ended == [first.id, second.id]

    asyncio.run(body())


# ----------------------------------------------------------------------------- the API


@dataclass
class DirectorySampling:
    """The daemon's RunSampling (daemon/core.py) over cgroups that are directories in tmp."""

    hub: TelemetryHub
    cgroups: Path

    def run_started(self, run_id: str, relative: str, started_at: float) -> None:
        path = self.cgroups / relative
        path.mkdir(parents=True)
        TelemetryServer.write_cgroup(path, pids=[], cpu_usec=0, memory=0)
        self.hub.register(run_id, Cgroup(relative, root=self.cgroups, host_root=self.cgroups),
                          started_at)

    def run_ended(self, run_id: str) -> None:
        self.hub.unregister(run_id)


@dataclass
class TelemetryServer(ServerThread):
    """The unit tier's API server with a telemetry hub wired as agent-supervisord wires it."""

    hub: TelemetryHub | None = None
    processes: dict[int, FakeProcess] = field(default_factory=dict)

    async def _setup(self) -> None:
        config = make_config(self.root, self.kill)
        self._db = connect(config.daemon.state_dir / "state.db")
        self.arbiter = Arbiter(config, Store(self._db), AuditLog(self._db), self.runtime)
        hub = TelemetryHub(10.0, 1, 600, asyncio.get_running_loop(),
                           store=SummaryStore(self._db), cgroup_reader=PlainReader(),
                           process_source=self.processes.__getitem__,
                           fd_reader=lambda pid, _ns: (self.processes[pid].fds, set()))
        self.hub = hub
        self.arbiter.observers = RunObservers(sampler=DirectorySampling(hub, self.root / "cgroup"))
        self._runner = web.AppRunner(build_app(self.arbiter, self.roles, telemetry=hub))
        await self._runner.setup()
        await web.UnixSite(self._runner, str(self.socket_path)).start()

    @staticmethod
    def write_cgroup(path: Path, pids: list[int], cpu_usec: int, memory: int) -> None:
        (path / "cgroup.procs").write_text("".join(f"{p}\n" for p in pids))
        (path / "cgroup.stat").write_text("nr_descendants 0\n")
        (path / "cpu.stat").write_text(f"usage_usec {cpu_usec}\n")
        (path / "memory.current").write_text(f"{memory}\n")
        (path / "memory.events").write_text("oom_kill 0\n")

    def cgroup_of(self, run_id: str) -> Path:
        assert self.arbiter is not None
        record = self.arbiter.live[run_id].record
        return self.root / "cgroup" / record.cgroup

    def tick(self) -> None:
        """One sampler tick, delivered in the server's loop."""
        assert self.hub is not None
        hub = self.hub
        self.call(lambda: hub.deliver(hub.sample_once()))


@pytest.fixture
def tserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TelemetryServer]:
    spend_request_key_warning()
    root = tmp_path_factory.mktemp("tapi")
    server = TelemetryServer(root=root, socket_path=root / "control.sock",
                             roles=RolesSection(owner=[f"user:{os.getuid()}"]))
    server.start()
    yield server
    try:
        assert server.call(server.audit.verify).ok
    finally:
        server.stop()


def client_of(server: ServerThread) -> Client:
    return Client(server.socket_path, timeout=WAIT)


def launch_sampled(server: TelemetryServer) -> str:
    """Agent a1 with two processes, sampled three times (memory 16, 64, 32 MiB)."""
    view = client_of(server).run({"name": "a1", "command": ["sleep", "infinity"]})
    run_id = str(view["id"])
    server.processes[501] = FakeProcess(501, name_="python3", threads=2, fds=7)
    server.processes[502] = FakeProcess(502, name_="sh", ppid_=501, fds=3)
    path = server.cgroup_of(run_id)
    for step, memory_mib in enumerate((16, 64, 32)):
        server.write_cgroup(path, [501, 502], cpu_usec=(step + 1) * 100_000,
                            memory=memory_mib * MIB)
        server.tick()
    return run_id


def test_live_samples_and_summary(tserver: TelemetryServer) -> None:
    run_id = launch_sampled(tserver)
    client = client_of(tserver)
    data = client.telemetry("a1", limit=2)
    assert (data["run"], data["agent"], data["state"], data["live"]) == (
        run_id, "a1", "running", True)
    assert [s["memory_bytes"] for s in data["samples"]] == [64 * MIB, 32 * MIB]
    sample = data["samples"][-1]
    assert (sample["processes"], sample["open_fds"], sample["threads"]) == (2, 10, 3)
    assert sample["commands"] == ["python3", "sh"] and sample["children"] == 1
    summary = data["summary"]
    assert summary["samples"] == 3 and summary["ended_at"] is None
    assert summary["peak_memory_bytes"] == 64 * MIB and summary["peak_processes"] == 2
    assert summary["cpu_seconds"] == pytest.approx(0.3)
    assert client.telemetry(run_id, limit=20)["samples"] == client.telemetry("a1")["samples"]
    assert len(client.telemetry("a1", limit=20)["samples"]) == 3
    assert client.telemetry("a1", limit=0)["samples"] == []
    assert client.agent("a1")["telemetry"] == summary


def test_an_ended_run_keeps_its_summary(tserver: TelemetryServer) -> None:
    run_id = launch_sampled(tserver)
    client = client_of(tserver)
    client.action("kill", {"agent": "a1"}, reason="done")
    data = client.telemetry("a1")
    assert (data["run"], data["state"], data["live"], data["samples"]) == (
        run_id, "killed", False, [])
    summary = data["summary"]
    assert summary["ended_at"] is not None and summary["samples"] == 3
    assert summary["peak_memory_bytes"] == 64 * MIB
    assert client.agent("a1")["telemetry"] == summary
    stored = tserver.call(lambda: SummaryStore(tserver._db).get(run_id))  # type: ignore[arg-type]
    assert stored is not None and stored.model_dump(mode="json") == summary


def test_telemetry_errors(tserver: TelemetryServer) -> None:
    launch_sampled(tserver)
    client = client_of(tserver)
    with pytest.raises(AgentNotFound):
        client.telemetry("nobody")
    with pytest.raises(InvalidRequest):
        client.telemetry("a1", limit=-1)
    with pytest.raises(InvalidRequest):
        client.telemetry("a1", limit=10_001)
    status, body = raw_request(tserver.socket_path, "GET", "/v1/runs/a1/telemetry?limit=x")
    assert status == 422 and body["error"]["code"] == "invalid_request"


def test_a_daemon_without_telemetry_says_so(server: ServerThread) -> None:
    client = client_of(server)
    client.run({"name": "a1", "command": ["sleep", "infinity"]})
    with pytest.raises(RouteNotFound, match="telemetry is not available"):
        client.telemetry("a1")
    assert client.agent("a1")["telemetry"] is None


# ----------------------------------------------------------------------------- agentctl


def agentctl(server: ServerThread, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--socket", str(server.socket_path), *args],
                              catch_exceptions=True)


def test_agentctl_telemetry_table_and_json(tserver: TelemetryServer) -> None:
    run_id = launch_sampled(tserver)
    result = agentctl(tserver, "telemetry", "a1", "--limit", "2")
    assert result.exit_code == 0, (result.output, result.exception)
    lines = result.stdout.splitlines()
    assert lines[0] == f"run {run_id} of agent a1: running (live)"
    assert lines[1].split() == ["TIME", "CPU%", "MEMORY", "PROCS", "FDS", "THREADS", "SYSCALLS"]
    assert [line.split()[2:] for line in lines[2:4]] == [
        ["64M", "2", "10", "3", "0"], ["32M", "2", "10", "3", "0"]]
    assert "telemetry (live, 3 samples):" in lines
    assert any(line.split() == ["peak_memory", "64M"] for line in lines)

    as_json = agentctl(tserver, "telemetry", "a1", "--json")
    assert as_json.exit_code == 0
    assert json.loads(as_json.stdout) == client_of(tserver).telemetry("a1", limit=20)

    missing = agentctl(tserver, "telemetry", "nobody")
    assert missing.exit_code != 0 and "agent_not_found" in missing.stderr


def test_agentctl_inspect_shows_the_summary(tserver: TelemetryServer) -> None:
    launch_sampled(tserver)
    live = agentctl(tserver, "inspect", "a1")
    assert live.exit_code == 0, live.output
    assert "telemetry (live, 3 samples):" in live.stdout
    client_of(tserver).action("kill", {"agent": "a1"}, reason="done")
    final = agentctl(tserver, "inspect", "a1")
    lines = final.stdout.splitlines()
    assert "telemetry (final, 3 samples):" in lines
    block = lines[lines.index("telemetry (final, 3 samples):") + 1:]
    assert [line.split() for line in block] == [
        ["peak_memory", "64M"], ["cpu_seconds", "0.30"], ["peak_processes", "2"],
        ["syscall_attempts", "0"]]
    data = json.loads(agentctl(tserver, "inspect", "a1", "--json").stdout)
    assert data["telemetry"]["peak_memory_bytes"] == 64 * MIB
