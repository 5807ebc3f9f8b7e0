"""The Docker engine failing under a running agent: with dockerd not answering, the kill still
happens through the cgroup and is audited, new runs are refused with a clear error, and once
the engine is back a restart of the supervisor removes the container it could not. A private
dockerd of the test's own is stopped (SIGSTOP) and resumed. Real processes; needs root."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import require_docker
from tests.e2e.test_failclosed import FORKER, _alive
from tests.support.daemon import TEST_HOST_ROOT_IMAGE, new_daemon, wait_for
from tests.support.dockerd import private_dockerd


def test_engine_down_mid_run_kill_through_the_cgroup_refuse_new_runs(tmp_root: Path) -> None:
    require_docker()
    with private_dockerd() as engine:
        daemon = new_daemon(tmp_root, sandbox={"runtime": "docker"},
                            docker={"socket": engine.url, "api_timeout": 5,
                                    "host_root_image": TEST_HOST_ROOT_IMAGE})
        daemon.start()
        try:
            daemon.agentctl("run", "--detach", "--name", "stranded", "--", "/bin/sh", "-c",
                            FORKER, check=True)
            wait_for(lambda: len(daemon.agent_pids()) >= 50, timeout=30, what="processes")
            pids = daemon.agent_pids()

            engine.freeze()
            assert len(_alive(pids)) >= 50, "the agent outlives the engine (containerd holds it)"

            # A new run needs the engine: refused, clearly, and nothing is left half-made.
            refused = daemon.agentctl("run", "--name", "newcomer", "--", "true")
            assert refused.returncode == 125, refused.stderr
            assert "engine_unavailable" in refused.stderr and engine.url in refused.stderr

            # The kill needs only the kernel.
            result = daemon.agentctl_json("kill", "stranded", "--reason", "engine is down")
            [entry] = result["results"]
            assert entry["new_state"] == "killed" and entry["time_to_halt_ms"] > 0
            assert _alive(pids) == []
            assert all(not c.populated() for c in daemon.cgroups())
            audit = [e for e in daemon.client.audit()["entries"] if e["verb"] == "kill"]
            assert audit[-1]["outcome"] == "ok"
            assert audit[-1]["detail"]["mechanism"] == "cgroup.kill"
            assert audit[-1]["detail"]["confirmed_empty"] is True
            # The run's container could not be removed: requests the stopped engine holds may
            # still remove it when it resumes; otherwise the next start reaps it by its label.
            daemon.stop()
            engine.thaw()
            daemon.start()
            assert daemon.clean() == {}
        finally:
            daemon.stop()
            daemon.cleanup_host()
