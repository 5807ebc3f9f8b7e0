"""agentctl's fast path (cli/fast.py) against its click CLI (issue 16): a corpus of argv runs
through both, each as the fresh process an operator starts, and both must print the same
stdout and stderr, exit with the same status and send the daemon the same requests. The
daemon's answers are the real API server's: the click run goes through a recording proxy to a
fresh server set up for the case, then both paths are replayed against that recording (with
run start times moved three hours back, so `ls`'s UP column cannot tick between the two). Also:
the fast path imports neither click nor pydantic, it takes the argv it should and hands the
rest to click, and its declarations are the click commands' options. Timing is measured by
bench/cli_latency.py, never asserted here. No root."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from supervisor.api.client import Client
from supervisor.cli import fast, verbs
from supervisor.cli.main import cli
from tests.unit.conftest import WAIT, ServeFactory

REPO = Path(__file__).resolve().parents[2]
CLICK_PATH = "import sys; from supervisor.cli.main import main; sys.exit(main())"
FAST_PATH = "import sys; from supervisor.cli.fast import main; sys.exit(main())"
SOCKET = "{socket}"  # replaced by the case's socket in argv


def _read_request(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


class _Socket:
    """A Unix socket answering one request per connection on a thread, by `answer`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.exchanges: list[tuple[bytes, bytes]] = []
        self.errors: list[str] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        self._sock.listen(8)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def answer(self, request: bytes) -> bytes:
        raise NotImplementedError

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                request = _read_request(conn)
                response = self.answer(request)
                self.exchanges.append((request, response))
                conn.sendall(response)

    def close(self) -> None:
        self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(WAIT)


class _Recorder(_Socket):
    """Forwards each request to the real server and keeps the exchange."""

    def __init__(self, path: Path, upstream: Path) -> None:
        self.upstream = upstream
        super().__init__(path)

    def answer(self, request: bytes) -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as up:
            up.settimeout(WAIT)
            up.connect(str(self.upstream))
            up.sendall(request)
            response = b""
            while chunk := up.recv(65536):
                response += chunk
        return response


def _backdated(response: bytes, now: float) -> bytes:
    """The response with every run's started_at three hours before `now`."""
    head, _, body = response.partition(b"\r\n\r\n")
    if b"application/json" not in head.lower() or not body:
        return response

    def shift(value: object) -> object:
        if isinstance(value, dict):
            return {k: now - 3 * 3600 if k == "started_at" and isinstance(v, float)
                    else shift(v) for k, v in value.items()}
        if isinstance(value, list):
            return [shift(v) for v in value]
        return value

    body = json.dumps(shift(json.loads(body))).encode()
    lines = [line for line in head.split(b"\r\n")
             if not line.lower().startswith((b"content-length:", b"transfer-encoding:"))]
    return b"\r\n".join([*lines, b"Content-Length: %d" % len(body)]) + b"\r\n\r\n" + body


class _Replay(_Socket):
    """Answers the recorded exchanges in order; a request other than the recorded one is
    noted (and answered 599 so the run shows it)."""

    def __init__(self, path: Path, recorded: list[tuple[bytes, bytes]], now: float) -> None:
        self.recorded = recorded
        self.now = now
        super().__init__(path)

    def answer(self, request: bytes) -> bytes:
        index = len(self.exchanges)
        if index >= len(self.recorded) or self.recorded[index][0] != request:
            self.errors.append(f"request {index} not the recorded one: {request!r}")
            return b"HTTP/1.1 599 Unexpected\r\nContent-Length: 0\r\n\r\n"
        return _backdated(self.recorded[index][1], self.now)


def agentctl(code: str, argv: list[str], socket_path: Path, via_env: bool
             ) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k != "AGENT_SUPERVISOR_SOCKET"}
    env["PYTHONPATH"] = str(REPO)
    if via_env:
        env["AGENT_SUPERVISOR_SOCKET"] = str(socket_path)
    args = [str(socket_path) if a == SOCKET else a for a in argv]
    done = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                          text=True, timeout=120, check=False, stdin=subprocess.DEVNULL)
    return done.returncode, done.stdout, done.stderr


