"""The append-only, hash-chained audit log in the daemon's SQLite file. No privilege beyond the
database file (and, for checkpoints, the audit key: see `anchor.py`).

Two ways to write. Before `start()` (and in embedded CI runs, which never call it) `append`
writes the row at once in the caller's thread. Once the daemon calls `start(loop)`, rows go to
one writer thread through a FIFO: appends never block the event loop, stay in order, and are
committed in batches; `await flushed()` waits until every row appended
so far is durable (the API answers a verb only after its rows are), and verification runs on
threads of its own connections, so a kill never waits behind it. The queue is bounded: past
`queue_max`, rows an agent can drive in volume are dropped, counted and the count audited;
rows of the kill path and of state changes are always taken.

A write that fails (disk full, I/O error) is retried by the writer in order, never lost, and
alarmed: the `on_write_failure` hooks run first (the state filesystem's reserve is released
there, so the kill rows still fit) and `alarms` says what is wrong until it is fixed.

Subscribers: `subscribe(fn)` is called on the loop after the row's commit (metrics,
containment); `subscribe(fn, in_transaction=True)` inside the row's own transaction, with the
writing connection (the webhook outbox: no event without its row, no row without its event)."""

from __future__ import annotations

import asyncio
import builtins
import collections
import contextlib
import json
import logging
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from supervisor.audit.chain import (
    CHECKPOINT_VERB,
    COLUMNS,
    GENESIS,
    SCHEMA,
    cap_detail,
    cap_text,
    hashed_fields,
    row_hash,
)
from supervisor.models import AuditEntry

if TYPE_CHECKING:
    # Checkpoints are signed only with an audit key (the daemon's, whose start loads the
    # anchor module) and verified on request: a run without either (an embedded CI run
    # without --report) does not load it. A verification's result is made on request too
    # (supervisor/models/views.py).
    from supervisor.audit.anchor import Checkpoint, CheckpointFile, Signer
    from supervisor.models.views import AuditVerifyResult

__all__ = ["GENESIS", "Anchoring", "AuditLog", "Subscriber"]

log = logging.getLogger(__name__)
T = TypeVar("T")

# Called with the connection that wrote the row and the entry (see the module docstring).
Subscriber = Callable[[sqlite3.Connection, AuditEntry], None]

AUDIT_ACTOR = "system:audit"
# Rows the writer always takes, whatever the queue holds: the kill path, state changes and the
# daemon's own lifecycle. Only rows an agent drives in volume (gateway refusals, approvals,
# tripwire observations) can be dropped, and then they are counted.
ESSENTIAL_VERBS = frozenset({
    "kill", "kill_confirmed", "stop", "shutdown", "global_halt", "lift_global_halt",
    "break_glass", "watchdog_kill", "watchdog_respawn", "reap", "pause", "resume",
    "reactivate", "exit", "launch", "forget", "daemon_start", "daemon_stop", "self_test",
    "audit_verify", "audit_write_failed", "audit_overflow", "cleanup", "drill",
    "disk_reserve", "logs_pruned", "ci_run_start", "ci_run_end",
})
# After these a checkpoint is signed at once: the newest kill is never left unanchored.
ANCHOR_NOW_VERBS = frozenset({"kill", "kill_confirmed", "shutdown", "global_halt",
                              "break_glass", "watchdog_kill", "daemon_start", "daemon_stop",
                              "audit_verify"})
_BATCH = 256
_SLOW = 0.1  # a commit, a checkpoint or a delivery this long is logged
_CHECKPOINT_DEFER_MAX = 1000
_RETRY_MAX_DELAY = 2.0


@dataclass
class Anchoring:
    """Where and how often the writer signs checkpoints (see anchor.py)."""

    signer: Signer
    file: CheckpointFile
    every_rows: int = 100
    interval: float = 60.0
    host: str = field(default_factory=socket.gethostname)


@dataclass
class _Pending:
    """An audit row queued for the writer, with the ticket its commit is awaited by."""
    fields: dict[str, Any]
    ticket: int


