"""Webhooks: audit entries become events, events wait in a persistent outbox in the daemon's
SQLite file, and a background worker POSTs them to the configured endpoints. Control-plane
layer; needs the database file and, at startup, the endpoints' secret files (root, 0600).

Guarantees (docs/webhooks.md has the receiver's side):

- An event exists iff its audit row exists: the outbox rows are written by an audit subscriber,
  inside the audit row's own SQLite transaction.
- At least once: a row leaves the outbox only when an endpoint answered 2xx; connection errors,
  timeouts and any other status are retried with exponential backoff, across daemon restarts.
  The event id is fixed when the row is written, so a receiver dedupes by
  `X-Agent-Supervisor-Id`.
- In order per agent and endpoint: event N+1 of an agent is not sent to an endpoint before that
  endpoint acknowledged event N (head-of-line per (endpoint, agent)); different agents, and
  events with no agent, are independent queues.
- Never on the kill path: the subscriber only inserts rows; every network byte is the worker's.

Signature: `X-Agent-Supervisor-Signature: sha256=<hex>` where hex is
HMAC-SHA256(secret, f"{X-Agent-Supervisor-Timestamp}." + raw body), the timestamp being unix
seconds of the attempt (a retry is signed afresh; the body and the id never change)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import json
import logging
import os
import random
import socket
import sqlite3
import stat
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
from pydantic import BaseModel, ConfigDict

from supervisor import __version__
from supervisor.audit import AuditLog
from supervisor.config import WebhookDelivery, WebhookEndpoint
from supervisor.errors import ConfigInvalid
from supervisor.models import AuditEntry

log = logging.getLogger(__name__)

EVENT_TYPES = (
    "agent.launched",
    "agent.paused",
    "agent.resumed",
    "agent.killed",
    "agent.reactivated",
    "agent.exited",
    "tripwire.fired",
    "drill.completed",
    "approval.requested",
    "approval.granted",
    "approval.denied",
    "mcp.call",
    "breaker.reset",
    "audit.checkpoint",
    "audit.verified",
    "audit.alarm",
)

# Audit verb -> event type. An allow-list: every other verb (daemon_start, global_halt,
# webhook_given_up, ...) produces no event, so the worker's own audit rows cannot loop.
_VERB_EVENTS = {
    "launch": "agent.launched",
    "pause": "agent.paused",
    "resume": "agent.resumed",
    "kill": "agent.killed",
    # An unconfirmed kill is retried in the background; this is the kernel's confirmation.
    "kill_confirmed": "agent.killed",
    "reap": "agent.killed",
    "reactivate": "agent.reactivated",
    "exit": "agent.exited",
    "stop": "agent.exited",
    "shutdown": "agent.exited",
    "tripwire": "tripwire.fired",
    "drill": "drill.completed",
    "approval_requested": "approval.requested",
    "approval_granted": "approval.granted",
    "approval_denied": "approval.denied",
    "breaker_reset": "breaker.reset",
    "mcp_call": "mcp.call",  # every MCP decision (supervisor/mcp/gateway.py)
    # Audit anchors leave the host (supervisor/audit/anchor.py); alarms say when writes fail.
    "audit_checkpoint": "audit.checkpoint",
    "audit_verify": "audit.verified",
    "audit_write_failed": "audit.alarm",
    "audit_overflow": "audit.alarm",
}
# The agent's command line may carry tokens; it stays in the audit log, not in a chat channel.
_PRIVATE_DETAIL = frozenset({"command", "env"})

HEADER_EVENT = "X-Agent-Supervisor-Event"
HEADER_ID = "X-Agent-Supervisor-Id"
HEADER_TIMESTAMP = "X-Agent-Supervisor-Timestamp"
HEADER_SIGNATURE = "X-Agent-Supervisor-Signature"

WEBHOOK_ACTOR = "system:webhooks"
FLUSH_AT_SHUTDOWN = 2.0  # seconds the worker keeps delivering after the agents are dead
MAX_IN_FLIGHT = 16  # concurrent POSTs over all queues
DELIVERED_RETENTION = 7 * 86400.0  # delivered rows are pruned after a week
_PRUNE_EVERY = 3600.0
_ERROR_SNIPPET = 200


# ----------------------------------------------------------------------------- events


class Event(BaseModel):
    """The JSON body of a `format = "json"` delivery."""

    model_config = ConfigDict(frozen=True)

    id: str
    type: str
    timestamp: str  # RFC 3339, UTC, of the audit row
    ts: float  # the same instant in unix seconds
    host: str
    actor: str
    reason: str
    scope: str
    agent: str | None
    run: str | None
    previous_state: str | None
    new_state: str | None
    time_to_halt_ms: float | None
    verb: str  # the audit verb behind the event (kill, reap, shutdown, ...)
    outcome: str
    audit_seq: int
    detail: dict[str, Any]


def event_type_of(entry: AuditEntry) -> str | None:
    """The event an audit entry stands for, or None (refusals, failures, housekeeping)."""
    if entry.outcome.startswith("refused:"):
        return None
    kind = _VERB_EVENTS.get(entry.verb)
    if kind is None:
        return None
    if entry.verb == "launch" and entry.outcome != "ok":
        return None  # failed or overtaken by a kill: the agent never ran
    if entry.verb == "reap" and not entry.scope.startswith("agent:"):
        return None  # a leftover container; the agent's own reap row carries the event
    return kind


def event_from_audit(entry: AuditEntry, host: str, event_id: str | None = None) -> Event | None:
    kind = event_type_of(entry)
    if kind is None:
        return None
    run = entry.detail.get("run")
    return Event(
        id=event_id or uuid.uuid4().hex, type=kind,
        timestamp=datetime.fromtimestamp(entry.ts, UTC).isoformat(timespec="milliseconds")
        .replace("+00:00", "Z"),
        ts=entry.ts, host=host, actor=entry.actor, reason=entry.reason, scope=entry.scope,
        agent=entry.target, run=run if isinstance(run, str) else None,
        previous_state=entry.previous_state, new_state=entry.new_state,
        time_to_halt_ms=entry.time_to_halt_ms, verb=entry.verb, outcome=entry.outcome,
        audit_seq=entry.seq,
        detail={k: v for k, v in entry.detail.items() if k not in _PRIVATE_DETAIL},
    )


_SLACK_BADGE = {
    "agent.launched": ":large_green_circle:",
    "agent.paused": ":large_yellow_circle:",
    "agent.resumed": ":large_green_circle:",
    "agent.killed": ":red_circle:",
    "agent.reactivated": ":large_blue_circle:",
    "agent.exited": ":white_circle:",
    "tripwire.fired": ":rotating_light:",
    "drill.completed": ":fire_engine:",
    "approval.requested": ":raised_hand:",
}


def _mrkdwn(text: str) -> str:
    """Slack's three control characters; everything else is literal."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# How the summary line says what happened, by audit verb (default: the event type's verb).
