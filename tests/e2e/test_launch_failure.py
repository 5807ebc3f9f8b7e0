"""A run the supervisor could not start answers 4xx, never 500, and `agentctl run` exits 125
(issue 13): a profile whose rootfs cannot hold the sandbox (its /tmp is a file, so runc cannot
mount the sandbox's tmpfs there) makes the real runtime fail after the command check passed;
the daemon answers 424 `runtime_failed` over its real control socket with a hint, and the same
rootfs with a directory at /tmp runs (the control). runc only: a rootfs root is runc-only (the
docker runtime's failures are test_docker.py's engine-socket bind and
test_docker_engine_faults.py). Needs root and runc."""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from typing import Any

from tests.support.daemon import Daemon

INIT_BINARY = "/usr/bin/tini-static"  # [sandbox] init's default: a static program


def post_run(daemon: Daemon, document: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """POST /v1/runs over the daemon's control socket: the status and the JSON body."""
    conn = http.client.HTTPConnection("localhost", timeout=120)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(120)
    sock.connect(str(daemon.socket))
    conn.sock = sock
    try:
        conn.request("POST", "/v1/runs", body=json.dumps(document),
                      headers={"Content-Type": "application/json"})
        reply = conn.getresponse()
        return reply.status, json.loads(reply.read())
    finally:
        conn.close()


def broken_rootfs(tmp: Path) -> Path:
    """A rootfs that has the command (a static one: no libraries needed) but a file where the
    sandbox's /tmp must be mounted."""
    rootfs = tmp / "broken-rootfs"
    for mountpoint in ("bin", "proc", "dev", "sys", "etc"):  # made here: the root is read-only
        (rootfs / mountpoint).mkdir(parents=True)
    (rootfs / "bin" / "agent").write_bytes(Path(INIT_BINARY).read_bytes())
    (rootfs / "bin" / "agent").chmod(0o755)
    (rootfs / "tmp").write_text("a file where the sandbox's /tmp must be\n")
    return rootfs


def test_a_launch_the_sandbox_cannot_set_up_answers_424_and_exits_125(daemon: Daemon) -> None:
    rootfs = broken_rootfs(daemon.root)
    (daemon.root / "profiles" / "brokenroot.toml").write_text(
        f'[filesystem]\nroot = "{rootfs}"\n')
    command = ["/bin/agent", "--version"]
    status, body = post_run(daemon, {"name": "noroot", "profile": "brokenroot",
                                     "command": command})
    assert 400 <= status < 500 and status == 424, (status, body)
    error = body["error"]
    assert error["code"] == "runtime_failed", error
    assert "runc create failed" in error["message"] and error["detail"]["hint"], error
    result = daemon.agentctl("run", "--name", "noroot", "--profile", "brokenroot", "--",
                             *command)
    assert result.returncode == 125, result
    assert "agentctl: runtime_failed:" in result.stderr and "hint:" in result.stderr, result
    # Nothing was made: no agent registered, nothing left on the host.
    assert "noroot" not in [a["name"] for a in daemon.client.agents()["agents"]]
    assert daemon.clean() == {}
    # The control: with a directory at /tmp the same rootfs, profile and command run.
    (rootfs / "tmp").unlink()
    (rootfs / "tmp").mkdir()
    ran = daemon.agentctl("run", "--name", "noroot", "--profile", "brokenroot", "--", *command)
    assert ran.returncode == 0 and "tini version" in ran.stdout, ran
    assert daemon.clean() == {}
    assert "Traceback" not in daemon.logs()
