"""Hostile input on the control socket of a real daemon (issue 11, item 9): every request gets
a JSON error with a stable code, nothing answers 5xx, and nothing changes (no agent, no run
slot, the drill history still readable). Needs root."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_root_and_runc
from tests.support.daemon import Daemon, running_daemon


@pytest.fixture(scope="module")
def shared() -> Iterator[Daemon]:
    """One daemon for the module: every test here must leave it as it found it."""
    require_root_and_runc()
    root = Path(tempfile.mkdtemp(prefix="as-test-", dir="/tmp"))
    root.chmod(0o755)
    try:
        with running_daemon(root) as running:
            yield running
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def daemon(shared: Daemon) -> Iterator[Daemon]:
    before = state_of(shared)
    yield shared
    assert state_of(shared) == before, "a refused request changed the daemon's state"

Exchange = tuple[int, dict[str, str], Any]


def exchange(path: Path, raw: bytes, timeout: float = 30.0) -> Exchange:
    """Send exactly `raw` and read one response (the daemon closes or answers in full)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        # The daemon may answer and close before reading everything: read the answer.
        with contextlib.suppress(BrokenPipeError):
            sock.sendall(raw)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
            data = b"".join(chunks)
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep and _complete(head, body):
                break
    data = b"".join(chunks)
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":")
                                                           for line in lines[1:])}
    return status, headers, json.loads(body) if body else None