_PHRASE = {"stop": "stopped", "shutdown": "stopped", "kill_confirmed": "kill confirmed"}


def summary(event: Event) -> str:
    """One readable line, e.g. ":red_circle: agent `x` killed by alice(uid=1000) (runaway)
    in 12.3 ms on host1"."""
    subject = f"agent `{_mrkdwn(event.agent)}`" if event.agent else _mrkdwn(event.scope)
    if event.type.startswith("agent."):
        line = f"{subject} {_PHRASE.get(event.verb, event.type.partition('.')[2])}"
    else:
        line = f"{event.type.replace('.', ' ')}: {subject}"
    if event.verb == "exit":
        code = event.detail.get("exit_code")
        line += f" with status {code}" if code is not None else ""
    else:
        line += f" by {_mrkdwn(event.actor)}"
    if event.reason:
        line += f" ({_mrkdwn(event.reason)})"
    if event.time_to_halt_ms is not None:
        line += f" in {event.time_to_halt_ms:.1f} ms"
    if event.outcome != "ok":
        line += f" [{_mrkdwn(event.outcome)}]"
    return f"{_SLACK_BADGE.get(event.type, ':grey_question:')} {line} on {_mrkdwn(event.host)}"


def slack_message(event: Event) -> dict[str, Any]:
    """A Slack incoming-webhook message: `text` for notifications, `blocks` for the channel."""
    text = summary(event)
    facts = [f"`{event.type}`", f"id `{event.id}`", f"audit #{event.audit_seq}"]
    if event.run:
        facts.append(f"run `{event.run}`")
    if event.previous_state or event.new_state:
        facts.append(f"{event.previous_state or '?'} → {event.new_state or '?'}")
    return {
        "text": text,
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": text}},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": " · ".join(facts)}]},
        ],
    }


