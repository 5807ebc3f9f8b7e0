"""agentctl's fast start (issue 16): plain verbs import neither pydantic nor aiohttp nor the
heavy command modules (checked in a fresh interpreter against the real API server), lazily
listed commands still load, run and appear in help, and the socket client's HTTP reader
handles every framing the daemon uses and refuses what is not HTTP. Timing is measured by
bench/cli_latency.py, never asserted here. No root."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from supervisor.api import wire
from supervisor.api.client import Client
from supervisor.cli import verbs
from supervisor.cli.lazy import LazyGroup
from supervisor.cli.main import LAZY_COMMANDS, cli
from supervisor.errors import DaemonUnavailable
from tests.unit.conftest import WAIT, ServerThread

REPO = Path(__file__).resolve().parents[2]
# What a plain verb must not load: the server side and the modules of other commands.
HEAVY = ("pydantic", "aiohttp", "supervisor.fleet", "supervisor.console", "supervisor.daemon",
         "supervisor.models", "supervisor.cli.fleet", "supervisor.cli.top", "http.client",
         "ssl", "importlib.metadata")

_PROBE = """
import json, sys
from supervisor.cli.main import cli
try:
    cli.main(sys.argv[1:], prog_name="agentctl", standalone_mode=False)
    status = 0
except SystemExit as exc:
    status = exc.code
