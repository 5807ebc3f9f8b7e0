"""The egress gateway's own process: `python -m supervisor.egress.worker --fd N`, started by
the daemon (supervisor.egress.worker_process) in a cgroup of its own, as an unprivileged user,
with the daemon's end of a socketpair on fd N as its only channel. Needs no privilege: it binds
each run's gateway address with IP_FREEBIND (no capability needed for a port ≥ 1024) in the
host's network namespace, which it shares with the daemon that forked it.

Everything it knows arrives over the channel (supervisor.egress.ipc): its configuration and the
upstream CAs first, then each run's grant (token, policy, secrets; never on disk, argv or
environment). It sends back what the daemon decides on: budget and breaker firings, the first
refusal of each kind per run (the rest are counted and summarised), held requests waiting for
an operator, and usage snapshots. It dies with the daemon (parent-death signal, and the end of
the channel) and is not dumpable, so its memory (the secrets) is closed to its own uid too."""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import ssl
import sys
import threading
from typing import Any

import pyprctl

from supervisor.config import EgressSection
from supervisor.egress import ipc
from supervisor.egress.accounting import Usage
from supervisor.egress.grant import Decision, carried_from_wire, grant_from_wire
from supervisor.sandbox.fdpass import recv_fds

log = logging.getLogger("supervisor.egress.worker")

MAX_HELD = 1024  # requests waiting for an operator, over all runs
_MAX_FDS = 64  # descriptors received and not yet claimed by an `open`
_DETAIL_LIMIT = 4096  # bytes of JSON per event detail
_USAGE_EVERY = 0.5  # seconds between usage snapshots (only runs whose usage changed)
# MCP decisions wait in the gateway's thread up to this long (or this many) and cross to the
# channel together: one wake-up of this loop and one write per batch instead of per call.
_DECISIONS_EVERY = 0.01
_DECISIONS_BATCH = 256


def _bounded(detail: dict[str, Any]) -> dict[str, Any]:
    """An event's detail, cut down when an agent managed to make it large."""
    text = json.dumps(detail, default=str)
    if len(text) <= _DETAIL_LIMIT:
        return detail
    return {key: (value if len(json.dumps(value, default=str)) <= 300 else "(truncated)")
            for key, value in list(detail.items())[:20]}