def render(event: Event, fmt: Literal["json", "slack"]) -> bytes:
    if fmt == "slack":
        return json.dumps(slack_message(event), ensure_ascii=False).encode()
    return event.model_dump_json().encode()


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The X-Agent-Supervisor-Signature value for one attempt."""
    digest = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def backoff_delay(attempts: int, initial: float, maximum: float,
                  rand: Callable[[], float] = random.random) -> float:
    """Seconds before the next try after `attempts` failed ones: initial * 2^(attempts-1),
    capped at maximum, then jittered down by up to half so queues that failed together do not
    retry together."""
    base = min(maximum, initial * 2.0 ** max(0, attempts - 1))
    return base * (0.5 + 0.5 * rand())


# ----------------------------------------------------------------------------- endpoints


@dataclass(frozen=True)
class Endpoint:
    """A configured endpoint with its secret loaded."""

    index: int
    url: str
    secret: bytes
    format: Literal["json", "slack"]
    events: tuple[str, ...]

    @property
    def name(self) -> str:
        """For logs and listings: the URL without its path, which for Slack is the secret."""
        return f"webhooks[{self.index}] {redact(self.url)}"

    def wants(self, event_type: str) -> bool:
        if not self.events:
            return True
        return any(event_type == pattern or (pattern.endswith(".*") and
                                             event_type.startswith(pattern[:-1]))
                   for pattern in self.events)


def redact(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    rest = "/…" if (parts.path not in ("", "/") or parts.query) else ""
    return f"{parts.scheme}://{host}{rest}"


def load_endpoints(endpoints: Iterable[WebhookEndpoint],
                   environ: Mapping[str, str] | None = None) -> list[Endpoint]:
    """Every configured endpoint with its secret; ConfigInvalid naming the endpoint when a secret
    is missing, empty or readable by others, when an event filter names no event, or when a URL
    is configured twice. Fails closed: an unsigned endpoint is a configuration error."""
    env = os.environ if environ is None else environ
    loaded: list[Endpoint] = []
    seen: set[str] = set()
    for index, endpoint in enumerate(endpoints):
        where = f"webhooks[{index}] ({redact(endpoint.url)})"
        if endpoint.url in seen:
            raise ConfigInvalid(f"{where}: the same URL is configured twice",
                                key=f"webhooks.{index}.url", reason="duplicate")
        seen.add(endpoint.url)
        for pattern in endpoint.events:
            if not _pattern_matches_any(pattern):
                raise ConfigInvalid(
                    f"{where}: events: {pattern!r} is no event type; known: "
                    f"{', '.join(EVENT_TYPES)} (or a prefix such as 'agent.*')",
                    key=f"webhooks.{index}.events", reason="unknown event type")
        loaded.append(Endpoint(index=index, url=endpoint.url,
                               secret=_secret(endpoint, index, where, env),
                               format=endpoint.format, events=tuple(endpoint.events)))
    return loaded


def _pattern_matches_any(pattern: str) -> bool:
    if pattern.endswith(".*"):
        return any(t.startswith(pattern[:-1]) for t in EVENT_TYPES)
    return pattern in EVENT_TYPES


def _secret(endpoint: WebhookEndpoint, index: int, where: str, env: Mapping[str, str]
            ) -> bytes:
    if endpoint.secret_file is not None and endpoint.secret_env is not None:
        raise ConfigInvalid(f"{where}: give secret_file or secret_env, not both",
                            key=f"webhooks.{index}", reason="two secrets")
    if endpoint.secret_file is not None:
        text = _read_secret_file(endpoint.secret_file, index, where)
        origin = str(endpoint.secret_file)
    elif endpoint.secret_env is not None:
        if endpoint.secret_env not in env:
            raise ConfigInvalid(
                f"{where}: secret_env {endpoint.secret_env!r} is not set in the daemon's "
                f"environment", key=f"webhooks.{index}.secret_env", reason="not set")
        text = env[endpoint.secret_env]
        origin = f"${endpoint.secret_env}"
    else:
        raise ConfigInvalid(
            f"{where}: no secret; every endpoint needs secret_file (root-owned, mode 0600) or "
            f"secret_env so receivers can verify what they get",
            key=f"webhooks.{index}", reason="no secret")
    secret = text.strip()
    if not secret:
        raise ConfigInvalid(f"{where}: the secret in {origin} is empty",
                            key=f"webhooks.{index}", reason="empty secret")
    return secret.encode()


def _read_secret_file(path: Path, index: int, where: str) -> str:
    key = f"webhooks.{index}.secret_file"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigInvalid(f"{where}: cannot read secret_file {path}: {exc.strerror}",
                            key=key, path=str(path), reason=exc.strerror or "unreadable"
                            ) from exc
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ConfigInvalid(f"{where}: secret_file {path} is not a regular file",
                                key=key, path=str(path), reason="not a regular file")
        if info.st_mode & 0o077:
            raise ConfigInvalid(
                f"{where}: secret_file {path} is accessible by group or others (mode "
                f"{stat.S_IMODE(info.st_mode):04o}); chmod 600 it",
                key=key, path=str(path), reason="group or world accessible")
        if info.st_uid != os.geteuid():
            raise ConfigInvalid(
                f"{where}: secret_file {path} is owned by uid {info.st_uid}, not by the "
                f"daemon's uid {os.geteuid()}", key=key, path=str(path), reason="wrong owner")
        data = handle.read()
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        raise ConfigInvalid(f"{where}: secret_file {path} is not UTF-8", key=key,
                            path=str(path), reason="not UTF-8") from exc


# ----------------------------------------------------------------------------- the outbox

SCHEMA = """
CREATE TABLE IF NOT EXISTS webhook_outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    agent TEXT,
    audit_seq INTEGER NOT NULL,
    payload BLOB NOT NULL,
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    delivered_at REAL,
    given_up_at REAL,
    last_status INTEGER,
    last_error TEXT,
    UNIQUE (event_id, endpoint)
);
CREATE INDEX IF NOT EXISTS webhook_outbox_pending ON webhook_outbox (endpoint, agent, id)
    WHERE delivered_at IS NULL AND given_up_at IS NULL;
