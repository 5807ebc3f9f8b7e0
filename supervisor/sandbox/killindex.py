"""The SIGKILL sent at the owners' acceptor (docs/design.md, "Control socket admission"). The
daemon's loop keeps `KillIndex`, which live runs' `cgroup.kill` files there are, by agent and
class (and the runs' parent's), for the owners' socket's acceptor thread to write before the
loop has seen the request (api/presignal.py). What the thread signalled is a `PreSignal`,
handed to the loop with the connection: the request's kill path takes it into its audit rows,
and whatever it did not take is killed, audited and finalised by daemon/presignalled.py, so
nothing is signalled without an audit row. Runs in the daemon (root); the index is
thread-safe.

Why copies of the descriptors: a run's own are closed by its step 6 on the loop, and a number
closed there may be reused by any open; the index's copy is closed under its own lock, after
the index stopped handing it out, so the thread never writes a descriptor after its close."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from supervisor.models import ActionRequest, Actor

log = logging.getLogger(__name__)


@dataclass(eq=False)
class PreSignal:
    """What the owners' acceptor SIGKILLed for one request, before the loop saw it."""

    request: ActionRequest
    actor: Actor
    arrived: float  # perf_counter: the request's connection accepted (its time_to_halt start)
    runs: dict[str, str] = field(default_factory=dict)  # run id -> its agent
    mechanism: dict[str, str] = field(default_factory=dict)  # run id -> what was written
    sent: float = 0.0  # perf_counter once every write was done
    # Runs whose seccomp fds the listener was asked to stop polling here (the sweep does
    # not ask again).
    hushed: set[str] = field(default_factory=set)
    # On the loop: the runs a kill path's audit rows took; whether `finish` ran; done once
    # every signalled run is accounted for.
    claimed: set[str] = field(default_factory=set)
    finished: bool = False
    settled: asyncio.Event = field(default_factory=asyncio.Event)

    def detail(self, run_id: str) -> dict[str, Any] | None:
        """The audit row's field for `run_id` (None: not signalled here)."""
        if run_id not in self.runs:
            return None
        return {"at": "owners_acceptor", "mechanism": self.mechanism.get(run_id),
                "ms_after_arrival": round((self.sent - self.arrived) * 1000, 3)}


class _Held:
    """One copy of a `cgroup.kill` descriptor; written and closed under its own lock."""

    __slots__ = ("agent", "agent_class", "closed", "container_id", "fd", "lock", "run_id",
                 "signalled", "watcher")

    def __init__(self, run_id: str, agent: str, agent_class: str, fd: int,
                 container_id: str = "", watcher: object = None) -> None:
        self.run_id = run_id
        self.agent = agent
        self.agent_class = agent_class
        self.fd = fd
        self.container_id = container_id
        self.watcher = watcher  # the run's handle: `defer_reap()` before its SIGKILL
        self.lock = threading.Lock()
        self.closed = False
        self.signalled: PreSignal | None = None

    def mark(self, record: PreSignal) -> bool:
        """Say this run is being SIGKILLed for `record` (before any write: its exit watcher
        must see it by the time the kernel could end it, and leave its init unreaped as a
        sweep's `hush` does); False once closed."""
        with self.lock:
            if self.closed:
                return False
            self.signalled = record
        defer = getattr(self.watcher, "defer_reap", None)
        if defer is not None:
            defer()
        return True

    def write(self) -> str:
        """One `cgroup.kill` write; what happened, for the audit row."""
        with self.lock:
            if self.closed:
                return "none: the run ended meanwhile"
            try:
                os.write(self.fd, b"1")
            except OSError as exc:
                return f"failed: {exc.strerror or exc}"
            return "cgroup.kill"

    def close(self) -> None:
        with self.lock:
            if not self.closed:
                self.closed = True
                with contextlib.suppress(OSError):
                    os.close(self.fd)


def _copy(cgroup: object) -> int | None:
    """A copy of `cgroup`'s held `cgroup.kill` descriptor (None: it holds none, or no copy
    could be made: the acceptor then leaves that run to the loop)."""
    held = getattr(cgroup, "held_file", None)
    fd = held("cgroup.kill") if held is not None else None
    if fd is None:
        return None
    try:
        return os.dup(fd)  # close-on-exec, as every descriptor Python makes
    except OSError as exc:
        log.error("kill index: cannot copy a cgroup.kill descriptor (%s); the owners' "
                  "acceptor leaves that run to the loop", exc)
        return None