LONG = "x" * 501
# (argv, whether the fast path takes it). Every argv the fast path takes is compared with
# click's run of it; the others check that it hands them over.
CORPUS: list[tuple[list[str], bool]] = [
    (["ls"], True),
    (["ls", "--json"], True),
    (["ls", "-q"], True),
    (["ls", "--quiet", "--class", "coders"], True),
    (["ls", "--class=builders", "--json"], True),
    (["ls", "--state", "paused"], True),
    (["ls", "--class", "nosuch"], True),
    (["ls", "--class", ""], True),
    (["status"], True),
    (["status", "--json"], True),
    (["kill", "a1", "--reason", "incident 7"], True),
    (["kill", "--reason=incident 7", "a1", "--json"], True),
    (["kill", "a1"], True),
    (["kill", "a1", "--reason", "   "], True),
    (["kill", "a1", "--reason", ""], True),
    (["kill", "a1", "--reason", LONG], True),
    (["kill", "a1", "--reason", "\x1b[31mred\x1b[0m alert"], True),
    # Argv bytes that are not UTF-8 (a Latin-1 byte, a stray one): sent as U+FFFD by both.
    (["kill", "a1", "--reason", os.fsdecode(b"caf\xe9 \xff")], True),
    (["kill", "--reason=" + os.fsdecode(b"\xfe"), "a1"], True),
    (["kill", os.fsdecode(b"a\xff"), "--reason", "name not UTF-8"], False),
    (["kill", "bulder-1", "--reason", "typo"], True),
    (["kill", "bulder-1", "--reason", "typo", "--json"], True),
    (["kill", "--class", "coderz", "--reason", "typo"], True),
    (["kill", "--class", "coders", "--reason", "incident 7"], True),
    (["kill", "--all", "--reason", "incident 7"], True),
    (["kill", "a1", "--all", "--reason", "two scopes"], True),
    (["kill", "--reason", "no scope"], True),
    (["kill", "", "--reason", "empty name"], True),
    (["pause", "a1"], True),
    (["pause", "--class", "coders"], True),
    (["pause", "--class", "coders", "--reason", "look"], True),
    (["resume", "a1"], True),
    (["resume", "b1", "--json"], True),
    (["stop", "a1", "--grace", "1s"], True),
    (["stop", "a1", "--json", "--grace=2s"], True),
    (["stop", "a1"], True),
    (["reactivate", "a1"], True),
    (["reactivate", "k1", "--reason", "back"], True),
    (["reactivate", "--all", "--reason", "all clear"], True),
    (["--socket", SOCKET, "kill", "a1", "--reason", "given socket"], True),
    (["--version"], True),
    (["kill", "--help"], False),
    (["kill", "-h"], False),
    (["--help"], False),
    (["kill", "a1", "--resaon", "typo'd option"], False),
    (["kil", "a1", "--reason", "typo'd verb"], False),
    (["kill", "a1", "a2", "--reason", "two"], False),
    (["kill", "--", "a1", "--reason", "dashes"], False),
    (["kill", "a1", "--reason", "--json"], False),
    (["kill", "a1", "--reason", "x", "--reason", "y"], False),
    (["kill", "a1", "--reason"], False),
    (["kill", "a1", "--json=1", "--reason", "x"], False),
    (["ls", "-qq"], False),
    (["ls", "a1"], False),
    (["status", "-q"], False),
    (["inspect", "a1"], False),
    (["audit"], False),
    (["--socket", SOCKET, "--version"], False),
    (["--version", "ls"], False),
    ([], False),
]
FAST = [argv for argv, fast_path in CORPUS if fast_path]


def _setup(client: Client) -> None:
    """Three running agents in two classes, one paused, one killed and idle."""
    for name, agent_class in (("a1", "coders"), ("a2", "coders"), ("b1", "builders"),
                              ("k1", "builders")):
        client.run({"name": name, "class": agent_class, "command": ["sleep", "infinity"]})
    client.action("pause", {"agent": "b1"}, "looking at it")
    client.action("kill", {"agent": "k1"}, "earlier incident")


@pytest.fixture
def sockets(tmp_path: Path) -> Iterator[list[_Socket]]:
    made: list[_Socket] = []
    yield made
    for sock in made:
        sock.close()


@pytest.mark.parametrize("argv", FAST, ids=lambda argv: " ".join(argv)[:60] or "-")
@pytest.mark.parametrize("via_env", [False, True], ids=["--socket", "env"])
def test_the_fast_path_prints_what_click_prints(serve: ServeFactory, tmp_path: Path,
                                                sockets: list[_Socket], argv: list[str],
                                                via_env: bool) -> None:
    server = serve()
    _setup(Client(server.socket_path, timeout=WAIT))
    recorder = _Recorder(tmp_path / "rec.sock", server.socket_path)
    sockets.append(recorder)
    full = argv if SOCKET in argv or via_env else ["--socket", SOCKET, *argv]
    agentctl(CLICK_PATH, full, recorder.path, via_env)
    recorded = list(recorder.exchanges)
    results = {}
    now = time.time()
    for path, code in (("click", CLICK_PATH), ("fast", FAST_PATH)):
        replay = _Replay(tmp_path / f"{path}.sock", recorded, now)
        sockets.append(replay)
        results[path] = (agentctl(code, full, replay.path, via_env),
                         [request for request, _ in replay.exchanges], replay.errors)
    assert results["fast"] == results["click"]
    (_, _, stderr), requests, errors = results["fast"]
    assert errors == [] and len(requests) == len(recorded)
    assert "Traceback" not in stderr, stderr
    if argv[0] != "--version":
        assert fast.plan(full, {"AGENT_SUPERVISOR_SOCKET": "x"} if via_env else {}) is not None


