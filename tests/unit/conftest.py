"""Shared fixtures of the unit tier: no root, no kernel. The arbiter runs over the in-memory
FakeRuntime and a real SQLite file in tmp; the API runs the real aiohttp app on a real Unix
socket, served from a background thread with its own event loop, so the synchronous client and
CLI can talk to it from the test thread exactly as agentctl does."""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import json
import os
import socket
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web

from supervisor.api.client import owner_socket_of
from supervisor.api.listener import ControlListener
from supervisor.api.server import build_app
from supervisor.audit import AuditLog
from supervisor.config import (
    Config,
    ControlSection,
    DaemonSection,
    DrillSection,
    KillSection,
    RolesSection,
)
from supervisor.daemon.arbiter import Arbiter
from supervisor.daemon.drills import Drills
from supervisor.daemon.store import Store, connect
from supervisor.daemon.workspace_access import AdmittedWorkspace
from supervisor.models import Actor
from supervisor.runtime.fake import FakeRuntime

T = TypeVar("T")

ALICE = Actor(kind="user", uid=1000, gid=1000, pid=4242, name="alice")
# Every wait in this tier is bounded by this, so a hang fails the test instead of the run.
WAIT = 10.0


def make_config(root: Path, kill: KillSection | None = None) -> Config:
    """A configuration whose every path lies under `root` (profile dirs included, so the
    packaged profiles are the only ones found unless a test writes one)."""
    return Config(
        daemon=DaemonSection(state_dir=root / "state", runtime_dir=root / "run",
                             profile_dirs=[root / "profiles"]),
        kill=kill or KillSection(confirm_timeout=2.0, default_grace=2.0),
    )


# ----------------------------------------------------------------------------- arbiter


@dataclass
class ArbiterEnv:
    """One daemon's durable state (a SQLite file in tmp) and its fake runtime."""

    root: Path
    config: Config
    db: sqlite3.Connection
    store: Store
    audit: AuditLog
    runtime: FakeRuntime

    def arbiter(self, runtime: FakeRuntime | None = None) -> Arbiter:
        """A fresh Arbiter over this state; a new one over the same file is a daemon restart."""
        if runtime is not None:
            self.runtime = runtime
        return unit_arbiter(Arbiter(self.config, self.store, self.audit, self.runtime))


async def admit_any_workspace(workspace: str | None, _actor: Actor, _config: Config,
                              _refuse: object) -> AdmittedWorkspace | None:
    """The unit tier's workspace admission (the real one switches credentials, which needs
    root; tests/e2e/test_workspace.py proves it): every workspace, nothing held open."""
    return None if workspace is None else AdmittedWorkspace(workspace, -1, "unit-test")


def unit_arbiter(arbiter: Arbiter) -> Arbiter:
    arbiter.admit_workspace = admit_any_workspace
    return arbiter


MakeEnv = Callable[..., ArbiterEnv]


@pytest.fixture
def make_env(tmp_path: Path) -> Iterator[MakeEnv]:
    """Factory of ArbiterEnv; after the test, every audit chain it made must verify."""
    made: list[ArbiterEnv] = []

    def make(runtime: FakeRuntime | None = None, kill: KillSection | None = None) -> ArbiterEnv:
        root = tmp_path / f"env{len(made)}"
        config = make_config(root, kill)
        db = connect(config.daemon.state_dir / "state.db")
        env = ArbiterEnv(root=root, config=config, db=db, store=Store(db), audit=AuditLog(db),
                         runtime=runtime or FakeRuntime())
        made.append(env)
        return env

    yield make
    try:
        for env in made:
            result = env.audit.verify()
            assert result.ok, f"audit chain broken after the test: {result}"
    finally:
        for env in made:
            env.db.close()


@pytest.fixture
def env(make_env: MakeEnv) -> ArbiterEnv:
    return make_env()


async def wait_done(arbiter: Arbiter, run_id: str) -> None:
    """Until the run's finalization has completed (bounded)."""
    live = arbiter.live.get(run_id)
    if live is not None:
        await asyncio.wait_for(live.done.wait(), WAIT)


# ----------------------------------------------------------------------------- API server


@dataclass
class Snapshot:
    agents: list[tuple[Any, ...]]
    runs: list[tuple[Any, ...]]
    audit_rows: int