class KillIndex:
    """Live runs' `cgroup.kill` copies by run, each with its agent and class, and the runs'
    parent's. Changed on the loop at a run's start (launch, adoption) and end (`finalise`);
    read on the owners' acceptor thread. Copy-on-write: a reader takes the mapping as it is
    and never sees it change under it."""

    def __init__(self) -> None:
        self._runs: Mapping[str, _Held] = {}
        self._parent: _Held | None = None
        self._swap = threading.Lock()
        # The seccomp listener's `hush` (thread-safe): the signalled runs' notify fds are not
        # polled once their SIGKILL is sent (`signal`), so their hang-ups wake nothing.
        self.hush: Callable[[list[str]], object] | None = None

    def add(self, run_id: str, agent: str, agent_class: str, cgroup: object, *,
            container_id: str = "", watcher: object = None) -> bool:
        fd = _copy(cgroup)
        if fd is None:
            return False
        with self._swap:
            runs = dict(self._runs)
            old = runs.get(run_id)
            runs[run_id] = _Held(run_id, agent, agent_class, fd, container_id, watcher)
            self._runs = runs
        if old is not None:
            old.close()
        return True

    def remove(self, run_id: str) -> None:
        with self._swap:
            if run_id not in self._runs:
                return
            runs = dict(self._runs)
            held = runs.pop(run_id)
            self._runs = runs
        held.close()

    def hold_parent(self, cgroup: object) -> None:
        """The runs' parent (held again when runc made it anew): a global halt's one write."""
        fd = _copy(cgroup)
        with self._swap:
            old, self._parent = self._parent, (_Held("", "", "", fd) if fd is not None
                                               else None)
        if old is not None:
            old.close()

    def close(self) -> None:
        with self._swap:
            runs, self._runs, parent, self._parent = self._runs, {}, self._parent, None
        for held in [*runs.values(), *([parent] if parent else [])]:
            held.close()

    def __len__(self) -> int:
        return len(self._runs)

    def targets(self, *, agent: str | None = None, agent_class: str | None = None,
                every: bool = False) -> list[_Held]:
        runs = self._runs.values()
        if every:
            return list(runs)
        if agent is not None:
            return [held for held in runs if held.agent == agent]
        return [held for held in runs if held.agent_class == agent_class]

    def signal(self, targets: Iterable[_Held], record: PreSignal, *, parent: bool) -> None:
        """SIGKILL `targets` for `record`: each run marked first, then one write to the
        parent (`parent`; a failure falls back to each run's file) or one per run, then the
        seccomp listener asked to stop polling their fds.

        The listener's hush comes after the writes, not before: it wakes the listener's
        thread, which then took turns at the GIL with this one between its writes (each
        write releases it), and the kernel's kill starts at the first write
        (docs/benchmarks.md run 18). A filter hangs up only once every process of its
        container is gone, milliseconds later; one that hangs up before the listener has
        read the request is closed by it, as when nothing hushed it."""
        marked = [held for held in targets if held.mark(record)]
        for held in marked:
            record.runs[held.run_id] = held.agent
        written = ""
        if parent and marked:
            holder = self._parent
            written = holder.write() if holder is not None else "none"
            if written == "cgroup.kill":
                written = "cgroup.kill (parent)"
            else:
                log.error("owners' acceptor: the parent's cgroup.kill: %s; run by run", written)
                written = ""
        for held in marked:
            record.mechanism[held.run_id] = written or held.write()
        record.sent = time.perf_counter()
        hush = self.hush
        if hush is not None and marked:
            try:
                hush([held.container_id for held in marked if held.container_id])
                record.hushed.update(held.run_id for held in marked if held.container_id)
            except Exception:  # the kill is sent; the listener wakes on the hang-ups
                log.exception("owners' acceptor: hushing the seccomp listener failed")

    def signalled(self, run_id: str) -> PreSignal | None:
        held = self._runs.get(run_id)
        return held.signalled if held is not None else None