def _complete(head: bytes, body: bytes) -> bool:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def request(path: Path, method: str, target: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> Exchange:
    lines = [f"{method} {target} HTTP/1.1", "Host: localhost", "Connection: close"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")
    return exchange(path, raw)


def post(daemon: Daemon, target: str, document: Any) -> Exchange:
    body = document if isinstance(document, bytes) else json.dumps(document).encode()
    return request(daemon.socket, "POST", target, body)


def json_error(answer: Exchange, status: int, code: str) -> dict[str, Any]:
    got_status, headers, body = answer
    assert (got_status, headers.get("content-type", "").split(";")[0]) == (
        status, "application/json"), answer
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["detail"], dict)
    return error


def state_of(daemon: Daemon) -> dict[str, Any]:
    """What a refused request must not change: the agents, the runs, the drill history."""
    agents = daemon.client.agents()
    return {"agents": [(a["name"], a["state"], (a["run"] or {}).get("id"))
                       for a in agents["agents"]],
            "total": agents["total"], "active_runs": daemon.client.health()["active_runs"],
            "drills": [d["id"] for d in daemon.client.drills()["drills"]]}


def nothing_changed(daemon: Daemon) -> None:
    """Mid-test check; the fixture compares the whole state before and after each test."""
    assert daemon.client.health()["active_runs"] == 0
    assert isinstance(daemon.client.drills()["drills"], list)
    assert "ghost" not in {a["name"] for a in daemon.client.agents()["agents"]}


HUGE = "9" * 400


@pytest.mark.parametrize("document", [
    {"command": ["sleep", "1"], "timeout": int(HUGE)},
    {"command": ["sleep", "1"], "timeout": HUGE + "s"},
    {"command": ["sleep", "1"], "timeout": "1" + "0" * 399 + "h"},
    {"command": ["sleep", "1"], "timeout": 10**20},
    {"command": ["sleep", "1"], "timeout": -1},
    {"command": ["sleep", "1"], "tripwires": [{"name": "x", "metric": "processes",
                                               "above": int(HUGE)}]},
])
def test_oversized_numbers_are_refused_as_input_errors(daemon: Daemon, document: Any) -> None:
    json_error(post(daemon, "/v1/runs", document), 422, "invalid_request")
    nothing_changed(daemon)


@pytest.mark.parametrize("raw", [b'{"slo": 1e999}', b'{"slo": -1e999}', b'{"slo": NaN}',
                                 b'{"slo": Infinity}', b'{"processes": 1e400}'])
def test_non_finite_numbers_are_not_json(daemon: Daemon, raw: bytes) -> None:
    json_error(post(daemon, "/v1/drills", raw), 400, "invalid_json")
    nothing_changed(daemon)


@pytest.mark.parametrize("slo", ["9999999h", 10**9, "61s", int(HUGE)])
def test_an_unbounded_drill_slo_is_refused_and_the_history_stays_readable(
        daemon: Daemon, slo: Any) -> None:
    error = json_error(post(daemon, "/v1/drills", {"slo": slo}), 422, "invalid_request")
    assert error["detail"]["field"] == "slo"
    nothing_changed(daemon)


@pytest.mark.parametrize("depth", [33, 1000, 100_000])
def test_deeply_nested_json_is_refused_before_it_is_parsed(daemon: Daemon, depth: int) -> None:
    raw = b'{"command": ["sh"], "env": ' + b"[" * depth + b"]" * depth + b"}"
    json_error(post(daemon, "/v1/runs", raw), 400, "invalid_json")
    # Brackets inside strings are text, not nesting.
    text = json.dumps({"command": ["/nonexistent"], "env": {"X": "[" * 5000}}).encode()
    json_error(post(daemon, "/v1/runs", text), 422, "command_not_found")
    nothing_changed(daemon)


@pytest.mark.parametrize(("target", "document", "field"), [
    ("/v1/drills", {"processes": True}, "processes"),
    ("/v1/drills", {"processes": "5"}, "processes"),
    ("/v1/drills", {"processes": 5.0}, "processes"),
    ("/v1/actions/kill", {"scope": {"all": 1}, "reason": "x"}, "scope.all"),
    ("/v1/actions/pause", {"scope": {"agent": 7}}, "scope.agent"),
    ("/v1/runs", {"command": "sh"}, "command"),
    ("/v1/runs", {"command": ["sh"], "env": {"A": 1}}, "env.A"),
    ("/v1/approvals/x/deny", {"reason": ""}, "reason"),
    ("/v1/approvals/x/deny", {"reason": "   "}, "reason"),
    ("/v1/approvals/x/deny", {}, "reason"),
])
def test_types_are_strict(daemon: Daemon, target: str, document: Any, field: str) -> None:
    error = json_error(post(daemon, target, document), 422, "invalid_request")
    assert error["detail"]["field"] == field
    nothing_changed(daemon)


def test_a_missing_command_is_command_not_found_with_a_hint(daemon: Daemon) -> None:
    for command in (["no-such-command-here"], ["/usr/bin/no-such-command"], ["./relative"],
                    ["/opt/not-bound-into-the-sandbox"]):
        error = json_error(post(daemon, "/v1/runs", {"name": "ghost", "command": command}),
                           422, "command_not_found")
        assert error["detail"]["hint"] and error["detail"]["command"] == command[0]
    # There but not executable: 126's error, not 127's (issue 13).
    for command in (["/etc/passwd"], ["/usr/bin"]):
        error = json_error(post(daemon, "/v1/runs", {"name": "ghost", "command": command}),
                           422, "command_not_executable")
        assert error["detail"]["hint"] and error["detail"]["command"] == command[0]
    nothing_changed(daemon)
    result = daemon.agentctl("run", "--name", "ghost", "--", "no-such-command-here")
    assert result.returncode == 127, result
    assert "command_not_found" in result.stderr and "hint:" in result.stderr
    nothing_changed(daemon)


def test_what_the_sandbox_root_has_runs(tmp_root: Path) -> None:
    """The check refuses only what is certainly absent: commands through the merged-/usr
    links, from PATH, and under the workspace (resolved by the runtime) still run."""
    workspace = tmp_root / "ws"
    workspace.mkdir()
    script = workspace / "tool.sh"
    script.write_text("#!/bin/sh\necho from-workspace\n")
    script.chmod(0o755)
    os.chown(script, 1000, 1000)
    os.chown(workspace, 1000, 1000)
    with running_daemon(tmp_root) as daemon:
        for name, command in (("links", ["/bin/true"]), ("path", ["true"]),
                              ("usr", ["/usr/bin/env", "true"])):
            result = daemon.agentctl("run", "--name", name, "--", *command)
            assert result.returncode == 0, result
        result = daemon.agentctl("run", "--name", "ws", "--workspace", str(workspace), "--",
                                 "./tool.sh")
        assert result.returncode == 0 and "from-workspace" in result.stdout, result


def test_failed_launches_register_no_agent(daemon: Daemon) -> None:
    bad = [
        ({"name": "w1", "command": ["true"], "workspace": "/nonexistent/workspace"},
         422, "workspace_invalid"),
        ({"name": "p1", "command": ["true"], "profile": "no-such-profile"},
         404, "profile_not_found"),
        ({"name": "c1", "command": ["no-such-command"]}, 422, "command_not_found"),
        ({"name": "i1", "command": ["true"], "image": "no/such:image"}, 422,
         "runtime_unsupported"),
    ]
    for _ in range(3):
        for document, status, code in bad:
            json_error(post(daemon, "/v1/runs", document), status, code)
    nothing_changed(daemon)


def test_http_layer_refusals_are_json(daemon: Daemon) -> None:
    sock = daemon.socket
    big = json.dumps({"command": ["true"], "env": {"X": "x" * (2 * 1024**2)}}).encode()
    json_error(request(sock, "POST", "/v1/runs", big), 413, "body_too_large")
    _status, headers, _ = answer = request(sock, "DELETE", "/v1/agents")
    error = json_error(answer, 405, "method_not_allowed")
    assert set(headers["allow"].replace(" ", "").split(",")) >= {"GET"}
    assert error["detail"]["allowed"]
    json_error(request(sock, "GET", "/v1/agents/" + "a" * 20_000), 414, "uri_too_long")
    json_error(request(sock, "GET", "/v1/health", headers={"X-Long": "b" * 20_000}), 431,
               "headers_too_large")
    json_error(exchange(sock, b"NOT HTTP AT ALL\r\n\r\n"), 400, "bad_http_request")
    json_error(request(sock, "GET", "/v1/nowhere"), 404, "route_not_found")
    json_error(request(sock, "GET", "/v1/audit?limit=" + "9" * 400), 422, "invalid_request")
    json_error(request(sock, "GET", "/v1/agents?limit=0"), 422, "invalid_request")
    json_error(post(daemon, "/v1/runs", b"\xff\xfe not json"), 400, "invalid_json")
    json_error(post(daemon, "/v1/runs", b"[1, 2"), 400, "invalid_json")
    nothing_changed(daemon)
    assert "Traceback" not in daemon.logs()
    assert daemon.client.health()["status"] == "ok"