@dataclass
class Alarms:
    """What is wrong with the audit log now; empty when all is well."""

    write_error: str | None = None
    write_failures: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    checkpoint_error: str | None = None
    chain_problem: str | None = None
    # Shared with the state store (supervisor/daemon/store.py) and the disk reserve.
    store_error: str | None = None
    disk_reserve: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The alarms in force (a failure count only while writes are failing)."""
        active = {k: v for k, v in vars(self).items() if v and k != "write_failures"}
        if self.write_error is not None:
            active["write_failures"] = self.write_failures
        return active


class AuditLog:
    def __init__(self, db: sqlite3.Connection, *, anchoring: Anchoring | None = None,
                 queue_max: int = 4096) -> None:
        self.db = db
        self.anchoring = anchoring
        self.queue_max = queue_max
        self.subscribers: builtins.list[Subscriber] = []
        self.transactional: builtins.list[Subscriber] = []
        # Run in the writer's thread when a write fails; True if it freed something.
        self.on_write_failure: builtins.list[Callable[[BaseException], bool]] = []
        self.alarms = Alarms()
        self.last_checkpoint: Checkpoint | None = None
        db.executescript(SCHEMA)
        self._path = _path_of(db)
        self._cond = threading.Condition()
        self._queue: collections.deque[_Pending] = collections.deque()
        self._next_ticket = 0
        self._committed_ticket = 0
        self._unwoken = False  # rows committed whose `flush_blocking` waiters wait a wake
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._waiters: builtins.list[tuple[int, asyncio.Future[None]]] = []
        self._holding = 0  # batch() in progress: appends do not wake the writer
        self._rows_since_checkpoint = 0
        self._last_checkpoint_at = time.monotonic()
        self._anchor_now = False
        self._kills = 0  # kills under way (`kill_under_way`): no checkpoint starts meanwhile
        # Held from reading the head to keeping its checkpoint, and by `verify` while
        # it reads the file and opens its snapshot: the two always agree.
        self._anchor_lock = threading.Lock()

    # ------------------------------------------------------------------ subscribing

    def subscribe(self, subscriber: Subscriber, *, in_transaction: bool = False) -> None:
        (self.transactional if in_transaction else self.subscribers).append(subscriber)

    def in_transaction(self, subscriber: Subscriber, subscribed: bool) -> None:
        """Subscribe `subscriber` in the transaction, or not, from the next commit on (a
        reload that adds or removes the webhook endpoints). The list is replaced, never
        changed in place: the writer's thread reads it once per commit."""
        others = [s for s in self.transactional if s != subscriber]  # bound methods: ==
        self.transactional = [*others, subscriber] if subscribed else others

    # ------------------------------------------------------------------ writing

    def append(
        self, *, actor: str, verb: str, scope: str, reason: str = "", target: str | None = None,
        previous_state: str | None = None, new_state: str | None = None,
        time_to_halt_ms: float | None = None, outcome: str = "ok",
        detail: dict[str, Any] | None = None, wake: bool = True,
    ) -> AuditEntry | None:
        """Write one row: at once (returning it) before `start`, else queued for the writer
        (returning None; `await flushed()` waits for it). `wake=False`: queued without waking
        the writer, to go in the commit of the rows that follow it (a fleet action's row with
        its kill's rows); the caller then calls `wake()` once those are appended."""
        fields: dict[str, Any] = {
            "actor": cap_text("actor", actor), "verb": cap_text("verb", verb),
            "scope": cap_text("scope", scope), "target": cap_text("target", target),
            "reason": cap_text("reason", reason),
            "previous_state": cap_text("previous_state", previous_state),
            "new_state": cap_text("new_state", new_state), "time_to_halt_ms": time_to_halt_ms,
            "outcome": cap_text("outcome", outcome), "detail": cap_detail(detail),
        }
        if self._thread is None:
            entries = _entries(_commit(self.db, [fields], self.transactional))
            self._observe(entries)
            return entries[0]
        with self._cond:
            if len(self._queue) >= self.queue_max and verb not in ESSENTIAL_VERBS:
                self.alarms.dropped[verb] = self.alarms.dropped.get(verb, 0) + 1
                if sum(self.alarms.dropped.values()) == 1:
                    log.critical("audit queue full (%d rows): dropping %s rows and counting "
                                 "them", self.queue_max, verb)
                return None
            self._next_ticket += 1
            self._queue.append(_Pending(fields, self._next_ticket))
            if wake and not self._holding:
                self._cond.notify_all()
        return None

    def wake(self) -> None:
        """Hand the rows queued with `wake=False` to the writer (nothing if none wait)."""
        with self._cond:
            if self._queue and not self._holding:
                self._cond.notify_all()

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Rows appended inside are handed to the writer together at the end: one wake and one
        commit for a scoped kill's hundred rows, instead of a writer woken by the first row,
        committing a few at a time and taking the GIL from the loop still appending the
        rest (docs/benchmarks.md, run 8). Nothing waits longer than the batch's own code."""
        with self._cond:
            self._holding += 1
        try:
            yield
        finally:
            with self._cond:
                self._holding -= 1
                if not self._holding and self._queue:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def kill_under_way(self) -> Iterator[None]:
        """While a kill runs, no checkpoint starts: its signature, the file's fsync and its
        commit took 40 ms on ten daemons halting at once, and the kill's rows, queued in the
        meantime, waited behind it (a global halt's `global_halt` row asks for one at once,
        docs/benchmarks.md, fleet "Fourth pass"). Rows are committed as ever; the checkpoint
        the kill's rows ask for follows them once the kill is done."""
        with self._cond:
            self._kills += 1
        try:
            yield
        finally:
            with self._cond:
                self._kills -= 1
                self._cond.notify_all()

    async def write(self, **row: Any) -> None:
        """Append and wait until the row is durable (bounded by nothing: the kill path)."""
        self.append(**row)
        await self.flushed()

    async def flushed(self, timeout: float | None = None) -> bool:
        """Wait until every row appended before this call is committed; False on timeout."""
        if self._thread is None:
            return True
        with self._cond:
            ticket = self._next_ticket
            if self._committed_ticket >= ticket:
                return True
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((ticket, waiter))
        self.wake()  # a row queued with wake=False is waited for now
        self._wake_waiters()  # the commit may have landed between the check and here
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except TimeoutError:
            return False
        return True

    def durable(self) -> bool:
        """Every row appended so far is committed (without waiting)."""
        with self._cond:
            return self._thread is None or self._committed_ticket >= self._next_ticket

    def appended(self) -> int:
        """Where the rows appended so far end (`flush_blocking(upto=...)`)."""
        with self._cond:
            return self._next_ticket

    def flush_blocking(self, timeout: float = 30.0, upto: int | None = None) -> bool:
        """The same for code outside the loop (tests, shutdown, a fleet ack on the fleet
        writer's thread), or on it for a bounded moment where the loop would only wait for
        the rows (a scoped halt's, before its records: ending.kill_agents); False on
        timeout. `upto` (from `appended()`): only the rows appended until then."""
        deadline = time.monotonic() + timeout
        with self._cond:
            ticket = self._next_ticket if upto is None else upto
            if self._queue and not self._holding:
                self._cond.notify_all()  # a row queued with wake=False is waited for now
            while self._thread is not None and self._committed_ticket < ticket:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Hand every later append to the writer thread (the daemon calls this once)."""
        if self._thread is not None:
            return
        self._loop = loop
        self._stopping = False
        self._thread = threading.Thread(target=self._run_writer, name="audit-writer",
                                        daemon=True)
        self._thread.start()

    @property
    def writer_alive(self) -> bool:
        """The writer thread runs (inline mode, before start(), counts as alive)."""
        return self._thread is None or self._thread.is_alive()

    def close(self, timeout: float = 30.0) -> None:
        """Drain the queue, sign a last checkpoint, stop the writer. Appends after this are
        written at once again."""
        thread = self._thread
        if thread is None:
            return
        with self._cond:
            self._stopping = True
            self._anchor_now = True
            self._cond.notify_all()
        thread.join(timeout)
        if thread.is_alive():
            log.critical("audit writer did not finish within %.0fs; %d rows still queued",
                         timeout, len(self._queue))
            return
        self._thread = None

    def checkpoint(self) -> Checkpoint | None:
        """Sign the current head now, in the caller's thread (inline mode and tests)."""
        if self.anchoring is None:
            return None
        return self._sign_checkpoint(self.db)

    # ------------------------------------------------------------------ reading

    def list(self, limit: int = 100, after_seq: int = 0) -> builtins.list[AuditEntry]:
        rows = self.db.execute(
            f"SELECT {', '.join(COLUMNS)} FROM audit WHERE seq > ? ORDER BY seq DESC LIMIT ?",
            (after_seq, limit),
        ).fetchall()
        return [_entry(dict(zip(COLUMNS, r, strict=True))) for r in reversed(rows)]

    def count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM audit").fetchone()[0])

    def verify(self, from_anchor: bool = False) -> AuditVerifyResult:
        """The chain held against its checkpoints, read through a connection of its own (so
        this may run on any thread while the writer goes on). The checkpoint file and the
        database snapshot are taken under the lock the writer signs under, so they agree."""
        if self._path is None:
            return self._verify_with(self.db, self._read_file(), from_anchor)
        reader = _reader(self._path)
        try:
            with self._anchor_lock:
                checkpoints = self._read_file()
                reader.execute("BEGIN")
                reader.execute("SELECT seq FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
            return self._verify_with(reader, checkpoints, from_anchor)
        finally:
            reader.close()

    async def verify_async(self, from_anchor: bool = False, *, in_process: bool = True
                           ) -> AuditVerifyResult:
        """`verify` in a process of its own (supervisor/audit/verifier.py): neither the event
        loop nor the GIL, and so no kill, waits for it. Where that process gives no answer,
        the same verification runs on a thread here (logged). `in_process=False`: on a thread
        (the quick check at start, before any kill can be asked for, spares a child's start)."""
        if self._path is None:
            return self.verify(from_anchor)
        if not in_process:
            return await asyncio.to_thread(self.verify, from_anchor)
        return await asyncio.to_thread(self._verify_in_process, from_anchor)

    def _verify_in_process(self, from_anchor: bool) -> AuditVerifyResult:
        # Imported here: the verifier's module brings cryptography and argparse, which a
        # process that never verifies this way (an embedded CI run) should not pay for.
        from supervisor.audit.verifier import VerifierFailed, verify_in_process
        assert self._path is not None
        anchoring = self.anchoring
        try:
            return verify_in_process(
                self._path, anchoring.signer.public_key if anchoring is not None else None,
                anchoring.file.path if anchoring is not None else None,
                from_anchor=from_anchor)
        except VerifierFailed as exc:
            log.error("audit verification in a process of its own failed (%s); verifying "
                      "in the daemon instead", exc)
            return self.verify(from_anchor)

    def _read_file(self) -> builtins.list[Checkpoint] | None:
        return self.anchoring.file.read() if self.anchoring is not None else None

    def _verify_with(self, db: sqlite3.Connection, checkpoints: builtins.list[Checkpoint] | None,
                     from_anchor: bool) -> AuditVerifyResult:
        from supervisor.audit.anchor import verify as verify_anchored

        if self.anchoring is None:
            return verify_anchored(db, None, None, expect_file=False).model_copy(
                update={"notes": []})
        return verify_anchored(db, self.anchoring.signer.public_key, checkpoints,
                               checkpoint_file=str(self.anchoring.file.path),
                               from_anchor=from_anchor)

    # ------------------------------------------------------------------ the writer thread

    def _run_writer(self) -> None:
        assert self._path is not None
        db = _writer_connection(self._path)
        try:
            while True:
                with self._cond:
                    self._wake_flushers()  # this thread waits, or takes the next rows, now
                    while ((not self._queue or self._holding) and not self._stopping
                           and not self._checkpoint_due()):
                        self._cond.wait(self._until_checkpoint())
                    batch = [self._queue.popleft()
                             for _ in range(min(_BATCH, len(self._queue)))]
                    stopping = self._stopping and not self._queue
                if batch:
                    self._write_batch(db, batch)
                if self.alarms.dropped and not self._queue:
                    self._wake_flushers()
                    self._write_overflow(db)
                if self.anchoring is not None and (stopping or (
                        self._checkpoint_due() and not self._rows_waiting())):
                    self._wake_flushers()  # never behind a checkpoint's signature and fsync
                    started = time.perf_counter()
                    self._write_checkpoint(db)
                    took = time.perf_counter() - started
                    if took >= _SLOW:
                        log.info("audit writer: checkpoint signed and kept in %.1f ms",
                                 took * 1000)
                if stopping:
                    return
        finally:
            self._wake_flushers()
            db.close()

    def _wake_flushers(self) -> None:
        """Wake the threads in `flush_blocking` for the rows committed since the last wake:
        once this thread has handed them to the loop (`_post`) and is about to wait or to
        take the next rows, so the woken thread (a scoped halt's loop, with its answer to
        write) does not take turns at the GIL with the rest of this thread's work
        (docs/benchmarks.md run 18)."""
        with self._cond:
            if self._unwoken:
                self._unwoken = False
                self._cond.notify_all()

    def _write_batch(self, db: sqlite3.Connection, batch: builtins.list[_Pending]) -> None:
        started = time.perf_counter()
        rows = self._commit_retrying(db, [p.fields for p in batch])
        took = time.perf_counter() - started
        if took >= _SLOW:  # what a verb's answer waited for (docs/benchmarks.md)
            log.info("audit writer: %d rows committed in %.1f ms", len(rows), took * 1000)
        if any(row["verb"] in ANCHOR_NOW_VERBS for row in rows):
            self._anchor_now = True
        self._rows_since_checkpoint += len(rows)
        with self._cond:
            self._committed_ticket = batch[-1].ticket  # durable() says so from here
            self._unwoken = True
        self._post(rows)

    def _commit_retrying(self, db: sqlite3.Connection, rows: builtins.list[dict[str, Any]]
                         ) -> builtins.list[Committed]:
        return self._retrying(lambda: _commit(db, rows, self.transactional), db)

    def _retrying(self, action: Callable[[], T], db: sqlite3.Connection | None = None) -> T:
        """Run one transaction until it works, in order, never dropping it; the first failure
        runs `on_write_failure` (the reserve) and raises the alarm."""
        attempt = 0
        failed_since: float | None = None
        while True:
            try:
                result = action()
            except sqlite3.Error as exc:
                attempt += 1
                if failed_since is None:
                    failed_since = time.time()
                self._write_failed(exc, attempt)
                if attempt > 1:
                    time.sleep(min(0.05 * 2 ** min(attempt, 6), _RETRY_MAX_DELAY))
                continue
            if failed_since is not None and db is not None:
                self._write_recovered(db, failed_since, attempt)
            elif failed_since is not None:
                self.alarms.write_error = None
            return result

    def _write_failed(self, exc: BaseException, attempt: int) -> None:
        self.alarms.write_failures += 1
        self.alarms.write_error = f"{type(exc).__name__}: {exc}"
        freed = False
        for hook in self.on_write_failure:
            try:
                freed = hook(exc) or freed
            except Exception:
                log.exception("audit write-failure hook failed")
        if attempt == 1 or attempt % 50 == 0:
            log.critical("audit write failed (attempt %d): %s%s; retrying, nothing is dropped",
                         attempt, exc, " (reserve released)" if freed else "")

    def _write_recovered(self, db: sqlite3.Connection, since: float, attempts: int) -> None:
        error = self.alarms.write_error
        self.alarms.write_error = None
        log.warning("audit writes work again after %d failed attempts", attempts)
        entries = self._commit_retrying(db, [_fields(
            verb="audit_write_failed", outcome="recovered",
            reason="audit writes failed and were retried until they worked",
            detail={"error": error, "failed_attempts": attempts, "since": since,
                    "seconds": round(time.time() - since, 3)})])
        self._post(entries)

    def _write_overflow(self, db: sqlite3.Connection) -> None:
        with self._cond:
            dropped, self.alarms.dropped = self.alarms.dropped, {}
        entries = self._commit_retrying(db, [_fields(
            verb="audit_overflow", outcome="dropped",
            reason=f"the audit queue was full: {sum(dropped.values())} rows were not written",
            detail={"dropped_by_verb": dropped, "queue_max": self.queue_max})])
        self._post(entries)

    def _rows_waiting(self) -> bool:
        """Rows are queued behind a checkpoint that may wait for them: signing, the file's
        fsync and its commit took seconds on a loaded disk, in front of the 100 kill rows a
        global halt's answer waits for. A checkpoint waits for the queue to empty, unless
        rows never stop coming (then at most _CHECKPOINT_DEFER_MAX rows go unanchored)."""
        with self._cond:
            queued = bool(self._queue)
        return queued and self._rows_since_checkpoint < _CHECKPOINT_DEFER_MAX

    def _checkpoint_due(self) -> bool:
        if self.anchoring is None or self._rows_since_checkpoint == 0 or self._kills:
            return False
        return (self._anchor_now or self._rows_since_checkpoint >= self.anchoring.every_rows
                or time.monotonic() - self._last_checkpoint_at >= self.anchoring.interval)

    def _until_checkpoint(self) -> float | None:
        if self.anchoring is None or self._rows_since_checkpoint == 0:
            return None
        return max(0.01, self.anchoring.interval - (time.monotonic() - self._last_checkpoint_at))

    def _write_checkpoint(self, db: sqlite3.Connection) -> None:
        if self._rows_since_checkpoint == 0:
            return
        self._sign_checkpoint(db, post=True)

    def _sign_checkpoint(self, db: sqlite3.Connection, post: bool = False) -> Checkpoint | None:
        """Sign the head, put it in the file (first: the file is never behind the database),
        keep it in the database beside the chain (with its `audit.checkpoint` event), then
        in the journal."""
        assert self.anchoring is not None
        # Loaded already: the anchoring's signer and file are the anchor module's.
        from supervisor.audit.anchor import emit_to_journal
        from supervisor.audit.anchor import record as record_checkpoint

        with self._anchor_lock:
            last = db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
            if last is None:
                return None
            checkpoint = self.anchoring.signer.sign(int(last[0]), str(last[1]), time.time())
            try:
                self.anchoring.file.append(checkpoint)
                self.alarms.checkpoint_error = None
            except OSError as exc:
                self.alarms.checkpoint_error = f"{self.anchoring.file.path}: {exc}"
                log.critical("cannot write the audit checkpoint file %s: %s",
                             self.anchoring.file.path, exc)
            entry = _checkpoint_entry(checkpoint)

            def keep() -> None:
                with db:
                    record_checkpoint(db, checkpoint)
                    for subscriber in self.transactional:
                        subscriber(db, entry)

            if post:
                self._retrying(keep)
            else:
                keep()
        emit_to_journal(checkpoint, self.anchoring.host)
        self.last_checkpoint = checkpoint
        self._rows_since_checkpoint = 0
        self._anchor_now = False
        self._last_checkpoint_at = time.monotonic()
        if post:
            self._post([entry])
        else:
            self._observe([entry])
        return checkpoint

    def _post(self, entries: Sequence[AuditEntry | Committed]) -> None:
        """Hand committed rows to the loop: observers first, then whoever waits for them.
        A row goes as the writer committed it, and becomes its entry on the loop, after
        the answer that waited for it (`_commit`)."""
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # a closed loop: the daemon is exiting
            loop.call_soon_threadsafe(self._delivered, entries)

    def _delivered(self, rows: Sequence[AuditEntry | Committed]) -> None:
        started = time.perf_counter()
        entries = _entries(rows)
        self._observe(entries)
        self._wake_waiters()
        took = time.perf_counter() - started
        if took >= _SLOW:
            log.info("audit: observers of %d rows took %.1f ms on the loop", len(entries),
                     took * 1000)

    def _wake_waiters(self) -> None:
        with self._cond:
            committed = self._committed_ticket
        still = []
        for ticket, waiter in self._waiters:
            if ticket <= committed:
                if not waiter.done():
                    waiter.set_result(None)
            else:
                still.append((ticket, waiter))
        self._waiters = still

    def _observe(self, entries: builtins.list[AuditEntry]) -> None:
        for entry in entries:
            for subscriber in self.subscribers:
                try:
                    subscriber(self.db, entry)
                except Exception:
                    log.exception("audit subscriber %s failed on row %d",
                                  getattr(subscriber, "__qualname__", subscriber), entry.seq)


def _checkpoint_entry(checkpoint: Checkpoint) -> AuditEntry:
    """The event-shaped entry of a checkpoint (seq: the row it covers) for the subscribers."""
    return AuditEntry(seq=checkpoint.seq, ts=checkpoint.ts, actor=AUDIT_ACTOR,
                      verb=CHECKPOINT_VERB, scope="global", target=None,
                      reason=f"checkpoint of row {checkpoint.seq}", previous_state=None,
                      new_state=None, time_to_halt_ms=None, outcome="ok",
                      detail=checkpoint.as_dict(), prev_hash="", hash=checkpoint.hash)


def _fields(*, verb: str, reason: str = "", outcome: str = "ok",
            detail: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"actor": AUDIT_ACTOR, "verb": verb, "scope": "global", "target": None,
            "reason": reason, "previous_state": None, "new_state": None,
            "time_to_halt_ms": None, "outcome": outcome, "detail": cap_detail(detail)}


_INSERT = (f"INSERT INTO audit ({', '.join(COLUMNS)}) "
           f"VALUES ({', '.join('?' for _ in COLUMNS)})")


# A row as committed: its columns, and its entry once one was made (`_entries`).
Committed = dict[str, Any]


def _commit(db: sqlite3.Connection, rows: list[dict[str, Any]],
            transactional: list[Subscriber]) -> list[Committed]:
    """Chain and insert `rows` in one transaction (one statement for all), then the
    in-transaction subscribers, row by row. A kill's answer waits for this commit: the rows
    chained first and inserted together take 0.12 ms for a class halt's ten against 0.2 ms
    row by row (docs/benchmarks.md run 16). A row's entry (its detail parsed, the model
    validated) is made here only for an in-transaction subscriber; otherwise on the loop
    once the row is delivered (`_entries`), after the answer that waited for the commit
    (a class halt's ten: ~0.1 ms of it, docs/benchmarks.md run 20)."""
    with db:
        last = db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        seq, prev_hash = (last[0], last[1]) if last else (0, GENESIS)
        chained: list[dict[str, Any]] = []
        for fields in rows:
            seq += 1
            row: dict[str, Any] = {"seq": seq, "ts": round(time.time(), 6), **fields,
                                   "prev_hash": prev_hash}
            row["hash"] = prev_hash = row_hash(prev_hash, hashed_fields(row))
            chained.append(row)
        db.executemany(_INSERT, ([row[c] for c in COLUMNS] for row in chained))
        if transactional:
            for row in chained:
                entry = row[_ENTRY] = _entry(row)
                for subscriber in transactional:
                    subscriber(db, entry)
    return chained


_ENTRY = "_entry"  # a committed row's entry, when `_commit` made one


def _entries(rows: Sequence[AuditEntry | Committed]) -> list[AuditEntry]:
    """The entries of committed rows, each made once."""
    return [row if isinstance(row, AuditEntry) else row.get(_ENTRY) or _entry(row)
            for row in rows]


def _entry(row: dict[str, Any]) -> AuditEntry:
    return AuditEntry.model_validate({**row, "detail": json.loads(row["detail"])})


def _path_of(db: sqlite3.Connection) -> Path | None:
    """The file behind `db` (None for an in-memory database)."""
    for _, name, filename in db.execute("PRAGMA database_list").fetchall():
        if name == "main" and filename:
            return Path(filename)
    return None


def _writer_connection(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level="DEFERRED", timeout=30.0)
    # As the state store: a committed row survives a crash of the daemon. FULL would also
    # survive a power cut, but holds SQLite's write lock through an fsync, and the kill path's
    # own state writes on the loop would wait behind it (measured: a drill's time_to_halt
    # past its 50 ms SLO on a loaded host). The checkpoint file is fsynced.
    db.execute("PRAGMA synchronous=NORMAL")
    return db


def _reader(path: Path) -> sqlite3.Connection:
    """A connection for one verification: autocommit, so `BEGIN` opens one snapshot."""
    db = sqlite3.connect(path, isolation_level=None, timeout=30.0)
    db.execute("PRAGMA query_only=ON")
    return db
