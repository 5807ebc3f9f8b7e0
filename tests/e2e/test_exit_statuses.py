"""A run that does not start exits as `docker run` does (issue 13), on both runtimes: 127 the
command is not found (with a hint about the working directory and --workspace), 126 it cannot
be executed; the API answers these 422 with a structured error, never 500 and never a runtime's
log line. Commands the daemon can see are refused before anything is made; commands under the
workspace are exec'd by the sandbox's init, which ends the run 126 or 127 itself. 125, the
supervisor could not start the run (HTTP 424), is proven where the launch fails:
test_launch_failure.py's broken rootfs, test_egress.py's missing secret, test_docker.py's
engine-socket bind, test_docker_engine_faults.py. Needs root, runc and (for the docker cases)
dockerd."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.conftest import BOTH_RUNTIMES
from tests.support.daemon import Daemon

pytestmark = BOTH_RUNTIMES



REFUSED = [
    (["no-such-command-here"], 127, "command_not_found"),
    (["/usr/bin/no-such-command"], 127, "command_not_found"),
    (["./agent.py"], 127, "command_not_found"),
    (["/etc/passwd"], 126, "command_not_executable"),
    (["/usr/bin"], 126, "command_not_executable"),
]


def test_a_command_the_sandbox_cannot_run_exits_like_docker_run(daemon: Daemon) -> None:
    for command, status, code in REFUSED:
        result = daemon.agentctl("run", "--name", "ghost", "--", *command)
        assert result.returncode == status, result
        assert f"agentctl: {code}:" in result.stderr and "hint:" in result.stderr, result
        assert "runc" not in result.stderr and "level=" not in result.stderr, result.stderr
        if status == 127:
            assert "--workspace" in result.stderr, result.stderr
        detached = daemon.agentctl("run", "--detach", "--json", "--name", "ghost", "--",
                                   *command)
        assert detached.returncode == status, detached
        body = json.loads(detached.stdout)["error"]
        assert body["code"] == code and body["detail"]["command"] == command[0], body
        # Refused before anything was made: no agent registered, nothing on the host.
        assert "ghost" not in [a["name"] for a in daemon.client.agents()["agents"]]
        assert daemon.clean() == {}


def _workspace(tmp: Path) -> Path:
    workspace = tmp / "ws"
    workspace.mkdir()
    (workspace / "data.txt").write_text("not a program\n")
    for path in (workspace, workspace / "data.txt"):
        os.chown(path, 1000, 1000)
    return workspace


def test_a_workspace_command_the_init_cannot_exec_ends_the_run_126_or_127(
        daemon: Daemon) -> None:
    workspace = _workspace(daemon.root)
    for command, status in (["./missing.sh"], 127), (["./data.txt"], 126), (["/workspace"], 126):
        result = daemon.agentctl("run", "--name", "wsghost", "--workspace", str(workspace),
                                 "--", *command)
        assert result.returncode == status, result
        # The sandbox's init says why, in the run's own output.
        assert f"exec {command[0]} failed" in result.stdout + result.stderr, result
        assert daemon.client.agent("wsghost")["state"] != "killed"
        assert daemon.clean() == {}
