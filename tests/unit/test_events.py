"""Webhooks (supervisor/events/) without root: audit entries -> events, signatures, the Slack
payload, secrets, the outbox's atomicity with the audit row and its per-agent ordering, the
backoff schedule, and the delivery worker against a real aiohttp receiver on 127.0.0.1 with a
real SQLite file."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import sqlite3
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from supervisor.audit import AuditLog
from supervisor.config import WebhookDelivery, WebhookEndpoint
from supervisor.errors import ConfigInvalid
from supervisor.events import (
    EVENT_TYPES,
    DeliveryWorker,
    Endpoint,
    Outbox,
    backoff_delay,
    event_from_audit,
    load_endpoints,
    render,
    sign,
    slack_message,
)
from supervisor.models import AuditEntry
from tests.support.webhooks import Receiver, check_deliveries

T = TypeVar("T")
SECRET = b"s3cret-for-tests"
WAIT = 10.0
FAST = WebhookDelivery(timeout=2.0, backoff_initial=0.02, backoff_max=0.1)


def entry(verb: str, outcome: str = "ok", target: str | None = "a1",
          scope: str | None = None, seq: int = 7, **fields: Any) -> AuditEntry:
    values: dict[str, Any] = {
        "seq": seq, "ts": 1_700_000_000.25, "actor": "alice(uid=1000)", "verb": verb,
        "scope": scope or (f"agent:{target}" if target else "global"), "target": target,
        "reason": "runaway", "previous_state": "active", "new_state": "killed",
        "time_to_halt_ms": 12.345, "outcome": outcome,
        "detail": {"run": "r1", "command": ["agent", "--token=x"], "actor": {"uid": 1000}},
        "prev_hash": "0" * 64, "hash": "1" * 64,
    }
    return AuditEntry.model_validate({**values, **fields})


def endpoint(url: str = "http://127.0.0.1:1/hook", fmt: str = "json",
             events: tuple[str, ...] = (), index: int = 0) -> Endpoint:
    return Endpoint(index=index, url=url, secret=SECRET, format=fmt,  # type: ignore[arg-type]
                    events=events)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    connection = sqlite3.connect(tmp_path / "state.db")
    yield connection
    connection.close()


def outbox_ids(db: sqlite3.Connection) -> list[tuple[str, str | None]]:
    return db.execute("SELECT event_type, agent FROM webhook_outbox ORDER BY id").fetchall()


# ----------------------------------------------------------------------------- mapping


@pytest.mark.parametrize(("verb", "expected"), [
    ("launch", "agent.launched"), ("pause", "agent.paused"), ("resume", "agent.resumed"),
    ("kill", "agent.killed"), ("kill_confirmed", "agent.killed"), ("reap", "agent.killed"),
    ("reactivate", "agent.reactivated"), ("exit", "agent.exited"), ("stop", "agent.exited"),
    ("shutdown", "agent.exited"), ("tripwire", "tripwire.fired"), ("drill", "drill.completed"),
])
def test_each_verb_maps_to_its_event(verb: str, expected: str) -> None:
    event = event_from_audit(entry(verb), "host1")
    assert event is not None and event.type == expected
    assert event.type in EVENT_TYPES


@pytest.mark.parametrize("audit", [
    entry("kill", outcome="refused:forbidden"),
    entry("launch", outcome="refused:agent_killed"),
    entry("launch", outcome="failed:runtime_failed"),
    entry("launch", outcome="aborted:killed"),
    entry("reap", target="ast-abc123", scope="global"),  # a leftover container, not an agent
    entry("daemon_start", target=None),
    entry("global_halt", target=None),
    entry("webhook_given_up", target=None, outcome="given_up"),
], ids=lambda e: f"{e.verb}:{e.outcome}")
def test_refusals_failures_and_housekeeping_make_no_event(audit: AuditEntry) -> None:
    assert event_from_audit(audit, "host1") is None


def test_an_event_carries_who_what_why_and_how_fast() -> None:
    event = event_from_audit(entry("kill", scope="class:coders"), "host1")
    assert event is not None
    assert len(event.id) == 32 and int(event.id, 16) >= 0
    assert event.timestamp == "2023-11-14T22:13:20.250Z"
    assert (event.ts, event.host, event.actor, event.reason) == (
        1_700_000_000.25, "host1", "alice(uid=1000)", "runaway")
    assert (event.scope, event.agent, event.run) == ("class:coders", "a1", "r1")
    assert (event.previous_state, event.new_state) == ("active", "killed")
    assert (event.time_to_halt_ms, event.audit_seq, event.verb) == (12.345, 7, "kill")
    # The invoker's identity stays; the agent's command line (tokens) does not travel.
    assert event.detail == {"run": "r1", "actor": {"uid": 1000}}
    other = event_from_audit(entry("kill"), "host1")
    assert other is not None and other.id != event.id


def test_json_body_is_the_event() -> None:
    event = event_from_audit(entry("pause"), "host1")
    assert event is not None
    body = json.loads(render(event, "json"))
    assert body["id"] == event.id and body["type"] == "agent.paused"
    assert body["actor"] == "alice(uid=1000)" and body["time_to_halt_ms"] == 12.345


# ----------------------------------------------------------------------------- signature, Slack


def test_signature_is_hmac_sha256_over_timestamp_dot_body() -> None:
    body = b'{"id":"abc","type":"agent.killed"}'
    expected = hmac.new(SECRET, b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sign(SECRET, 1_700_000_000, body) == f"sha256={expected}"
    assert sign(SECRET, 1_700_000_001, body) != sign(SECRET, 1_700_000_000, body)
    assert sign(b"other", 1_700_000_000, body) != sign(SECRET, 1_700_000_000, body)


def test_slack_message_is_one_readable_line_plus_blocks() -> None:
    event = event_from_audit(entry("kill", reason="<b>runaway</b> & co"), "host1")
    assert event is not None
    message = slack_message(event)
    assert set(message) == {"text", "blocks"}
    assert message["text"] == (":red_circle: agent `a1` killed by alice(uid=1000) "
                               "(&lt;b&gt;runaway&lt;/b&gt; &amp; co) in 12.3 ms on host1")
    section, context = message["blocks"]
    assert section == {"type": "section", "text": {"type": "mrkdwn", "text": message["text"]}}
    assert context["type"] == "context"
    assert event.id in context["elements"][0]["text"]
    assert json.loads(render(event, "slack")) == message


def test_slack_lines_for_exit_and_shutdown() -> None:
    exited = event_from_audit(entry("exit", reason="", time_to_halt_ms=None,
                                    detail={"run": "r1", "exit_code": 3}), "h")
    assert exited is not None
    assert slack_message(exited)["text"] == ":white_circle: agent `a1` exited with status 3 on h"
    stopped = event_from_audit(entry("shutdown", actor="system:supervisor",
                                     reason="supervisor shutdown"), "h")
    assert stopped is not None
    assert slack_message(stopped)["text"] == (
        ":white_circle: agent `a1` stopped by system:supervisor (supervisor shutdown) "
        "in 12.3 ms on h")


# ----------------------------------------------------------------------------- secrets


def config_endpoint(**fields: Any) -> WebhookEndpoint:
    return WebhookEndpoint.model_validate({"url": "https://hooks.example.com/T0/B0/PathKey-Q7",
                                           **fields})


def secret_file(tmp_path: Path, mode: int = 0o600, text: str = "  k3y\n",
                name: str = "hook.secret") -> Path:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(mode)
    return path


def test_a_private_secret_file_is_read_and_stripped(tmp_path: Path) -> None:
    [loaded] = load_endpoints([config_endpoint(secret_file=secret_file(tmp_path),
                                               events=["agent.*", "drill.completed"])])
    assert loaded.secret == b"k3y"
    assert loaded.wants("agent.killed") and loaded.wants("drill.completed")
    assert not loaded.wants("tripwire.fired")
    # The path of a Slack URL is its secret: logs and listings show only the host.
    assert loaded.name == "webhooks[0] https://hooks.example.com/…"


def test_secret_from_the_environment() -> None:
    [loaded] = load_endpoints([config_endpoint(secret_env="HOOK_KEY")], {"HOOK_KEY": "k"})
    assert loaded.secret == b"k"


@pytest.mark.parametrize(("case", "message"), [
    ("missing", "cannot read secret_file"),
    ("group-readable", "accessible by group or others (mode 0640); chmod 600"),
    ("world-readable", "accessible by group or others (mode 0604)"),
    ("empty", "is empty"),
    ("no secret", "no secret; every endpoint needs secret_file"),
    ("env unset", "secret_env 'NOPE' is not set"),
    ("both", "give secret_file or secret_env, not both"),
    ("unknown event", "'agent.exploded' is no event type"),
    ("duplicate", "the same URL is configured twice"),
])
def test_bad_webhook_config_refuses_to_start_naming_the_endpoint(
        tmp_path: Path, case: str, message: str) -> None:
    good = secret_file(tmp_path)
    endpoints = {
        "missing": [config_endpoint(secret_file=tmp_path / "absent")],
        "group-readable": [config_endpoint(secret_file=secret_file(tmp_path, 0o640, name="g"))],
        "world-readable": [config_endpoint(secret_file=secret_file(tmp_path, 0o604, name="w"))],
        "empty": [config_endpoint(secret_file=secret_file(tmp_path, text="\n", name="e"))],
        "no secret": [config_endpoint()],
        "env unset": [config_endpoint(secret_env="NOPE")],
        "both": [config_endpoint(secret_file=good, secret_env="HOOK_KEY")],
        "unknown event": [config_endpoint(secret_file=good, events=["agent.exploded"])],
        "duplicate": [config_endpoint(secret_file=good), config_endpoint(secret_file=good)],
    }[case]
    with pytest.raises(ConfigInvalid) as raised:
        load_endpoints(endpoints, {"HOOK_KEY": "k"})
    index = 1 if case == "duplicate" else 0
    assert f"webhooks[{index}] (https://hooks.example.com/…)" in raised.value.message
    assert message in raised.value.message
    assert "PathKey-Q7" not in raised.value.message


# ----------------------------------------------------------------------------- the outbox


def test_the_outbox_row_commits_or_rolls_back_with_its_audit_row(
        db: sqlite3.Connection) -> None:
    audit = AuditLog(db)
    outbox = Outbox(db, [endpoint()], host="h")
    outbox.attach(audit)
    audit.append(actor="alice", verb="pause", scope="agent:a1", target="a1")
    assert outbox_ids(db) == [("agent.paused", "a1")]

    def broken(_db: sqlite3.Connection, _entry: AuditEntry) -> None:
        raise RuntimeError("a later subscriber fails")

    audit.subscribe(broken, in_transaction=True)
    with pytest.raises(RuntimeError):
        audit.append(actor="alice", verb="kill", scope="agent:a1", target="a1")
    assert audit.count() == 1
    assert outbox_ids(db) == [("agent.paused", "a1")]
    assert audit.verify().ok


def test_a_row_becomes_its_entry_in_the_transaction_only_for_a_subscriber_there(
        db: sqlite3.Connection) -> None:
    """An outbox without endpoints subscribes to nothing in the transaction, so the writer
    makes no entry there (a kill's answer waits for that commit); the loop's subscribers
    get each row's entry all the same, detail parsed. With an in-transaction subscriber,
    the entry it was given is the one the loop's subscribers get (made once)."""
    audit = AuditLog(db)
    Outbox(db, [], host="h").attach(audit)
    assert audit.transactional == []
    Outbox(db, [endpoint()], host="h").attach(audit)
    assert len(audit.transactional) == 1
    in_transaction: list[AuditEntry] = []
    on_loop: list[AuditEntry] = []
    audit.transactional.clear()

    async def body(with_subscriber: bool) -> None:
        audit.transactional[:] = [lambda _db, e: in_transaction.append(e)] \
            if with_subscriber else []
        audit.start(asyncio.get_running_loop())
        audit.append(actor="alice", verb="kill", scope="class:web", target="a1",
                     detail={"run": "r1", "survivors": [1, 2]})
        assert await audit.flushed(10)
        audit.close()

    audit.subscribe(lambda _db, e: on_loop.append(e))
    asyncio.run(body(False))
    assert in_transaction == []
    asyncio.run(body(True))
    assert [(e.seq, e.verb, e.target, e.detail) for e in on_loop] == [
        (1, "kill", "a1", {"run": "r1", "survivors": [1, 2]}),
        (2, "kill", "a1", {"run": "r1", "survivors": [1, 2]})]
    assert len(in_transaction) == 1 and in_transaction[0] is on_loop[1]
    assert audit.verify().ok


def test_endpoints_a_reload_adds_or_removes_are_followed_by_the_writers_commits(
        db: sqlite3.Connection) -> None:
    """A daemon started without webhooks subscribes nothing in the transaction; the endpoint
    a reload adds (`Outbox.configure`) gets the rows committed by the writer's thread from
    then on, and none once a reload removes it (it used to get no row until a restart)."""
    audit = AuditLog(db)
    outbox = Outbox(db, [], host="h")
    outbox.attach(audit)
    assert audit.transactional == []

    async def commit(verb: str) -> None:
        audit.append(actor="alice", verb=verb, scope="agent:a1", target="a1")
        assert await audit.flushed(WAIT)

    async def body() -> None:
        audit.start(asyncio.get_running_loop())
        await commit("pause")
        outbox.configure([endpoint()])
        outbox.configure([endpoint()])  # a second reload with the same endpoint
        assert len(audit.transactional) == 1
        await commit("kill")
        outbox.configure([])
        assert audit.transactional == []
        await commit("resume")
        audit.close()

    asyncio.run(body())
    assert outbox_ids(db) == [("agent.killed", "a1")]
    assert audit.verify().ok


def test_one_row_per_interested_endpoint_and_none_for_non_events(
        db: sqlite3.Connection) -> None:
    audit = AuditLog(db)
    outbox = Outbox(db, [endpoint("http://a/"), endpoint("http://b/", events=("agent.killed",),
                                                         index=1)], host="h")
    outbox.attach(audit)
    audit.append(actor="alice", verb="pause", scope="agent:a1", target="a1")
    audit.append(actor="alice", verb="kill", scope="agent:a1", target="a1")
    audit.append(actor="alice", verb="kill", scope="agent:a1", target="a1",
                 outcome="refused:forbidden")
    audit.append(actor="system", verb="daemon_start", scope="global")
    rows = db.execute("SELECT event_type, endpoint, event_id FROM webhook_outbox").fetchall()
    assert sorted((t, e) for t, e, _ in rows) == [
        ("agent.killed", "http://a/"), ("agent.killed", "http://b/"),
        ("agent.paused", "http://a/")]
    kill_ids = {i for t, _, i in rows if t == "agent.killed"}
    assert len(kill_ids) == 1  # one event, the same id at every endpoint
    assert outbox.backlog() == 3


def test_only_the_oldest_event_of_each_agent_and_endpoint_may_go(
        db: sqlite3.Connection) -> None:
    audit = AuditLog(db)
    outbox = Outbox(db, [endpoint("http://a/"), endpoint("http://b/", index=1)], host="h")
    outbox.attach(audit)
    for verb, agent in [("launch", "a1"), ("launch", "a2"), ("pause", "a1"), ("kill", "a2"),
                        ("tripwire", None), ("drill", None)]:
        audit.append(actor="alice", verb=verb, target=agent,
                     scope=f"agent:{agent}" if agent else "global")

    def heads() -> set[tuple[str, str | None, str]]:
        return {(h.endpoint, h.agent, h.event_type) for h in outbox.heads()}

    assert heads() == {(url, agent, kind) for url in ("http://a/", "http://b/")
                       for agent, kind in [("a1", "agent.launched"), ("a2", "agent.launched"),
                                           (None, "tripwire.fired")]}
    a1_head = next(h for h in outbox.heads() if h.endpoint == "http://a/" and h.agent == "a1")
    outbox.mark_failed(a1_head.id, 503, "HTTP 503", retry_at=0.0)
    assert (a1_head.endpoint, "a1", "agent.launched") in heads()  # a failure holds the line
    outbox.mark_delivered(a1_head.id, 200)
    assert ("http://a/", "a1", "agent.paused") in heads()
    assert ("http://b/", "a1", "agent.launched") in heads()  # endpoints are independent
    assert outbox.backlog() == 11
    assert outbox.counts() == {"pending": 11, "delivered": 1, "given_up": 0}
    rows = all_rows(db)
    assert len(rows) == 12
    [delivered] = [row for row in rows if row["delivered_at"] is not None]
    assert (delivered["id"], delivered["attempts"]) == (a1_head.id, 2)


def test_a_row_is_given_up_only_together_with_its_audit_row(db: sqlite3.Connection) -> None:
    audit = AuditLog(db)
    outbox = Outbox(db, [endpoint()], host="h")
    outbox.attach(audit)
    audit.append(actor="alice", verb="pause", scope="agent:a1", target="a1")
    [head] = outbox.heads()

    def disk_full(_db: sqlite3.Connection, audited: AuditEntry) -> None:
        if audited.verb == "webhook_given_up":
            raise sqlite3.OperationalError("database or disk is full")

    def give_up() -> None:
        outbox.give_up(head.id, 503, "HTTP 503", lambda: audit.append(
            actor="system:webhooks", verb="webhook_given_up", scope="global"))

    audit.subscribe(disk_full, in_transaction=True)
    with pytest.raises(sqlite3.OperationalError):
        give_up()
    assert outbox.counts() == {"pending": 1, "delivered": 0, "given_up": 0}
    assert outbox.heads()[0].attempts == 0 and audit.count() == 1
    audit.transactional.remove(disk_full)
    give_up()
    assert outbox.counts() == {"pending": 0, "delivered": 0, "given_up": 1}
    assert [e.verb for e in audit.list()] == ["pause", "webhook_given_up"]


def test_backoff_doubles_from_initial_to_max_with_jitter_below() -> None:
    top = [backoff_delay(n, 0.05, 0.5, rand=lambda: 1.0) for n in range(1, 8)]
    assert top == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.5, 0.5, 0.5])
    bottom = [backoff_delay(n, 0.05, 0.5, rand=lambda: 0.0) for n in range(1, 8)]
    assert bottom == pytest.approx([t / 2 for t in top])


