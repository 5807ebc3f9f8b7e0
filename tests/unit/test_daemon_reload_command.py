"""`agent-supervisord --reload` (the unit's ExecReload=): it asks the daemon on the control
socket its configuration names, so `systemctl reload` works with `[daemon] socket_path` or a
moved runtime_dir, which `agentctl reload` on the default socket never reached. A real HTTP
exchange over a Unix socket of the test's own. No privilege."""

from __future__ import annotations

import http.server
import json
import socketserver
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.daemon.main import reload_socket
from tests.support.daemon import REPO


def _reload(config: Path) -> subprocess.CompletedProcess[str]:
    """`agent-supervisord --config CONFIG --reload`, as the unit's ExecReload= runs it."""
    return subprocess.run([sys.executable, "-m", "supervisor.daemon", "--config", str(config),
                           "--reload"], capture_output=True, text=True, cwd=REPO,
                          timeout=60, stdin=subprocess.DEVNULL)


def test_the_socket_is_the_configurations(tmp_path: Path) -> None:
    config = tmp_path / "daemon.toml"
    config.write_text(f'[daemon]\nsocket_path = "{tmp_path}/ctl.sock"\n')
    assert reload_socket(config) == tmp_path / "ctl.sock"
    config.write_text(f'[daemon]\nruntime_dir = "{tmp_path}/rt"\n')
    assert reload_socket(config) == tmp_path / "rt" / "control.sock"
    config.write_text("")
    assert reload_socket(config) == Path("/run/agent-supervisor/control.sock")


def test_a_file_with_errors_still_names_its_socket(tmp_path: Path) -> None:
    """The daemon is asked all the same, and refuses the file naming every error."""
    config = tmp_path / "daemon.toml"
    config.write_text(f'[daemon]\nsocket_path = "{tmp_path}/ctl.sock"\nno_such_key = 1\n'
                      "[telemetry]\nrate_hz = -3\n")
    assert reload_socket(config) == tmp_path / "ctl.sock"
    config.write_text(f'[daemon]\nruntime_dir = "{tmp_path}/rt"\nsocket_path = 7\n')
    assert reload_socket(config) == tmp_path / "rt" / "control.sock"
    config.write_text("[daemon\nnot toml")
    assert reload_socket(config) == Path("/run/agent-supervisor/control.sock")


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    seen: list[tuple[str, str, dict[str, object]]]
    answer: tuple[int, dict[str, object]]


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        self.server.seen.append((self.command, self.path, body))
        status, answer = self.server.answer
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def fake_daemon(tmp_path: Path) -> Iterator[_Server]:
    server = _Server(str(tmp_path / "ctl.sock"), _Handler)
    server.seen = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_reload_asks_on_the_configured_socket(tmp_path: Path, fake_daemon: _Server) -> None:
    fake_daemon.answer = (200, {"source": str(tmp_path / "daemon.toml"), "changed": ["roles"],
                                "running": 2, "restart_required": []})
    config = tmp_path / "daemon.toml"
    config.write_text(f'[daemon]\nsocket_path = "{tmp_path}/ctl.sock"\n')
    result = _reload(config)
    assert result.returncode == 0, result
    assert fake_daemon.seen == [("POST", "/v1/reload", {"reason": ""})]
    assert "reloaded" in result.stdout and "roles; 2 agents kept running" in result.stdout


def test_a_refused_reload_exits_78_with_the_daemons_errors(tmp_path: Path,
                                                           fake_daemon: _Server) -> None:
    fake_daemon.answer = (422, {"error": {
        "code": "config_invalid", "message": "daemon.toml: telemetry.rate_hz: must be > 0",
        "detail": {}, "hint": "fix the file"}})
    config = tmp_path / "daemon.toml"
    config.write_text(f'[daemon]\nsocket_path = "{tmp_path}/ctl.sock"\n[telemetry]\n'
                      "rate_hz = -3\n")
    result = _reload(config)
    assert len(fake_daemon.seen) == 1
    assert result.returncode == 78, result
    assert "telemetry.rate_hz" in result.stderr


def test_no_daemon_on_the_configured_socket_fails(tmp_path: Path) -> None:
    config = tmp_path / "daemon.toml"
    config.write_text(f'[daemon]\nsocket_path = "{tmp_path}/none.sock"\n')
    result = _reload(config)
    assert result.returncode != 0
    assert f"{tmp_path}/none.sock" in result.stderr


def test_a_supervisor_package_in_the_working_directory_is_never_run(
        tmp_path: Path, fake_daemon: _Server) -> None:
    """An operator may run --reload by hand from an agent's workspace, as root: a `supervisor`
    package the agent left there must not be what the reload runs (`-m` alone would put the
    working directory first on sys.path)."""
    fake_daemon.answer = (200, {"source": str(tmp_path / "daemon.toml"), "changed": [],
                                "running": 0, "restart_required": []})
    workspace = tmp_path / "workspace"
    planted = workspace / "supervisor" / "cli"
    planted.mkdir(parents=True)
    (workspace / "supervisor" / "__init__.py").write_text("")
    (planted / "__init__.py").write_text("")
    (planted / "__main__.py").write_text("print('planted package ran')\n")
    config = tmp_path / "daemon.toml"
    config.write_text(f'[daemon]\nsocket_path = "{tmp_path}/ctl.sock"\n')
    entry = Path(sys.executable).parent / "agent-supervisord"  # the installed command
    assert entry.exists(), entry
    result = subprocess.run([str(entry), "--config", str(config), "--reload"],
                            capture_output=True, text=True, cwd=workspace, timeout=60,
                            stdin=subprocess.DEVNULL)
    assert "planted package ran" not in result.stdout + result.stderr
    assert result.returncode == 0, result
    assert fake_daemon.seen == [("POST", "/v1/reload", {"reason": ""})]
