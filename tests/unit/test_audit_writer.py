"""The audit writer thread (supervisor/audit/__init__.py) on a real SQLite file: appends leave
the event loop at once and land in order, `flushed` waits for durability, observers run on the
loop after the commit, a full queue drops only rows an agent drives (and says so), a failing
write is retried in order and alarmed, rows are capped in size, and the state store keeps and
retries its writes. No root."""

from __future__ import annotations

import asyncio
import errno
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor.audit import Anchoring, AuditLog
from supervisor.audit.anchor import CheckpointFile, Signer
from supervisor.audit.chain import DETAIL_MAX_BYTES, TEXT_MAX_CHARS
from supervisor.audit.reserve import DiskReserve
from supervisor.daemon.store import AgentRecord, RunRecord, Store, connect
from supervisor.models import AuditEntry, TelemetrySummary
from supervisor.telemetry.store import SummaryStore


@pytest.fixture
def db(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    connection = connect(tmp_path / "state" / "state.db")
    yield connection
    connection.close()


def test_appends_are_queued_ordered_and_durable_after_flushed(db: sqlite3.Connection) -> None:
    audit = AuditLog(db)
    loop_thread: list[int] = []
    seen: list[tuple[int, int]] = []
    in_transaction: list[int] = []
    audit.subscribe(lambda _db, e: seen.append((e.seq, threading.get_ident())))
    audit.subscribe(lambda _db, e: in_transaction.append(threading.get_ident()),
                    in_transaction=True)

    async def body() -> None:
        loop_thread.append(threading.get_ident())
        audit.start(asyncio.get_running_loop())
        for i in range(500):
            assert audit.append(actor="a", verb="pause", scope="global", detail={"i": i}) is None
        assert await audit.flushed(10)
        assert audit.count() == 500
        await audit.write(actor="a", verb="kill", scope="global")
        assert audit.list(limit=1)[0].verb == "kill"

    asyncio.run(body())
    audit.close()
    entries = audit.list(limit=1000)
    assert [e.detail.get("i") for e in entries[:500]] == list(range(500))
    assert [s for s, _ in seen] == list(range(1, 502))
    assert {t for _, t in seen} == set(loop_thread)  # observers: on the loop
    assert set(in_transaction) and loop_thread[0] not in in_transaction  # the writer's thread
    assert audit.verify().ok


def test_verification_reads_while_the_writer_writes(db: sqlite3.Connection) -> None:
    audit = AuditLog(db)
    for i in range(2000):
        audit.append(actor="a", verb="pause", scope="global", detail={"i": i})

    async def body() -> None:
        audit.start(asyncio.get_running_loop())
        verifying = asyncio.ensure_future(audit.verify_async())
        await audit.write(actor="a", verb="kill", scope="global")  # not behind the verify
        result = await verifying
        assert result.ok and result.rows >= 2000

    asyncio.run(body())
    audit.close()


def test_a_full_queue_drops_only_agent_driven_rows_and_audits_the_count(
        db: sqlite3.Connection) -> None:
    audit = AuditLog(db, queue_max=64)
    gate = threading.Event()

    def hold(_db: sqlite3.Connection, entry: AuditEntry) -> None:
        if entry.seq == 1:
            gate.wait(10)  # the writer is stuck (a slow disk)

    audit.subscribe(hold, in_transaction=True)

    async def body() -> None:
        audit.start(asyncio.get_running_loop())
        audit.append(actor="a", verb="pause", scope="global")
        await asyncio.sleep(0.05)
        for _ in range(200):
            audit.append(actor="gateway", verb="egress_denied", scope="agent:x")
        for _ in range(5):
            audit.append(actor="root", verb="kill", scope="agent:x")
        assert sum(audit.alarms.dropped.values()) > 100
        gate.set()
        assert await audit.flushed(10)

    asyncio.run(body())
    audit.close()
    entries = audit.list(limit=1000)
    assert [e.verb for e in entries].count("kill") == 5
    overflow = [e for e in entries if e.verb == "audit_overflow"]
    assert len(overflow) == 1
    denied = [e for e in entries if e.verb == "egress_denied"]
    assert overflow[0].detail["dropped_by_verb"]["egress_denied"] == 200 - len(denied)
    assert audit.alarms.dropped == {}
    assert audit.verify().ok


def test_a_failing_write_is_retried_in_order_and_alarmed(db: sqlite3.Connection) -> None:
    audit = AuditLog(db)
    failures = {"left": 3}
    hooks: list[str] = []

    def disk_full(_db: sqlite3.Connection, entry: AuditEntry) -> None:
        if entry.verb == "kill" and failures["left"] > 0:
            failures["left"] -= 1
            raise sqlite3.OperationalError("database or disk is full")

    audit.subscribe(disk_full, in_transaction=True)
    audit.on_write_failure.append(lambda exc: hooks.append(str(exc)) is None)

    async def body() -> None:
        audit.start(asyncio.get_running_loop())
        audit.append(actor="a", verb="pause", scope="global")
        await audit.write(actor="root", verb="kill", scope="agent:x", reason="stop it")
        audit.append(actor="a", verb="resume", scope="global")
        assert await audit.flushed(10)

    asyncio.run(body())
    audit.close()
    verbs = [e.verb for e in audit.list(limit=100)]
    assert verbs[:3] == ["pause", "kill", "audit_write_failed"] and "resume" in verbs
    recovered = audit.list(limit=100)[2]
    assert recovered.outcome == "recovered" and recovered.detail["failed_attempts"] == 3
    assert "disk is full" in recovered.detail["error"]
    assert hooks == ["database or disk is full"] * 3
    assert audit.alarms.write_error is None and audit.alarms.write_failures == 3
    assert audit.verify().ok


def test_rows_are_bounded_whatever_the_caller_sends(db: sqlite3.Connection) -> None:
    audit = AuditLog(db)
    entry = audit.append(actor="gateway", verb="egress_denied", scope="agent:x",
                         target="h" * 100_000, reason="r" * 100_000,
                         detail={"host": "x" * 5_000_000, "n": 1})
    assert entry is not None
    assert len(entry.target or "") == TEXT_MAX_CHARS["target"]
    assert len(entry.reason) == TEXT_MAX_CHARS["reason"]
    assert entry.detail["truncated"] is True and entry.detail["original_bytes"] > 5_000_000
    stored = db.execute("SELECT length(detail) FROM audit WHERE seq = 1").fetchone()[0]
    assert stored <= DETAIL_MAX_BYTES
    assert audit.verify().ok


def test_the_writer_checkpoints_after_a_kill_and_at_close(db: sqlite3.Connection,
                                                          tmp_path: Path) -> None:
    anchoring = Anchoring(signer=Signer.load_or_create(tmp_path / "etc" / "key"),
                          file=CheckpointFile(tmp_path / "log" / "cp.jsonl"),
                          every_rows=1000, interval=3600)
    audit = AuditLog(db, anchoring=anchoring)

    async def body() -> None:
        audit.start(asyncio.get_running_loop())
        audit.append(actor="a", verb="pause", scope="global")
        await audit.write(actor="root", verb="kill", scope="agent:x")
        for _ in range(50):
            if anchoring.file.read():
                break
            await asyncio.sleep(0.05)
        audit.append(actor="a", verb="resume", scope="global")

    asyncio.run(body())
    audit.close()
    checkpoints = anchoring.file.read()
    assert checkpoints is not None and [c.seq for c in checkpoints] == [2, 3]
    verbs = [e.verb for e in audit.list(limit=10)]
    assert verbs == ["pause", "kill", "resume"]
    result = audit.verify()
    assert result.ok and result.unanchored_rows == 0


# ----------------------------------------------------------------------------- the store


def _agent(name: str, state: str = "idle") -> AgentRecord:
    return AgentRecord(name=name, agent_class="default", profile="default", state=state,
                       created_at=1.0, updated_at=1.0)


def test_the_store_keeps_failed_writes_and_writes_them_when_it_can(
        db: sqlite3.Connection, tmp_path: Path) -> None:
    reserve = DiskReserve(tmp_path / "state" / "disk-reserve", 1 << 20)
    assert reserve.ensure() and reserve.held
    store = Store(db, reserve=reserve)
    store.put_agent(_agent("a1"))
    # A real SQLITE_FULL: the file may not grow past its present size (max_page_count).
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count = {pages}")
    big = _agent("a1", "killed")
    big.last_reason = "r" * 20_000  # needs new pages
    store.put_agent(big)
    assert not reserve.held  # released at the first failure
    assert store.alarms.disk_reserve is not None
    assert store.alarms.store_error is not None and store.unwritten == 1
    store.set_meta("global_halt", "x")  # kept together with the agent: one transaction later
    assert db.execute("SELECT value FROM meta").fetchall() == []
    assert [a.state for a in store.agents()] == ["idle"]
    db.execute("PRAGMA max_page_count = 1000000")
    assert store.flush()
    assert [a.state for a in store.agents()] == ["killed"]
    assert store.get_meta("global_halt") == "x"
    assert store.alarms.store_error is None and store.unwritten == 0
    assert reserve.ensure() and reserve.held


def test_a_discarded_reserve_is_gone_without_an_alarm_and_a_later_release_copes(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An embedded CI run's core discards its reserve once its run has ended (daemon/core.py
    `discard_reserve`): the file and its room go, nothing says the disk filled, and a write
    that fails afterwards finds nothing left to release (its room was given back already)."""
    reserve = DiskReserve(tmp_path / "disk-reserve", 1 << 20)
    assert reserve.ensure() and reserve.held
    reserve.discard()
    assert not reserve.path.exists() and not reserve.held
    assert reserve.released_at is None and not caplog.records
    reserve.discard()  # again: nothing to do
    assert reserve.release(OSError(errno.ENOSPC, "full")) is False
    assert reserve.released_at is None


def test_a_batch_of_store_writes_is_one_transaction_and_readable_meanwhile(
        db: sqlite3.Connection, tmp_path: Path) -> None:
    store = Store(db)
    commits: list[str] = []
    db.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
    with store.batch():
        for index in range(50):
            store.put_agent(_agent(f"a{index}", "killed"))
            store.put_run(RunRecord(
                id=f"r{index}", agent=f"a{index}", state="killed", command=["sleep"],
                profile="default", workspace=None, container_id="c", netns="n", cgroup="g",
                bundle="b", log_path="l", uid_slot=index, started_at=1.0))
        with store.batch():  # nested: still one transaction, at the outer end
            store.set_meta("global_halt", "x")
        assert commits == [] and store.unwritten == 101
        assert db.execute("SELECT count(*) FROM agents").fetchone()[0] == 0
        run = store.run("r7")
        assert run is not None and run.state == "killed"  # read from the kept writes
    assert commits == ["COMMIT"] and store.unwritten == 0
    assert db.execute("SELECT count(*) FROM runs").fetchone()[0] == 50
    assert [a.state for a in store.agents()] == ["killed"] * 50
    store.put_agent(_agent("after"))  # outside a batch: written at once again
    assert commits == ["COMMIT", "COMMIT"]


def test_a_checkpoint_never_sits_in_front_of_queued_rows(db: sqlite3.Connection,
                                                         tmp_path: Path) -> None:
    """A global halt appends a hundred kill rows its answer waits for: the checkpoint a kill
    row asks for is signed once they are all committed, not between two batches of them."""
    anchoring = Anchoring(signer=Signer.load_or_create(tmp_path / "etc" / "key"),
                          file=CheckpointFile(tmp_path / "log" / "cp.jsonl"),
                          every_rows=1000, interval=3600)
    audit = AuditLog(db, anchoring=anchoring)

    async def body() -> None:
        audit.start(asyncio.get_running_loop())
        with audit._cond:  # every row is queued before the writer takes its first batch
            audit.append(actor="root", verb="kill", scope="global")
            for index in range(300):
                audit.append(actor="root", verb="kill", scope=f"agent:a{index}")
        assert await audit.flushed(30)

    asyncio.run(body())
    audit.close()
    checkpoints = anchoring.file.read()
    # One batch is at most 256 rows: the first one's checkpoint waited for the second batch.
    assert checkpoints is not None and [c.seq for c in checkpoints] == [301]
    assert audit.verify().ok


def test_no_checkpoint_starts_while_a_kill_is_under_way(db: sqlite3.Connection,
                                                         tmp_path: Path) -> None:
    """A global halt's `global_halt` row asks for a checkpoint at once; signed while the kill
    sent its SIGKILLs, it held the kill's rows behind its fsync. While a kill is under way the
    writer commits rows as ever but starts no checkpoint; the one they ask for follows the
    kill, covering its rows."""
    anchoring = Anchoring(signer=Signer.load_or_create(tmp_path / "etc" / "key"),
                          file=CheckpointFile(tmp_path / "log" / "cp.jsonl"),
                          every_rows=1000, interval=3600)
    audit = AuditLog(db, anchoring=anchoring)

    async def body() -> None:
        audit.start(asyncio.get_running_loop())
        with audit.kill_under_way():
            await audit.write(actor="root", verb="global_halt", scope="global")
            with audit.kill_under_way():  # a second kill meanwhile
                await audit.write(actor="root", verb="kill", scope="agent:a")
            await asyncio.sleep(0.3)
            assert audit.count() == 2 and anchoring.file.read() is None  # rows, no checkpoint
            await audit.write(actor="root", verb="kill", scope="agent:b")
        for _ in range(100):
            if anchoring.file.read():
                break
            await asyncio.sleep(0.05)
        checkpoints = anchoring.file.read()
        assert checkpoints is not None and [c.seq for c in checkpoints] == [3]

    asyncio.run(body())
    audit.close()
    assert audit.verify().ok


def test_rows_appended_in_a_batch_wake_the_writer_once_at_its_end(
        db: sqlite3.Connection) -> None:
    """A scoped kill appends a row per agent inside `audit.batch()`: none is committed while
    the batch is open (the writer is not woken to take the GIL from the loop), all are after."""
    audit = AuditLog(db)

    async def body() -> None:
        audit.start(asyncio.get_running_loop())
        with audit.batch():
            for i in range(100):
                audit.append(actor="a", verb="kill", scope="global", target=f"a{i}")
            with audit.batch():  # nested: handed over at the outer end
                audit.append(actor="a", verb="kill", scope="global", target="last")
            await asyncio.sleep(0.3)
            assert audit.count() == 0
        assert await audit.flushed(10)
        assert audit.count() == 101
        audit.append(actor="a", verb="pause", scope="global")  # outside a batch: at once
        assert await audit.flushed(10) and audit.count() == 102

    asyncio.run(body())
    audit.close()
    assert [e.target for e in audit.list(limit=200)][-2:] == ["last", None]
    assert audit.verify().ok


def test_a_row_queued_without_a_wake_goes_in_the_commit_of_the_rows_after_it(
        db: sqlite3.Connection) -> None:
    """A fleet action's row (`wake=False`) waits for its kill's rows and is committed with
    them, in order, in one transaction; `wake()` hands over a row left alone, and whoever
    waits for such a row (`flushed`, `flush_blocking`) wakes the writer for it."""
    audit = AuditLog(db)
    commits: list[list[str]] = []
    commit = audit._commit_retrying

    def counted(db_: sqlite3.Connection, rows: list[dict[str, object]]) -> list[AuditEntry]:
        commits.append([str(row["verb"]) for row in rows])
        return commit(db_, rows)

    audit._commit_retrying = counted  # type: ignore[method-assign]

    async def body() -> None:
        audit.start(asyncio.get_running_loop())
        await audit.write(actor="a", verb="daemon_start", scope="global")
        await asyncio.sleep(0.2)  # the writer is back in its wait: a row must wake it
        commits.clear()
        audit.append(actor="a", verb="fleet_action", scope="global", wake=False)
        await asyncio.sleep(0.3)
        assert audit.count() == 1 and commits == []  # not woken for it alone
        with audit.batch():
            for i in range(3):
                audit.append(actor="a", verb="kill", scope="class:web", target=f"a{i}")
        assert audit.flush_blocking(10)
        assert commits == [["fleet_action", "kill", "kill", "kill"]]
        await asyncio.sleep(0.2)  # the writer back in its wait
        audit.append(actor="a", verb="fleet_action", scope="global", wake=False)
        await asyncio.sleep(0.3)
        assert audit.count() == 5
        audit.wake()
        assert await audit.flushed(10) and audit.count() == 6
        await asyncio.sleep(0.2)
        audit.append(actor="a", verb="fleet_action", scope="global", wake=False)
        assert await audit.flushed(10) and audit.count() == 7  # the wait woke the writer
        await asyncio.sleep(0.2)
        audit.append(actor="a", verb="fleet_action", scope="global", wake=False)
        assert audit.flush_blocking(10) and audit.count() == 8

    asyncio.run(body())
    audit.close()
    assert [e.verb for e in audit.list(limit=10)] == (
        ["daemon_start", "fleet_action"] + ["kill"] * 3 + ["fleet_action"] * 3)
    assert audit.verify().ok


def test_a_blocking_flush_wakes_once_the_writer_has_handed_its_rows_to_the_loop(
        db: sqlite3.Connection) -> None:
    """A scoped halt's loop waits for its rows in `flush_blocking`, then writes its answer:
    the writer wakes it only once it has handed the committed rows to the loop (`_post`),
    so the two threads do not take turns at the GIL meanwhile. The rows are durable
    (`durable()`) from their commit; the wake follows the hand-over, whatever it costs."""
    audit = AuditLog(db)
    post = audit._post
    woken_during_post: list[bool] = []
    durable_during_post: list[bool] = []
    returned = threading.Event()

    def slow_post(rows: list[dict[str, Any]]) -> None:  # as committed (entries on the loop)
        if any(row["verb"] == "kill" for row in rows):
            durable_during_post.append(audit.durable())
            woken_during_post.append(returned.wait(0.3))
        post(rows)

    audit._post = slow_post  # type: ignore[method-assign]

    async def body() -> None:
        audit.start(asyncio.get_running_loop())
        with audit.batch():
            for i in range(3):
                audit.append(actor="a", verb="kill", scope="class:web", target=f"a{i}")
        assert audit.flush_blocking(10)
        returned.set()
        assert await audit.flushed(10)  # the loop's waiters too, through the hand-over

    asyncio.run(body())
    audit.close()
    assert woken_during_post == [False], "flush_blocking returned before the hand-over"
    assert durable_during_post == [True]
    assert audit.count() == 3 and audit.verify().ok


def test_telemetry_summaries_join_the_store_batch_and_are_readable_meanwhile(
        db: sqlite3.Connection) -> None:
    """A kill's batch of records takes the ended runs' telemetry summaries too: one commit,
    and `get` sees a summary before it is on disk."""
    store = Store(db)
    summaries = SummaryStore(db, batches=store)
    commits: list[str] = []
    db.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
    with store.batch():
        store.put_agent(_agent("a1", "killed"))
        for index in range(10):
            summaries.put(TelemetrySummary(run_id=f"r{index}", started_at=1.0, ended_at=2.0,
                                           samples=index))
        assert commits == []
        assert db.execute("SELECT count(*) FROM run_telemetry").fetchone()[0] == 0
        kept = summaries.get("r7")
        assert kept is not None and kept.samples == 7
    assert commits == ["COMMIT"]
    assert db.execute("SELECT count(*) FROM run_telemetry").fetchone()[0] == 10
    stored = summaries.get("r7")
    assert stored is not None and stored.samples == 7 and stored.ended_at == 2.0
    summaries.put(TelemetrySummary(run_id="after", started_at=1.0))  # no batch: at once
    assert commits == ["COMMIT", "COMMIT"] and summaries.get("after") is not None


@pytest.mark.parametrize("field", ["actor", "scope", "target", "reason", "outcome"])
def test_an_unpaired_surrogate_in_a_row_never_stops_the_writer(db: sqlite3.Connection,
                                                              field: str) -> None:
    """A text an agent drives can hold an unpaired UTF-16 surrogate (the JSON escape \\ud800
    parses to one, os.fsdecode makes one of a byte that is not UTF-8). The row's hash encodes
    it as UTF-8, which raised UnicodeEncodeError in the writer thread: it died, and no row was
    committed after it (a kill's answer then waited for rows that never came). The surrogate
    is written escaped, every row after it is committed, and the chain verifies."""
    audit = AuditLog(db)

    async def body() -> None:
        audit.start(asyncio.get_running_loop())
        row = {"actor": "system:gateway", "verb": "approval_requested", "scope": "agent:a",
               "target": "a", "reason": "held", "outcome": "pending"}
        audit.append(**{**row, field: "x\ud800y\udcffz"})
        audit.append(actor="operator", verb="kill", scope="agent:a", target="a")
        assert await audit.flushed(30), "the rows after it were never committed"
        assert audit.writer_alive

    asyncio.run(body())
    audit.close()
    first, kill = audit.list(limit=10)
    assert getattr(first, field) == "x\\ud800y\\udcffz"
    assert kill.verb == "kill"
    assert audit.verify().ok