# ----------------------------------------------------------------------------- the worker


def run(main: Callable[[], Awaitable[T]]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(main(), 30)

    return asyncio.run(bounded())


async def until(predicate: Callable[[], bool], what: str) -> None:
    for _ in range(int(WAIT / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def all_rows(db: sqlite3.Connection) -> list[dict[str, Any]]:
    cursor = db.execute("SELECT * FROM webhook_outbox ORDER BY id")
    names = [c[0] for c in cursor.description]
    return [dict(zip(names, r, strict=True)) for r in cursor.fetchall()]


LIFECYCLE = [("launch", "a1"), ("launch", "a2"), ("pause", "a1"), ("pause", "a2"),
             ("resume", "a1"), ("kill", "a1"), ("kill", "a2"), ("reactivate", "a1"),
             ("tripwire", None), ("reactivate", "a2"), ("launch", "a1"), ("exit", "a1")]


def append_lifecycle(audit: AuditLog) -> None:
    for verb, agent in LIFECYCLE:
        audit.append(actor="alice(uid=1000)", verb=verb, target=agent,
                     scope=f"agent:{agent}" if agent else "global", reason=f"{verb} it")


def test_worker_delivers_every_event_once_in_order_through_failures_and_a_restart(
        tmp_path: Path) -> None:
    path = tmp_path / "state.db"

    async def main() -> None:
        receiver = Receiver(SECRET, fail_first=5)
        await receiver.start()
        try:
            # First instance: the receiver refuses the first deliveries, then takes them.
            db = sqlite3.connect(path)
            audit = AuditLog(db)
            outbox = Outbox(db, [endpoint(receiver.url)], host="h")
            outbox.attach(audit)
            worker = DeliveryWorker(outbox, FAST, audit)
            worker.start()
            append_lifecycle(audit)
            await until(lambda: outbox.backlog() == 0, "the outbox to drain")
            await worker.stop()
            first = len(all_rows(db))
            assert first == len(LIFECYCLE)
            assert all(r["attempts"] >= 1 and r["delivered_at"] for r in all_rows(db))
            assert max(r["attempts"] for r in all_rows(db)) > 1

            # Events written while no worker runs (the daemon was down) go out after a restart.
            append_lifecycle(audit)
            db.close()
            db = sqlite3.connect(path)
            audit = AuditLog(db)
            outbox = Outbox(db, [endpoint(receiver.url)], host="h")
            outbox.attach(audit)
            assert outbox.backlog() == len(LIFECYCLE)
            worker = DeliveryWorker(outbox, FAST, audit)
            worker.start()
            await until(lambda: outbox.backlog() == 0, "the backlog to drain after a restart")
            await worker.stop()
            check_deliveries(all_rows(db), receiver.received)
            assert len(receiver.accepted()) == 2 * len(LIFECYCLE)
            assert sum(r.status == 503 for r in receiver.received) == 5
            assert audit.verify().ok
            db.close()
        finally:
            await receiver.stop()

    run(main)


def test_worker_gives_up_after_max_attempts_audits_it_and_moves_on(tmp_path: Path) -> None:
    async def main() -> None:
        receiver = Receiver(SECRET, fail_first=2)
        await receiver.start()
        db = sqlite3.connect(tmp_path / "state.db")
        try:
            audit = AuditLog(db)
            outbox = Outbox(db, [endpoint(receiver.url)], host="h")
            outbox.attach(audit)
            worker = DeliveryWorker(outbox, FAST.model_copy(update={"max_attempts": 2}), audit)
            worker.start()
            audit.append(actor="alice", verb="pause", scope="agent:a1", target="a1")
            audit.append(actor="alice", verb="resume", scope="agent:a1", target="a1")
            await until(lambda: outbox.backlog() == 0, "the outbox to drain")
            await worker.stop()
            rows = all_rows(db)
            assert len(rows) == 2  # the webhook_given_up audit row made no event
            assert rows[0]["given_up_at"] is not None and rows[0]["attempts"] == 2
            assert rows[0]["last_error"].startswith("HTTP 503")
            assert rows[1]["delivered_at"] is not None
            given_up = [e for e in audit.list() if e.verb == "webhook_given_up"]
            assert len(given_up) == 1
            assert given_up[0].detail["event_id"] == rows[0]["event_id"]
            assert outbox.counts() == {"pending": 0, "delivered": 1, "given_up": 1}
        finally:
            db.close()
            await receiver.stop()

    run(main)


def test_worker_stops_promptly_when_the_endpoint_is_down_and_keeps_the_rows(
        tmp_path: Path) -> None:
    async def main() -> None:
        receiver = Receiver(SECRET)
        await receiver.start()
        url = receiver.url
        await receiver.stop()  # nothing listens on the port any more
        db = sqlite3.connect(tmp_path / "state.db")
        try:
            audit = AuditLog(db)
            outbox = Outbox(db, [endpoint(url)], host="h")
            outbox.attach(audit)
            worker = DeliveryWorker(outbox, FAST, audit)
            worker.start()
            audit.append(actor="alice", verb="kill", scope="agent:a1", target="a1")
            await until(lambda: all_rows(db)[0]["attempts"] >= 2, "a few failed attempts")
            loop = asyncio.get_running_loop()
            started = loop.time()
            await worker.stop(flush=0.3)
            assert loop.time() - started < 2.0
            [row] = all_rows(db)
            assert row["delivered_at"] is None and row["given_up_at"] is None
            assert "Connect" in row["last_error"] or "refused" in row["last_error"]
            assert outbox.backlog() == 1
        finally:
            db.close()

    run(main)


def test_rows_for_an_endpoint_no_longer_configured_wait_and_are_not_backlog(
        db: sqlite3.Connection, caplog: pytest.LogCaptureFixture) -> None:
    audit = AuditLog(db)
    Outbox(db, [endpoint("http://old.example/x")], host="h").attach(audit)
    audit.append(actor="alice", verb="pause", scope="agent:a1", target="a1")
    fresh = Outbox(db, [endpoint("http://new.example/")], host="h")
    assert fresh.backlog() == 0 and fresh.heads() == []
    assert "1 undelivered webhook events for http://old.example/…" in caplog.text
    [row] = all_rows(db)
    assert row["endpoint"] == "http://old.example/x" and row["delivered_at"] is None