class Worker:
    """The process's one loop: the channel to the daemon. The gateway serves agents in a
    thread and loop of its own (supervisor.egress.gateway), calling the sink methods below
    there; they post to this loop."""

    def __init__(self, sock: socket.socket, config: EgressSection,
                 ssl_context: ssl.SSLContext, fds: socket.socket | None = None) -> None:
        from supervisor.egress.gateway import Gateway

        self.sock = sock
        # Descriptors from the daemon (the stdio MCP servers' stdin/stdout): SCM_RIGHTS on a
        # socketpair of their own, each datagram naming what it carries; see take_fds.
        self.fds = fds
        if fds is not None:
            fds.setblocking(False)
        self.received: dict[str, int] = {}
        self.gateway = Gateway(config, self, ssl_context)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.channel: ipc.FrameProtocol | None = None
        self.done: asyncio.Future[str] | None = None
        self.lock = threading.Lock()
        self.held: dict[str, tuple[str, concurrent.futures.Future[Decision]]] = {}
        self.reported: dict[str, dict[str, Any]] = {}
        self.dropped = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        # MCP decisions not yet on the channel (appended in the gateway's thread, sent from
        # this loop's); bounded by _DECISIONS_BATCH, past which they are handed over at once.
        self._decisions: list[dict[str, Any]] = []
        self._decisions_lock = threading.Lock()

    async def serve(self) -> str:
        loop = self.loop = asyncio.get_running_loop()
        self.done = loop.create_future()
        self.gateway.start()
        _, self.channel = await loop.create_unix_connection(
            lambda: ipc.FrameProtocol(ipc.TO_WORKER_LIMIT, ipc.WRITE_BUFFER_LIMIT,
                                      self.on_message, self._lost), sock=self.sock)
        loop.add_signal_handler(signal.SIGTERM, self._lost, "SIGTERM")
        self.emit({"op": "hello", "pid": os.getpid()})
        reporter = loop.create_task(self._report_usage())
        try:
            return await self.done
        finally:
            reporter.cancel()
            self._release_held("the gateway stopped")
            self.gateway.stop()
            self._send_decisions()

    def _lost(self, reason: str) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(reason)

    # ------------------------------------------------------------------ to the daemon

    def emit(self, message: dict[str, Any]) -> None:
        """Send now (this loop's thread). A daemon that does not read loses what does not fit;
        it kills a worker it cannot reach, so nothing here waits for it."""
        if self.channel is None:
            return
        try:
            frame = ipc.encode(message, ipc.TO_DAEMON_LIMIT)
        except ipc.FrameError as exc:
            log.error("not sent: %s", exc)
            return
        if not self.channel.send(frame):
            self.dropped += 1

    def _post(self, message: dict[str, Any]) -> None:
        """From the gateway's thread. The MCP decisions made before it go first (a hold's
        decision before its approval request)."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._emit_after_decisions, message)

    def _emit_after_decisions(self, message: dict[str, Any]) -> None:
        self._send_decisions()
        self.emit(message)

    def _send_decisions(self) -> None:
        """The MCP decisions waiting in the gateway's thread, in order, in one write."""
        with self._decisions_lock:
            batch, self._decisions = self._decisions, []
        if not batch or self.channel is None:
            return
        frames = []
        for message in batch:
            try:
                frames.append(ipc.encode(message, ipc.TO_DAEMON_LIMIT))
            except ipc.FrameError as exc:
                log.error("not sent: %s", exc)
        if frames and not self.channel.send(b"".join(frames)):
            self.dropped += len(frames)

    def _hand_over_decisions(self) -> None:
        """From the gateway's thread: the waiting decisions to this loop."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._send_decisions)

    def _reply(self, request: dict[str, Any], **fields: Any) -> None:
        self.emit({"op": "reply", "re": request.get("id"), **fields})

    # ------------------------------------------------------------------ GatewaySink (its thread)

    def budget_exceeded(self, run_id: str, detail: dict[str, Any]) -> None:
        self._post({"op": "budget", "run": run_id, "detail": _bounded(detail)})

    def breaker_tripped(self, run_id: str, detail: dict[str, Any]) -> None:
        self._post({"op": "breaker", "run": run_id, "detail": _bounded(detail)})

    def denied(self, run_id: str, code: str, detail: dict[str, Any]) -> None:
        """Called for the first refusal of each (code, target) only: the gateway counts a flood
        in its bounded tally, which reaches the daemon with every usage snapshot."""
        self._post({"op": "denied", "run": run_id, "code": code, "detail": _bounded(detail)})

    def mcp_decision(self, run_id: str, detail: dict[str, Any]) -> None:
        """Every MCP decision (supervisor/mcp/gateway.py); the daemon audits each one. Sent in
        batches (see _DECISIONS_EVERY): a per-call wake-up of this loop cost the gateway's
        thread more than judging the call. Nothing is dropped: a full batch is handed over
        at once, a run's close and anything else this sink posts send the batch first."""
        with self._decisions_lock:
            self._decisions.append({"op": "mcp", "run": run_id, "detail": _bounded(detail)})
            waiting = len(self._decisions)
        if waiting >= _DECISIONS_BATCH:
            self._hand_over_decisions()
        elif waiting == 1:
            try:
                timer = asyncio.get_running_loop()  # the gateway's: no wake-up to arm it
            except RuntimeError:
                self._hand_over_decisions()
            else:
                timer.call_later(_DECISIONS_EVERY, self._hand_over_decisions)

    def request_approval(self, run_id: str, method: str, host: str, path: str, rule: str
                         ) -> concurrent.futures.Future[Decision]:
        future: concurrent.futures.Future[Decision] = concurrent.futures.Future()
        with self.lock:
            if len(self.held) >= MAX_HELD:
                future.set_result(Decision(False, "", reason="too many requests are waiting "
                                                             "for an operator's approval"))
                return future
            approval_id = secrets.token_hex(4)
            while approval_id in self.held:
                approval_id = secrets.token_hex(4)
            self.held[approval_id] = (run_id, future)
        future.add_done_callback(lambda f: self._forget(approval_id, f.cancelled()))
        self._post({"op": "approval", "id": approval_id, "run": run_id, "method": method,
                    "host": host[:300], "path": path[:1000], "rule": rule[:300]})
        return future

    def _forget(self, approval_id: str, withdrawn: bool) -> None:
        with self.lock:
            self.held.pop(approval_id, None)
        if withdrawn:  # the gateway cancels a hold whose agent hung up
            self._post({"op": "withdrawn", "id": approval_id})

    def _release_held(self, reason: str, run_id: str | None = None) -> None:
        with self.lock:
            held = [(key, future) for key, (run, future) in self.held.items()
                    if run_id is None or run == run_id]
        for key, future in held:
            if not future.done():
                future.set_result(Decision(False, key, by="system:gateway", reason=reason))

    # ------------------------------------------------------------------ from the daemon

    def on_message(self, message: dict[str, Any]) -> None:
        op, run = message["op"], str(message.get("run", ""))
        if op == "open":
            self._spawn(self._open(message))
        elif op == "close":
            self._spawn(self._close(message))
        elif op == "revoke":
            self.gateway.revoke(run)
            self._release_held("the run's token was revoked", run)
        elif op == "accept":
            self._accept(message, run)
        elif op == "suspend":
            self.gateway.suspend(run)
            self._release_held("the agent was paused", run)
        elif op == "resume":
            self.gateway.resume(run)
        elif op == "regrant":
            self._reply(message, ok=self.gateway.regrant(grant_from_wire(message["grant"])))
        elif op == "decide":
            self._decide(message)
        elif op == "reset_breaker":
            self._reply(message, was=self.gateway.reset_breaker(run))
        elif op == "usage":
            self._reply(message, runs={r: self._snapshot(r) for r in message.get("runs", [])
                                       if r in self.gateway.gates})
        elif op == "ping":
            self._reply(message, pid=os.getpid(), dropped=self.dropped)
        elif op == "stop":
            self._lost("the daemon asked the gateway to stop")
        else:
            log.error("unknown message %r from the daemon", op)
            if "id" in message:
                self._reply(message, error=f"unknown op {op!r}")

    def _spawn(self, coro: Any) -> None:
        assert self.loop is not None
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def take_fds(self, keys: dict[str, str]) -> dict[str, socket.socket]:
        """The sockets the daemon sent for `keys` (name -> key). It sends them before the
        message that names them, so they are queued by the time that message is read;
        whatever else is queued is kept for its own message, at most a bounded number."""
        while self.fds is not None:
            try:
                data, fds = recv_fds(self.fds, 256, 4)
            except (BlockingIOError, InterruptedError):
                break
            if not data and not fds:
                break
            key = data.decode(errors="replace")
            if len(fds) != 1 or key in self.received or len(self.received) >= _MAX_FDS:
                for fd in fds:
                    os.close(fd)
                continue
            self.received[key] = fds[0]
        found: dict[str, socket.socket] = {}
        for name, key in keys.items():
            fd = self.received.pop(key, -1)
            if fd < 0:
                for sock in found.values():
                    sock.close()
                raise LookupError(f"no descriptor arrived for MCP server {name!r}")
            found[name] = socket.socket(fileno=fd)
        return found

    async def _open(self, message: dict[str, Any]) -> None:
        stdio: dict[str, socket.socket] = {}
        try:
            grant = grant_from_wire(message["grant"])
            carried = message.get("carried")
            stdio = self.take_fds({str(k): str(v) for k, v in
                                   dict(message.get("stdio") or {}).items()})
            await self.gateway.open(grant, stdio, None if carried is None
                                    else carried_from_wire(dict(carried)))
        except Exception as exc:  # a grant the worker cannot use: the launch fails closed
            for sock in stdio.values():
                sock.close()  # a no-op for those a bridge took (and closed)
            errno = exc.errno if isinstance(exc, OSError) else None
            error = (exc.strerror or str(exc)) if isinstance(exc, OSError) else \
                f"{type(exc).__name__}: {exc}"
            self._reply(message, ok=False, errno=errno, error=error)
        else:
            self._reply(message, ok=True)

    def _accept(self, message: dict[str, Any], run: str) -> None:
        """A socket from the daemon, served as a connection on `run`'s listener."""
        try:
            [sock] = self.take_fds({"check": str(message.get("socket", ""))}).values()
        except LookupError as exc:
            self._reply(message, ok=False, error=str(exc))
            return
        if not self.gateway.accept(run, sock):
            sock.close()
            self._reply(message, ok=False, error="the gateway has no listener for this run")
            return
        self._reply(message, ok=True)

    async def _close(self, message: dict[str, Any]) -> None:
        run = str(message["run"])
        self._release_held("the run ended", run)
        snapshot = self._snapshot(run) if run in self.gateway.gates else None
        gate = self.gateway.gates.get(run)
        calls = gate.calls if gate is not None else None  # read after the close: complete
        mcp: dict[str, Any] | None = None
        if message.get("handover"):  # a restart: the MCP state goes to the next worker
            usage, mcp = await self.gateway.hand_over(run)
        else:
            usage = await self.gateway.close(run)
        self._send_decisions()  # before the reply: the daemon forgets the run on it
        self.reported.pop(run, None)
        if snapshot is not None and usage is not None:
            snapshot["usage"], snapshot["denials"] = usage.as_dict(), dict(usage.refusals)
            if calls is not None:
                snapshot["calls"] = calls.as_dict()
            if gate is not None:  # for a handover (what the next worker's gate carries on)
                snapshot["budget_fired"] = gate.budget_fired
            if mcp is not None:
                snapshot["mcp"] = mcp
        self._reply(message, **(snapshot or {"usage": None}))

    def _decide(self, message: dict[str, Any]) -> None:
        with self.lock:
            entry = self.held.pop(str(message.get("approval")), None)
        if entry is None:
            return  # the agent gave up waiting, or the run ended
        _run, future = entry
        if not future.done():
            future.set_result(Decision(bool(message.get("approved")), str(message["approval"]),
                                       by=str(message.get("by", "")),
                                       reason=str(message.get("reason", ""))))

    def _snapshot(self, run_id: str) -> dict[str, Any]:
        usage = self.gateway.usage(run_id) or Usage()
        return {"usage": usage.as_dict(), "breaker": self.gateway.breaker_open(run_id),
                "denials": dict(usage.refusals)}

    async def _report_usage(self) -> None:
        while True:
            await asyncio.sleep(_USAGE_EVERY)
            changed = {}
            for run_id in list(self.gateway.gates):
                snapshot = self._snapshot(run_id)
                if self.reported.get(run_id) != snapshot:
                    self.reported[run_id] = changed[run_id] = snapshot
            if changed or self.dropped:
                self.emit({"op": "usage", "runs": changed, "dropped": self.dropped})


