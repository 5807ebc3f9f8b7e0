"""Audit anchors in the fleet store: each host's signed audit heads (supervisor/audit/anchor.py
checkpoints) under hosts/<host>/anchors/<seq>, and the checks that hold them and a host's chain
against each other. No I/O beyond what the caller passes in; no privilege.

What it proves: an anchor says "row N of host H's audit chain had hash X", signed by H's audit
key, written once. Rows deleted or rewritten on H after the anchor was published no longer
match it; a rewritten anchor shows in etcd's per-key version; a replaced key shows as a
different key on later anchors than on earlier ones (or than the one the operator pinned)."""

from __future__ import annotations

import base64
import json
import sqlite3
from dataclasses import dataclass, field
from typing import Any

from supervisor.audit.anchor import Checkpoint
from supervisor.fleet.etcd import KeyValue


@dataclass
class AnchorCheck:
    host: str
    anchors: list[Checkpoint] = field(default_factory=list)
    public_key: str | None = None
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        newest = self.anchors[-1] if self.anchors else None
        return {"host": self.host, "anchors": len(self.anchors),
                "newest_seq": newest.seq if newest else None, "public_key": self.public_key,
                "ok": not self.problems, "problems": self.problems}


def check_anchors(host: str, kvs: list[KeyValue], pinned: str | None = None) -> AnchorCheck:
    """Signatures, one key throughout (the pinned one if given), no anchor written twice,
    sequence numbers matching their keys."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    check = AnchorCheck(host=host, public_key=pinned)
    for kv in sorted(kvs, key=lambda kv: kv.key):
        try:
            body = json.loads(kv.value)
            checkpoint = Checkpoint.from_dict(body)
            raw = base64.b64decode(body["public_key"])
            key = Ed25519PublicKey.from_public_bytes(raw)
        except (ValueError, KeyError, TypeError) as exc:
            check.problems.append(f"{kv.key}: unreadable anchor ({exc})")
            continue
        encoded = base64.b64encode(raw).decode()
        if check.public_key is None:
            check.public_key = encoded
        elif encoded != check.public_key:
            check.problems.append(f"anchor of row {checkpoint.seq} is signed by another key "
                                 f"({checkpoint.key_id}): the host's audit key was replaced")
        if not checkpoint.signed_by(key):
            check.problems.append(f"anchor of row {checkpoint.seq}: bad signature")
        if kv.version > 1:
            check.problems.append(f"anchor of row {checkpoint.seq} was rewritten "
                                  f"({kv.version} writes)")
        if not kv.key.endswith(f"{checkpoint.seq:020d}"):
            check.problems.append(f"{kv.key} holds the anchor of row {checkpoint.seq}")
        check.anchors.append(checkpoint)
    return check


def chain_against_anchors(db_path: str, anchors: list[Checkpoint]) -> list[str]:
    """Each anchored row still in the host's chain with the anchored hash (read-only)."""
    problems: list[str] = []
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        for anchor in anchors:
            row = db.execute("SELECT hash FROM audit WHERE seq = ?", (anchor.seq,)).fetchone()
            if row is None:
                problems.append(f"row {anchor.seq}, anchored in the fleet store, is gone")
            elif str(row[0]) != anchor.hash:
                problems.append(f"row {anchor.seq} was rewritten: its hash is no longer the "
                                f"one anchored in the fleet store")
    finally:
        db.close()
    return problems