@dataclass
class ServerThread:
    """build_app over an Arbiter, on a Unix socket, in a thread with its own event loop. The
    SQLite connection is made in that thread (sqlite3 objects are bound to their thread); the
    test thread reaches the daemon's state only through `call`."""

    root: Path
    socket_path: Path
    roles: RolesSection
    runtime: FakeRuntime = field(default_factory=FakeRuntime)
    loop: asyncio.AbstractEventLoop | None = None
    arbiter: Arbiter | None = None
    drills: Drills | None = None
    kill: KillSection | None = None
    control: ControlSection | None = None  # the app's and listener's (defaults: None)
    # Served through the daemon's ControlListener (acceptor threads, the owners' socket beside
    # the control socket) instead of a plain aiohttp site.
    listener: ControlListener | None = None
    use_listener: bool = False
    _db: sqlite3.Connection | None = None
    _runner: web.AppRunner | None = None
    _thread: threading.Thread | None = None
    _ready: threading.Event = field(default_factory=threading.Event)
    _error: BaseException | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="api-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(WAIT):
            raise RuntimeError("the API server did not start")
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self.loop = loop
        try:
            loop.run_until_complete(self._setup())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._teardown())
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _setup(self) -> None:
        config = make_config(self.root, self.kill)
        self._db = connect(config.daemon.state_dir / "state.db")
        self.arbiter = unit_arbiter(Arbiter(config, Store(self._db), AuditLog(self._db),
                                            self.runtime))
        self.drills = Drills(self.arbiter, self._db, DrillSection(processes=4, slo=1.0))
        self.app = build_app(self.arbiter, self.roles, self.drills, control=self.control)
        if self.use_listener:
            sockets = []
            for path in (self.socket_path, owner_socket_of(self.socket_path)):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.bind(str(path))
                sock.listen(16)
                sock.setblocking(False)
                sockets.append(sock)
            self.listener = ControlListener(self.app, sockets[0],
                                            self.control or ControlSection(), self.roles,
                                            owner_sock=sockets[1])
            await self.listener.start()
            return
        self._runner = web.AppRunner(self.app)
        await self._runner.setup()
        await web.UnixSite(self._runner, str(self.socket_path)).start()

    async def _teardown(self) -> None:
        if self.listener is not None:
            await self.listener.stop()
        if self._runner is not None:
            await self._runner.cleanup()
        current = asyncio.current_task()
        pending = [t for t in asyncio.all_tasks() if t is not current]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if self._db is not None:
            self._db.close()

    def stop(self) -> None:
        if self.loop is None or self._thread is None or not self._thread.is_alive():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(WAIT)

    def run(self, coro: Callable[[], Awaitable[T]]) -> T:
        """Await `coro()` on the server's loop and return its result to the test thread."""
        assert self.loop is not None

        async def wrapper() -> T:
            return await coro()

        future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(
            wrapper(), self.loop)
        return future.result(WAIT)

    def settle(self) -> None:
        """Until every ended run's step 6 and the audit row for it (both follow a kill's
        answer) are done."""
        arbiter = self.arbiter
        assert arbiter is not None

        async def cleaned_up() -> None:
            await asyncio.gather(*arbiter.cleanups.values(), *arbiter._cleanup_audits)

        self.run(cleaned_up)

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn()` on the server's thread (where the SQLite connection lives)."""

        async def as_coro() -> T:
            return fn()

        return self.run(as_coro)

    @property
    def audit(self) -> AuditLog:
        assert self.arbiter is not None
        return self.arbiter.audit

    def snapshot(self) -> Snapshot:
        def take() -> Snapshot:
            assert self._db is not None
            return Snapshot(
                agents=self._db.execute("SELECT * FROM agents ORDER BY name").fetchall(),
                runs=self._db.execute("SELECT * FROM runs ORDER BY id").fetchall(),
                audit_rows=self.audit.count(),
            )

        return self.call(take)


ServeFactory = Callable[..., ServerThread]


def spend_request_key_warning() -> None:
    """aiohttp >= 3.14 warns (NotAppKeyWarning) the first time a process stores a str key in a
    request, and server.py stores request["actor"]; under -W error that one request fails with
    a 500, in whichever test happens to send it first. test_api.py's
    test_a_request_emits_no_warning exposes the problem deterministically; every other test is
    about something else, so the one-time warning is spent here instead of at random."""
    seen = getattr(web.BaseRequest, "_seen_str_keys", None)
    if isinstance(seen, set):
        seen.add("actor")


@pytest.fixture
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeFactory]:
    """Factory of running API servers; by default this process's own uid is owner, so the test
    process (the socket peer) may do everything whether or not it is root."""
    servers: list[ServerThread] = []
    spend_request_key_warning()

    def start(roles: RolesSection | None = None, runtime: FakeRuntime | None = None,
              kill: KillSection | None = None, listener: bool = False,
              control: ControlSection | None = None) -> ServerThread:
        # A short directory: sun_path holds at most 107 bytes.
        root = tmp_path_factory.mktemp("api")
        server = ServerThread(
            root=root, socket_path=root / "control.sock",
            roles=RolesSection(owner=[f"user:{os.getuid()}"]) if roles is None else roles,
            runtime=runtime or FakeRuntime(), kill=kill, use_listener=listener,
            control=control,
        )
        servers.append(server)
        server.start()
        return server

    yield start
    try:
        for server in servers:
            result = server.call(server.audit.verify)
            assert result.ok, f"audit chain broken after the test: {result}"
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def server(serve: ServeFactory) -> ServerThread:
    return serve()


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=WAIT)
        self._path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(WAIT)
        sock.connect(self._path)
        self.sock = sock


def raw_request(socket_path: Path, method: str, path: str, body: bytes | None = None,
                content_type: str = "application/json") -> tuple[int, Any]:
    """One request with exactly these body bytes (the real client only sends valid JSON)."""
    conn = _UnixHTTPConnection(socket_path)
    try:
        headers = {"Content-Type": content_type} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        return response.status, json.loads(data) if data else None
    finally:
        conn.close()