"""

_PENDING = "delivered_at IS NULL AND given_up_at IS NULL"


@dataclass(frozen=True)
class OutboxRow:
    id: int
    event_id: str
    event_type: str
    endpoint: str
    agent: str | None
    payload: bytes
    attempts: int
    next_attempt_at: float


@dataclass(frozen=True)
class Delivery:
    """One (event, endpoint) pair as `GET /v1/webhooks` would show it."""

    event_id: str
    event_type: str
    agent: str | None
    audit_seq: int
    endpoint: str  # redacted
    status: Literal["pending", "delivered", "given_up"]
    attempts: int
    created_at: float
    next_attempt_at: float | None
    delivered_at: float | None
    given_up_at: float | None
    last_status: int | None
    last_error: str | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Outbox:
    """The webhook_outbox table and the audit subscriber that fills it."""

    def __init__(self, db: sqlite3.Connection, endpoints: list[Endpoint],
                 host: str | None = None) -> None:
        self.db = db
        self.endpoints = {e.url: e for e in endpoints}
        self.host = host or socket.gethostname()
        self.wake = asyncio.Event()
        db.executescript(SCHEMA)
        self._warn_about_orphans()

    def attach(self, audit: AuditLog) -> None:
        # Rows are written by the audit writer's thread, in the audit row's transaction; the
        # worker is woken on the loop once they are committed.
        audit.subscribe(self.record, in_transaction=True)
        audit.subscribe(lambda _db, _entry: self.wake.set())

    def record(self, db: sqlite3.Connection, entry: AuditEntry) -> None:
        """The audit subscriber: runs inside the audit row's transaction, so it only inserts."""
        if not self.endpoints:
            return
        event = event_from_audit(entry, self.host)
        if event is None:
            return
        now = time.time()
        rows = [(event.id, event.type, e.url, event.agent, event.audit_seq,
                 render(event, e.format), now, now)
                for e in self.endpoints.values() if e.wants(event.type)]
        if not rows:
            return
        db.executemany(
            "INSERT INTO webhook_outbox (event_id, event_type, endpoint, agent, audit_seq, "
            "payload, created_at, next_attempt_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        with contextlib.suppress(RuntimeError):  # no loop: the worker's first scan finds it
            # call_soon, not set(): the worker runs only after this transaction has committed.
            asyncio.get_running_loop().call_soon(self.wake.set)

    def _configured(self) -> tuple[str, list[str]]:
        urls = list(self.endpoints)
        return f"endpoint IN ({', '.join('?' for _ in urls)})", urls

    def backlog(self) -> int:
        """Events not yet delivered (and not given up) to the endpoints configured now."""
        if not self.endpoints:
            return 0
        where, urls = self._configured()
        return int(self.db.execute(
            f"SELECT COUNT(*) FROM webhook_outbox WHERE {_PENDING} AND {where}", urls
        ).fetchone()[0])

    def counts(self) -> dict[str, int]:
        """pending / delivered / given_up rows over every endpoint ever configured."""
        pending, delivered, given_up = self.db.execute(
            "SELECT COALESCE(SUM(delivered_at IS NULL AND given_up_at IS NULL), 0), "
            "COALESCE(SUM(delivered_at IS NOT NULL), 0), COALESCE(SUM(given_up_at IS NOT NULL), 0)"
            " FROM webhook_outbox").fetchone()
        return {"pending": int(pending), "delivered": int(delivered), "given_up": int(given_up)}

    def deliveries(self, limit: int = 50, pending_only: bool = False) -> list[Delivery]:
        """The most recent (event, endpoint) pairs, newest first."""
        where = f"WHERE {_PENDING}" if pending_only else ""
        rows = self.db.execute(
            "SELECT event_id, event_type, agent, audit_seq, endpoint, attempts, created_at, "
            "next_attempt_at, delivered_at, given_up_at, last_status, last_error "
            f"FROM webhook_outbox {where} ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        out = []
        for (event_id, event_type, agent, seq, url, attempts, created, next_at, delivered,
             given_up, last_status, last_error) in rows:
            endpoint = self.endpoints.get(url)
            status: Literal["pending", "delivered", "given_up"] = (
                "delivered" if delivered is not None else
                "given_up" if given_up is not None else "pending")
            out.append(Delivery(
                event_id=event_id, event_type=event_type, agent=agent, audit_seq=seq,
                endpoint=endpoint.name if endpoint else f"(removed) {redact(url)}",
                status=status, attempts=attempts, created_at=created,
                next_attempt_at=next_at if status == "pending" else None,
                delivered_at=delivered, given_up_at=given_up, last_status=last_status,
                last_error=last_error))
        return out

    def heads(self) -> list[OutboxRow]:
        """The oldest pending row of each (endpoint, agent) queue: the only one that may go."""
        if not self.endpoints:
            return []
        where, urls = self._configured()
        # SQLite returns the row holding MIN(id) for the bare columns of an aggregate query.
        rows = self.db.execute(
            "SELECT MIN(id), event_id, event_type, endpoint, agent, payload, attempts, "
            f"next_attempt_at FROM webhook_outbox WHERE {_PENDING} AND {where} "
            "GROUP BY endpoint, agent", urls).fetchall()
        return [OutboxRow(id=r[0], event_id=r[1], event_type=r[2], endpoint=r[3], agent=r[4],
                          payload=bytes(r[5]), attempts=r[6], next_attempt_at=r[7])
                for r in rows]

    def mark_delivered(self, row_id: int, status: int) -> None:
        with self.db:
            self.db.execute(
                "UPDATE webhook_outbox SET delivered_at = ?, attempts = attempts + 1, "
                "last_status = ?, last_error = NULL WHERE id = ?", (time.time(), status, row_id))

    def mark_failed(self, row_id: int, status: int | None, error: str, retry_at: float) -> None:
        """One more failed attempt; the next one not before `retry_at`."""
        with self.db:
            self._count_failure(row_id, status, error, retry_at, given_up=False)

    def give_up(self, row_id: int, status: int | None, error: str,
                audit_it: Callable[[], object]) -> None:
        """The last failed attempt. `audit_it` appends the audit row that says so; AuditLog's
        transaction commits this update with it, or rolls both back: a row is given up iff the
        audit log says so."""
        self._count_failure(row_id, status, error, time.time(), given_up=True)
        try:
            audit_it()
        except BaseException:
            self.db.rollback()
            raise

    def _count_failure(self, row_id: int, status: int | None, error: str, retry_at: float,
                       given_up: bool) -> None:
        self.db.execute(
            "UPDATE webhook_outbox SET attempts = attempts + 1, last_status = ?, "
            "last_error = ?, next_attempt_at = ?, given_up_at = ? WHERE id = ?",
            (status, error, retry_at, time.time() if given_up else None, row_id))

    def prune(self, older_than: float = DELIVERED_RETENTION) -> int:
        with self.db:
            return self.db.execute(
                "DELETE FROM webhook_outbox WHERE delivered_at IS NOT NULL AND delivered_at < ?",
                (time.time() - older_than,)).rowcount

    def _warn_about_orphans(self) -> None:
        rows = self.db.execute(
            f"SELECT endpoint, COUNT(*) FROM webhook_outbox WHERE {_PENDING} GROUP BY endpoint"
        ).fetchall()
        for url, count in rows:
            if url not in self.endpoints:
                log.warning("%d undelivered webhook events for %s, which is no longer "
                            "configured; they stay in the outbox until it is again",
                            count, redact(url))


# ----------------------------------------------------------------------------- the worker


class DeliveryWorker:
    """Background task that drains the outbox. Started once the daemon serves, stopped after
    the arbiter's shutdown so the final events are in the outbox; what it cannot deliver within
    FLUSH_AT_SHUTDOWN stays for the next start."""

    def __init__(self, outbox: Outbox, delivery: WebhookDelivery, audit: AuditLog) -> None:
        self.outbox = outbox
        self.delivery = delivery
        self.audit = audit
        self._task: asyncio.Task[None] | None = None
        self._in_flight: dict[tuple[str, str | None], asyncio.Task[None]] = {}
        self._stop_at: float | None = None
        self._failing: set[str] = set()
        self._last_prune = 0.0

    def start(self) -> None:
        if self._task is None and self.outbox.endpoints:
            self._task = asyncio.get_running_loop().create_task(self._run(),
                                                                name="webhook-delivery")

    async def stop(self, flush: float = FLUSH_AT_SHUTDOWN) -> None:
        """Deliver what is due for up to `flush` seconds, then cancel what is still in flight
        (those rows stay pending and are sent again after the next start)."""
        if self._task is None:
            return
        self._stop_at = time.monotonic() + flush
        self.outbox.wake.set()
        try:
            await asyncio.wait_for(self._task, flush + self.delivery.timeout + 1.0)
        except TimeoutError:
            log.error("the webhook worker did not stop in time; cancelled")
        except Exception:
            log.exception("the webhook worker failed")
        self._task = None

    async def _run(self) -> None:
        headers = {"User-Agent": f"agent-supervisor/{__version__}"}
        async with aiohttp.ClientSession(headers=headers) as session:
            try:
                while True:
                    try:
                        delay = self._dispatch(session)
                    except Exception:
                        # The worker must outlive a bad moment (a locked or full database):
                        # the rows are safe on disk and the next pass picks them up.
                        log.exception("webhook delivery pass failed; retrying")
                        delay = self.delivery.backoff_max
                    if self._stop_at is not None:
                        left = self._stop_at - time.monotonic()
                        if left <= 0 or (not self._in_flight and (delay is None or delay > left)):
                            break
                        delay = left if delay is None else min(delay, left)
                    self.outbox.wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.outbox.wake.wait(), delay)
            finally:
                tasks = list(self._in_flight.values())
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                self._in_flight.clear()

    def _dispatch(self, session: aiohttp.ClientSession) -> float | None:
        """Start a POST for every due queue head; seconds until the next head is due."""
        now = time.time()
        if now - self._last_prune > _PRUNE_EVERY:
            self._last_prune = now
            if pruned := self.outbox.prune():
                log.info("pruned %d delivered webhook rows older than a week", pruned)
        next_due: float | None = None
        for head in sorted(self.outbox.heads(), key=lambda h: h.id):
            key = (head.endpoint, head.agent)
            if key in self._in_flight:
                continue
            if head.next_attempt_at > now:
                wait = head.next_attempt_at - now
                next_due = wait if next_due is None else min(next_due, wait)
                continue
            if len(self._in_flight) >= MAX_IN_FLIGHT:
                break  # a finishing POST wakes the loop
            task = asyncio.get_running_loop().create_task(self._deliver(session, head))
            self._in_flight[key] = task
            task.add_done_callback(functools.partial(self._done, key))
        return next_due

    def _done(self, key: tuple[str, str | None], task: asyncio.Task[None]) -> None:
        self._in_flight.pop(key, None)
        self.outbox.wake.set()
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("webhook delivery failed unexpectedly", exc_info=exc)

    async def _deliver(self, session: aiohttp.ClientSession, row: OutboxRow) -> None:
        endpoint = self.outbox.endpoints[row.endpoint]
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            HEADER_EVENT: row.event_type,
            HEADER_ID: row.event_id,
            HEADER_TIMESTAMP: str(timestamp),
            HEADER_SIGNATURE: sign(endpoint.secret, timestamp, row.payload),
        }
        try:
            async with session.post(
                endpoint.url, data=row.payload, headers=headers, allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=self.delivery.timeout),
            ) as response:
                status: int | None = response.status
                retry_after = response.headers.get("Retry-After")
                snippet = await response.content.read(_ERROR_SNIPPET)
        except TimeoutError:
            status, retry_after = None, None
            error = f"no answer within {self.delivery.timeout:g}s"
        except (aiohttp.ClientError, OSError) as exc:
            status, retry_after = None, None
            error = str(exc) or type(exc).__name__
        else:
            if status is not None and 200 <= status < 300:
                self.outbox.mark_delivered(row.id, status)
                if endpoint.url in self._failing:
                    self._failing.discard(endpoint.url)
                    log.info("webhook %s delivers again", endpoint.name)
                return
            error = f"HTTP {status}: {snippet.decode(errors='replace').strip()}"
        self._failed(endpoint, row, status, error, retry_after)

    def _failed(self, endpoint: Endpoint, row: OutboxRow, status: int | None, error: str,
                retry_after: str | None) -> None:
        attempts = row.attempts + 1
        limit = self.delivery.max_attempts
        if endpoint.url not in self._failing:
            self._failing.add(endpoint.url)
            log.warning("webhook %s failed (%s); retrying with backoff", endpoint.name, error)
        if limit and attempts >= limit:
            log.error("webhook %s: gave up on event %s (%s) after %d attempts: %s",
                      endpoint.name, row.event_id, row.event_type, attempts, error)
            self.outbox.give_up(row.id, status, error, lambda: self.audit.append(
                actor=WEBHOOK_ACTOR, verb="webhook_given_up", scope="global",
                reason=f"{attempts} failed attempts", outcome="given_up",
                detail={"event_id": row.event_id, "event_type": row.event_type,
                        "agent": row.agent, "endpoint": endpoint.name, "attempts": attempts,
                        "last_error": error}))
            return
        delay = backoff_delay(attempts, self.delivery.backoff_initial, self.delivery.backoff_max)
        if retry_after is not None and retry_after.strip().isdigit():
            delay = max(delay, min(float(retry_after), self.delivery.backoff_max))
        self.outbox.mark_failed(row.id, status, error, time.time() + delay)