def _read_first(sock: socket.socket) -> dict[str, Any]:
    """The configuration, read before the loop exists (blocking, bounded)."""
    frames = ipc.FrameBuffer(ipc.TO_WORKER_LIMIT)
    sock.settimeout(30)
    while True:
        data = sock.recv(65536)
        if not data:
            raise SystemExit("the daemon closed the channel before configuring the gateway")
        messages = frames.feed(data)
        if messages:
            if messages[0]["op"] != "configure" or len(messages) > 1 or frames.pending:
                raise SystemExit("the first message must be 'configure', alone")
            sock.settimeout(None)
            return messages[0]


def _become(uid: int, gid: int) -> None:
    """The worker's user, every id of it, no supplementary group; no capability is left (the
    uid change empties the permitted and effective sets). Verified, or the worker exits."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid) \
            or os.getgroups():
        raise SystemExit(f"the worker could not become uid {uid}, gid {gid}")


def main(argv: list[str] | None = None) -> None:
    # The daemon blocks SIGUSR1 in every thread for break-glass, and a mask survives fork and
    # exec; clear it here, first, since subprocess cannot set a child's mask without a
    # preexec_fn (Python between fork and exec in a threaded daemon, which can deadlock).
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    # Never open to its user's other processes: not dumpable before the uid change (ptrace
    # permission is checked once, at attach, so one seized while it was would stay held), and
    # again after it (the change leaves it as fs.suid_dumpable says).
    pyprctl.set_dumpable(False)
    parser = argparse.ArgumentParser(prog="supervisor.egress.worker")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--fds-fd", type=int, default=None)
    parser.add_argument("--uid", type=int, default=None)
    parser.add_argument("--gid", type=int, default=None)
    args = parser.parse_args(argv)
    if args.uid is not None:
        _become(args.uid, args.gid if args.gid is not None else args.uid)
    pyprctl.set_dumpable(False)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="gateway-worker: %(levelname)s %(message)s")
    # Set after the uid change (which clears it): a daemon that dies takes its gateway along.
    parent = os.getppid()
    pyprctl.set_pdeathsig(signal.SIGKILL)
    if os.getppid() != parent or parent == 1:
        raise SystemExit("the daemon is gone")
    pyprctl.set_no_new_privs()
    sock = socket.socket(fileno=args.fd)
    first = _read_first(sock)
    config = EgressSection.model_validate(first["config"])
    context = ssl.create_default_context()
    if first.get("ca"):
        context.load_verify_locations(cadata=str(first["ca"]))
    fds = socket.socket(fileno=args.fds_fd) if args.fds_fd is not None else None
    worker = Worker(sock, config, context, fds)
    reason = asyncio.run(worker.serve())
    log.info("stopping: %s", reason)
    with contextlib.suppress(OSError):
        sock.close()


if __name__ == "__main__":
    main()
