"""How a delivery is signed: the headers and HMAC-SHA256 over the timestamp and the raw body
(docs/webhooks.md has the receiver's side). No I/O, no privilege."""

from __future__ import annotations

import hashlib
import hmac

HEADER_EVENT = "X-Agent-Supervisor-Event"
HEADER_ID = "X-Agent-Supervisor-Id"
HEADER_TIMESTAMP = "X-Agent-Supervisor-Timestamp"
HEADER_SIGNATURE = "X-Agent-Supervisor-Signature"


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The X-Agent-Supervisor-Signature value for one attempt."""
    digest = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"