heavy = sorted(m for m in sys.modules if any(m == h or m.startswith(h + ".") for h in {heavy!r}))
print(json.dumps({{"status": status, "heavy": heavy}}), file=sys.stderr)
"""


def _probe(*args: str) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", _PROBE.format(heavy=HEAVY), *args], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    last = done.stderr.strip().splitlines()[-1]
    result = json.loads(last)
    assert isinstance(result, dict)
    result["stdout"] = done.stdout
    return result


@pytest.mark.parametrize("verb", [["ls"], ["kill", "a1", "--reason", "incident 7"],
                                  ["status"], ["audit", "--limit", "3"]])
def test_plain_verbs_import_nothing_heavy(server: ServerThread, verb: list[str]) -> None:
    result = CliRunner().invoke(cli, ["--socket", str(server.socket_path), "run", "--name",
                                      "a1", "--detach", "--", "sleep", "infinity"])
    assert result.exit_code == 0, result.output
    probe = _probe("--socket", str(server.socket_path), *verb)
    assert probe["status"] == 0, probe
    assert probe["heavy"] == [], probe
    if verb[0] == "kill":
        assert Client(server.socket_path, timeout=WAIT).agent("a1")["state"] == "killed"


def test_version_imports_nothing_heavy_and_agrees_with_the_metadata() -> None:
    from importlib.metadata import version

    import supervisor

    probe = _probe("--version")
    assert probe["status"] == 0
    assert probe["heavy"] == [], probe
    assert probe["stdout"] == f"agentctl, version {version(supervisor.DISTRIBUTION)}\n"


def test_lazy_commands_are_listed_loaded_and_run() -> None:
    assert isinstance(cli, LazyGroup)
    ctx = click.Context(cli, info_name="agentctl")
    names = cli.list_commands(ctx)
    assert set(LAZY_COMMANDS) <= set(names) and names == sorted(names)
    for name in LAZY_COMMANDS:
        command = cli.get_command(ctx, name)
        assert isinstance(command, click.Command) and command.name == name
    result = CliRunner().invoke(cli, ["completion", "bash"])
    assert result.exit_code == 0 and "_AGENTCTL_COMPLETE" in result.output
    result = CliRunner().invoke(cli, ["--help"])
    assert all(f"  {name} " in result.output for name in LAZY_COMMANDS)


def test_a_lazy_entry_that_is_not_a_command_is_refused() -> None:
    group = LazyGroup(lazy_commands={"bad": "supervisor.cli.units:human_bytes"})
    with pytest.raises(TypeError, match="not a click command"):
        group.get_command(click.Context(group), "bad")


class _OneShot:
    """A Unix socket server that answers each connection with fixed bytes, then closes."""

    def __init__(self, path: Path, answer: bytes) -> None:
        self.path = path
        self.answer = answer
        self.requests: list[bytes] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        self._sock.listen(4)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn, _ = self._sock.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            self.requests.append(data)
            conn.sendall(self.answer)

    def close(self) -> None:
        self._thread.join(WAIT)
        self._sock.close()


@pytest.fixture
def one_shot(tmp_path: Path) -> Iterator[type[_OneShot]]:
    made: list[_OneShot] = []

    def make(path: Path, answer: bytes) -> _OneShot:
        server = _OneShot(path, answer)
        made.append(server)
        return server

    yield make  # type: ignore[misc]
    for server in made:
        server.close()


@pytest.mark.parametrize("answer, body", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{\"a\": [1]}\n", {"a": [1]}),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"4\r\n{\"a\"\r\n7;x=y\r\n: true}\r\n0\r\n\r\n", {"a": True}),
    (b"HTTP/1.0 200 OK\r\n\r\n{\"a\": null}", {"a": None}),
])
def test_the_reader_handles_each_framing(tmp_path: Path, one_shot: type[_OneShot],
                                         answer: bytes, body: object) -> None:
    server = one_shot(tmp_path / "s.sock", answer)
    assert Client(tmp_path / "s.sock", timeout=WAIT).request("GET", "/v1/x") == body
    assert server.requests[0].startswith(b"GET /v1/x HTTP/1.1\r\n")


@pytest.mark.parametrize("answer, message", [
    (b"", "closed the connection"),
    (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP/1 response"),
    (b"HTTP/1.1 2xx OK\r\n\r\n", "bad status line"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nshort", "before its Content-Length"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2", "inside its headers"),
])
def test_what_is_not_http_is_daemon_unavailable(tmp_path: Path, one_shot: type[_OneShot],
                                                answer: bytes, message: str) -> None:
    one_shot(tmp_path / "s.sock", answer)
    with pytest.raises(DaemonUnavailable, match=message):
        Client(tmp_path / "s.sock", timeout=WAIT).request("GET", "/v1/x")


@pytest.mark.parametrize("pending", [True, False])
def test_an_answer_whose_audit_rows_are_pending_is_reported_beside_it(
        tmp_path: Path, one_shot: type[_OneShot], capsys: pytest.CaptureFixture[str],
        pending: bool) -> None:
    """The daemon answered a verb with its audit rows still queued (a full disk: the real one
    is tests/e2e/test_full_disk.py): the result is printed as ever, and a warning with its
    code and a hint goes to stderr; without the header, nothing more is said."""
    body = json.dumps({"verb": "kill", "scope": "agent:a1", "reason": "r", "actor": "root",
                       "results": []}).encode()
    header = b"X-Audit-Pending: true\r\n" if pending else b""
    one_shot(tmp_path / "s.sock", b"HTTP/1.1 200 OK\r\n" + header
             + b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    client = Client(tmp_path / "s.sock", timeout=WAIT)
    verbs.scoped(client, "kill", agent="a1", agent_class=None, all_agents=False, reason="r",
                 as_json=True)
    out, err = capsys.readouterr()
    assert json.loads(out)["scope"] == "agent:a1"
    assert client.audit_pending is pending
    if pending:
        assert err.startswith("warning: audit_pending:") and "hint:" in err, err
    else:
        assert err == ""


def test_a_body_over_the_cap_is_refused(tmp_path: Path, one_shot: type[_OneShot],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "MAX_BODY", 10)
    one_shot(tmp_path / "s.sock", b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 100)
    with pytest.raises(DaemonUnavailable, match="larger than 10 bytes"):
        Client(tmp_path / "s.sock", timeout=WAIT).request("GET", "/v1/x")


def test_the_stream_yields_chunks_as_the_daemon_sends_them(server: ServerThread) -> None:
    result = CliRunner().invoke(cli, ["--socket", str(server.socket_path), "run", "--name",
                                      "a1", "--detach", "--", "sleep", "infinity"])
    assert result.exit_code == 0, result.output
    chunks = list(Client(server.socket_path, timeout=WAIT).logs("a1", follow=False))
    assert all(isinstance(chunk, bytes) for chunk in chunks)
