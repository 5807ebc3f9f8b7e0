"""A host's ack of a fleet action leaves only once the action's audit rows are durable, as a
control request's answer does: the daemon's FleetMember with its verb replaced at the seam,
the real audit writer on a real SQLite file (its commit held at a seam) and the real fleet
writer thread in front of a fake store. The ack waits on the fleet writer's thread, woken by
the audit writer's commit; the action's own row goes to the writer with the kill's rows. No
root."""

from __future__ import annotations

import asyncio
import collections
import sqlite3
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from supervisor.audit import AuditLog
from supervisor.daemon.fleet import FleetMember, _Answer
from supervisor.daemon.store import connect
from supervisor.fleet.link import FleetLink
from supervisor.fleet.model import Ack, FleetAction, Keys, Selector
from supervisor.fleet.progress import Progress

WAIT = 10.0


class _Store:
    """The fleet writer's etcd client: each put, with the audit rows durable at that moment."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path
        self.puts: list[tuple[str, int]] = []
        self.put_seen = threading.Event()
        self.fail_next = 0

    def put(self, key: str, _value: str) -> None:
        from supervisor.errors import FleetStoreError
        if self.fail_next:
            self.fail_next -= 1
            raise FleetStoreError("the store is away for a moment")
        reader = sqlite3.connect(self.db_path)
        try:
            rows = reader.execute("SELECT COUNT(*) FROM audit").fetchone()[0]
        finally:
            reader.close()
        self.puts.append((key, rows))
        self.put_seen.set()


def _link(loop: asyncio.AbstractEventLoop, client: _Store) -> Any:
    link: Any = object.__new__(FleetLink)
    link.loop = loop
    link.writer_client = client
    link._stop = threading.Event()
    link._cond = threading.Condition()
    link._writes = collections.deque()
    link._latest = {}
    link.dropped_writes = 0
    thread = threading.Thread(target=link._writer, name="fleet-writer", daemon=True)
    thread.start()
    link._threads = [thread]
    return link


def _stop(link: Any) -> None:
    link._stop.set()
    with link._cond:
        link._cond.notify_all()
    for thread in link._threads:
        thread.join(WAIT)


def _member(loop: asyncio.AbstractEventLoop, audit: AuditLog, link: Any) -> Any:
    member: Any = object.__new__(FleetMember)
    member.config = SimpleNamespace(settle_delay=0.0, host_id="h1", labels={})
    member.arbiter = SimpleNamespace(answers_pending=set(), agents={}, global_halt=False)
    member.audit = audit
    member.loop = loop
    member.link = link
    member.keys = Keys("/fleet")
    member.progress = Progress()
    member._quiet = 1
    member._deferred = set()
    member._answers = set()
    member._began = 0.0
    member._save_applied = lambda: None
    return member


def test_an_ack_waits_for_its_actions_audit_rows_on_the_fleet_writers_thread(
        tmp_path: Path) -> None:
    db = connect(tmp_path / "state" / "state.db")
    audit = AuditLog(db)
    client = _Store(tmp_path / "state" / "state.db")
    holding, release = threading.Event(), threading.Event()
    commits: list[list[str]] = []
    commit = audit._commit_retrying

    def held_commit(db_: sqlite3.Connection, rows: list[dict[str, Any]]) -> Any:
        commits.append([str(row["verb"]) for row in rows])
        if any(row["verb"] == "kill" for row in rows):
            holding.set()
            release.wait(WAIT)
        return commit(db_, rows)

    audit._commit_retrying = held_commit  # type: ignore[method-assign]
    action = FleetAction(id="a1", verb="kill", selector=Selector(all=True), reason="drill",
                         operator="ops", issued_at=0.0)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        audit.start(loop)
        await audit.write(actor="a", verb="daemon_start", scope="global")
        await asyncio.sleep(0.2)  # the writer is back in its wait: a row must wake it
        link = _link(loop, client)
        member = _member(loop, audit, link)

        async def run_verb(_action: FleetAction, _arrived: float) -> Ack:
            with audit.batch():  # the kill's rows (ending.kill_agents), not waited for here
                for name in ("w1", "w2"):
                    audit.append(actor="fleet", verb="kill", scope="global", target=name)
            return Ack(action="a1", host="h1", outcome="ok", applied_at=0.0)

        member._run_verb = run_verb
        stored = _Answer(loop.create_future(), loop.create_future())
        member._answers.add(stored)
        try:
            await member._apply_verb(action, 0.0, 0.0, stored)
            assert await asyncio.to_thread(holding.wait, WAIT), "the rows never reached the writer"
            await asyncio.sleep(0.3)
            assert client.puts == [], "the ack left before its audit rows were durable"
            client.fail_next = 1  # the first put fails: the retry does not wait again
            release.set()
            assert await asyncio.to_thread(client.put_seen.wait, WAIT), "no ack"
            await asyncio.wait_for(stored.acked, WAIT)  # `done` ran on the loop
        finally:
            release.set()
            _stop(link)

    asyncio.run(scenario())
    audit.close()
    # The first row, the fleet_action row and the two kill rows: durable before the put.
    assert client.puts == [(Keys("/fleet").ack("h1", "a1"), 4)]
    # The action's row was not committed on its own: it went with the kill's rows.
    assert commits[1] == ["fleet_action", "kill", "kill"]
    db.close()