def test_the_corpus_reaches_the_daemon_and_its_errors() -> None:
    """The compared corpus covers output, errors with hints and did-you-mean, and no-ops."""
    verbs_seen = {argv[0] for argv in FAST if not argv[0].startswith("-")}
    assert verbs_seen == set(verbs.VERBS)


@pytest.mark.parametrize("argv, taken", CORPUS,
                         ids=lambda v: " ".join(v)[:60] if isinstance(v, list) else str(v))
def test_the_fast_path_takes_exactly_what_it_should(argv: list[str], taken: bool) -> None:
    full = [a.replace(SOCKET, "/tmp/x.sock") for a in argv]
    assert (fast.plan(full, {}) is not None) is taken


def test_what_the_fast_path_reads_from_argv() -> None:
    todo = fast.plan(["--socket=/s", "stop", "--grace", "3s", "a1", "--reason=r", "--json"], {})
    assert todo is not None and todo.verb == "stop" and todo.socket == "/s"
    assert todo.kwargs == {"agent": "a1", "agent_class": None, "all_agents": False,
                           "reason": "r", "as_json": True, "grace": "3s"}
    todo = fast.plan(["ls", "-q"], {"AGENT_SUPERVISOR_SOCKET": "/e"})
    assert todo is not None and todo.socket == "/e"
    assert todo.kwargs == {"agent_class": None, "state": None, "quiet": True, "as_json": False}
    todo = fast.plan(["status"], {"AGENT_SUPERVISOR_SOCKET": ""})
    assert todo is not None and todo.socket == fast.DEFAULT_SOCKET


@pytest.mark.parametrize("environ", [{"_AGENTCTL_COMPLETE": "bash_complete"},
                                     {"AGENT_SUPERVISOR_SOCKET": "-x"}])
def test_completion_and_odd_environments_go_to_click(environ: dict[str, str]) -> None:
    assert fast.plan(["ls"], environ) is None


def _default(option: click.Option, ctx: click.Context) -> object:
    """The option's default; None where click has none (its UNSET sentinel from 8.2)."""
    value = option.get_default(ctx)
    return value if value is None or isinstance(value, str | bool) else None


def test_the_declarations_are_the_click_commands() -> None:
    """Each incident verb's click command has exactly the declared options and argument: no
    option added to one side only."""
    ctx = click.Context(cli, info_name="agentctl")
    for name, verb in verbs.VERBS.items():
        command = cli.get_command(ctx, name)
        assert command is not None
        declared = [(tuple(o.decls), o.dest, o.flag, o.default if not o.flag else False)
                    for o in verb.options]
        own = click.Context(command, parent=ctx, info_name=name)
        options = [(tuple(p.opts + p.secondary_opts), p.name, p.is_flag, _default(p, own))
                   for p in command.params if isinstance(p, click.Option) and p.name != "help"]
        assert options == declared, name
        arguments = [p.name for p in command.params if isinstance(p, click.Argument)]
        assert arguments == ([verb.argument] if verb.argument else []), name
        assert command.help == verb.help
    group = {p.name: p for p in cli.params}
    assert group["socket_path"].envvar == fast.SOCKET_ENV
    assert str(group["socket_path"].default) == fast.DEFAULT_SOCKET


_IMPORTS = """
import json, sys
sys.argv = ["agentctl", *sys.argv[1:]]
from supervisor.cli.fast import main
try:
    main()
    status = 0
except SystemExit as exc:
    status = exc.code
heavy = sorted(m for m in sys.modules
               if m.split(".")[0] in ("click", "pydantic", "aiohttp", "supervisor.models")
               or m.startswith(("supervisor.models", "supervisor.cli.main")))
print(json.dumps({"status": status, "heavy": heavy}), file=sys.stderr)
"""


@pytest.mark.parametrize("argv", [["ls"], ["status"], ["kill", "a1", "--reason", "r"],
                                  ["pause", "a2"], ["stop", "a2", "--grace", "1s"],
                                  ["--version"], ["kill", "nosuch", "--reason", "r"]])
def test_the_fast_path_imports_neither_click_nor_pydantic(serve: ServeFactory,
                                                          argv: list[str]) -> None:
    server = serve()
    _setup(Client(server.socket_path, timeout=WAIT))
    env = {**os.environ, "PYTHONPATH": str(REPO),
           "AGENT_SUPERVISOR_SOCKET": str(server.socket_path)}
    done = subprocess.run([sys.executable, "-c", _IMPORTS, *argv], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    result = json.loads(done.stderr.strip().splitlines()[-1])
    assert result["heavy"] == [], result
    assert result["status"] == (3 if "nosuch" in argv else 0), done.stderr
