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

from supervisor.events.endpoints import Endpoint, load_endpoints, redact
from supervisor.events.mapping import EVENT_TYPES, Event, event_from_audit, event_type_of
from supervisor.events.outbox import Outbox, OutboxRow
from supervisor.events.render import render, slack_message, summary
from supervisor.events.signing import (
    HEADER_EVENT,
    HEADER_ID,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    sign,
)
from supervisor.events.worker import WEBHOOK_ACTOR, DeliveryWorker, backoff_delay

__all__ = [
    "EVENT_TYPES", "HEADER_EVENT", "HEADER_ID", "HEADER_SIGNATURE", "HEADER_TIMESTAMP",
    "WEBHOOK_ACTOR", "DeliveryWorker", "Endpoint", "Event", "Outbox", "OutboxRow",
    "backoff_delay", "event_from_audit", "event_type_of", "load_endpoints", "redact", "render",
    "sign", "slack_message", "summary",
]
