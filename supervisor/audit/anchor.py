"""Anchors for the audit chain outside its database: checkpoints (seq, head hash, time) signed
with an Ed25519 key kept outside the state directory, written to a checkpoint file outside it,
to the journal and (as an audit row, hence a webhook event) off the host; and the verification
that holds a chain against them. Reads the key (root, 0600) when signing; verifying needs only
the public key, so `agentctl audit verify --state-dir` runs it offline.

What each anchor proves: a checkpoint says "row N had hash H at time T", signed. Deleting rows
up to N, or editing any row up to N and recomputing the hashes after it, no longer matches it.
Rows written after the newest checkpoint are covered only by the chain, which is why the
writer checkpoints after every kill-class row, every N rows, every T seconds and at shutdown.
Someone who holds root on the host can also rewrite the file and the key; the journal and the
webhook receivers keep copies such a person cannot reach."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import sqlite3
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from supervisor.audit.chain import (
    COLUMNS,
    GENESIS,
    Walk,
    hashed_fields,
    row_hash,
    walk,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

    from supervisor.models.views import AuditVerifyResult

# The journal line: one logger, one prefix, one JSON object (stderr reaches journald under
# systemd, and remote journal forwarding carries it off the host).
journal = logging.getLogger("agent-supervisor.audit")
JOURNAL_PREFIX = "AUDIT_CHECKPOINT "

CHECKPOINT_FILE_MAX_BYTES = 1 << 20  # past this the file keeps its newest KEEP lines
CHECKPOINT_FILE_KEEP = 1000


class KeyProblem(Exception):
    """The audit key cannot be used (unreadable, not Ed25519, readable by others)."""


@dataclass(frozen=True)
class Checkpoint:
    """A signed checkpoint of the audit chain: its head at `seq`, signed with the audit key."""
    seq: int
    hash: str
    ts: float
    key_id: str
    sig: str  # base64 Ed25519 signature of `message`

    @staticmethod
    def message(seq: int, head_hash: str, ts: float) -> bytes:
        body = {"v": 1, "seq": seq, "hash": head_hash, "ts": round(ts, 6)}
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    def as_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "hash": self.hash, "ts": self.ts, "key_id": self.key_id,
                "sig": self.sig}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Checkpoint:
        return cls(seq=int(data["seq"]), hash=str(data["hash"]), ts=float(data["ts"]),
                   key_id=str(data.get("key_id", "")), sig=str(data["sig"]))

    def signed_by(self, public_key: Ed25519PublicKey) -> bool:
        from cryptography.exceptions import InvalidSignature
        try:
            public_key.verify(base64.b64decode(self.sig),
                              self.message(self.seq, self.hash, self.ts))
        except (InvalidSignature, ValueError):
            return False
        return True


def key_id_of(public_key: Ed25519PublicKey) -> str:
    from cryptography.hazmat.primitives import serialization

    from supervisor.ci.report import key_id
    return key_id(public_key.public_bytes(serialization.Encoding.Raw,
                                          serialization.PublicFormat.Raw))


def public_path_of(key_path: Path) -> Path:
    return key_path.with_name(key_path.name + ".pub")


class Signer:
    """The host's audit key: created at first start (0600, owner root) with its public half
    beside it, refused when anyone but root could read or replace it."""

    def __init__(self, key: Ed25519PrivateKey, path: Path) -> None:
        self.key = key
        self.path = path
        self.public_key = key.public_key()
        self.key_id = key_id_of(self.public_key)

    @classmethod
    def load_or_create(cls, path: Path) -> Signer:
        from supervisor.ci.report import generate_key, load_private_key, write_key_pair
        from supervisor.errors import SigningKeyInvalid
        if not path.exists():
            path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            key = generate_key()
            public = public_path_of(path)
            with contextlib.suppress(FileNotFoundError):
                public.unlink()
            write_key_pair(key, path, public)
            journal.warning("created the audit key %s (public half %s, key id %s)", path,
                            public, key_id_of(key.public_key()))
            return cls(key, path)
        info = path.stat()
        # Owned by the daemon itself (root in production) and private to it.
        if info.st_uid != os.geteuid() or info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyProblem(f"the audit key {path} must be owned by uid {os.geteuid()} with "
                             f"mode 0600 (it is uid {info.st_uid}, mode "
                             f"{stat.S_IMODE(info.st_mode):o})")
        try:
            return cls(load_private_key(path), path)
        except SigningKeyInvalid as exc:
            raise KeyProblem(exc.message) from exc

    def sign(self, seq: int, head_hash: str, ts: float) -> Checkpoint:
        ts = round(ts, 6)
        signature = self.key.sign(Checkpoint.message(seq, head_hash, ts))
        return Checkpoint(seq=seq, hash=head_hash, ts=ts, key_id=self.key_id,
                          sig=base64.b64encode(signature).decode())


class CheckpointFile:
    """JSON lines, newest last, outside the state directory. Appended and fsynced before the
    checkpoint's own audit row is committed, so the file is never behind the database."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, checkpoint: Checkpoint) -> None:
        self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        line = json.dumps(checkpoint.as_dict(), sort_keys=True).encode() + b"\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        if size > CHECKPOINT_FILE_MAX_BYTES:
            self._trim()

    def _trim(self) -> None:
        keep = self.path.read_bytes().splitlines(keepends=True)[-CHECKPOINT_FILE_KEEP:]
        temp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "wb") as handle:
            handle.writelines(keep)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, self.path)

    def read(self) -> list[Checkpoint] | None:
        """Every readable line, oldest first; None when the file does not exist."""
        try:
            text = self.path.read_text(errors="replace")
        except FileNotFoundError:
            return None
        found = []
        for line in text.splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                found.append(Checkpoint.from_dict(json.loads(line)))
        return found


def emit_to_journal(checkpoint: Checkpoint, host: str) -> None:
    journal.info("%s%s", JOURNAL_PREFIX,
                 json.dumps({**checkpoint.as_dict(), "host": host}, sort_keys=True))


# ----------------------------------------------------------------------------- verification


def verify(db: sqlite3.Connection, public_key: Ed25519PublicKey | None,
           file_checkpoints: list[Checkpoint] | None, *, checkpoint_file: str = "",
           expect_file: bool = True, from_anchor: bool = False) -> AuditVerifyResult:
    """Hold the chain in `db` against its checkpoints: those recorded in the chain itself and
    every one of the checkpoint file (None: the file does not exist). `from_anchor` checks the
    newest file checkpoint's row and walks only the rows after it (the quick check at start);
    otherwise the whole chain is walked and every file checkpoint compared. Without a public
    key the signatures are not checked, and the result says so."""
    key_id = key_id_of(public_key) if public_key is not None else None
    notes: list[str] = []
    problems: list[tuple[int | None, str]] = []
    where = checkpoint_file or "the checkpoint file"

    trusted: list[Checkpoint] = []
    for index, checkpoint in enumerate(file_checkpoints or [], start=1):
        if public_key is not None and not checkpoint.signed_by(public_key):
            problems.append((checkpoint.seq, (
                f"line {index} of {where} is not signed by the audit key {key_id} (it names "
                f"key {checkpoint.key_id or '?'}): the key was replaced or the checkpoint "
                f"forged")))
            continue
        trusted.append(checkpoint)
    newest = max(trusted, key=lambda c: c.seq, default=None)

    base_seq, base_hash = 0, GENESIS
    if from_anchor and newest is not None:
        row = db.execute(f"SELECT {', '.join(COLUMNS)} FROM audit WHERE seq = ?",
                         (newest.seq,)).fetchone()
        if row is not None:
            fields = dict(zip(COLUMNS, row, strict=True))
            if fields["hash"] == newest.hash and row_hash(
                    fields["prev_hash"], hashed_fields(fields)) == newest.hash:
                base_seq, base_hash = newest.seq, newest.hash
                notes.append(f"verified from the checkpoint of row {newest.seq}")
        # No such row, or another one: the full walk below says which problem it is.
    compare = [c for c in trusted if c.seq > base_seq]
    stored = stored_checkpoints(db)
    chain: Walk = walk(db, frozenset(c.seq for c in compare + stored), base_seq, base_hash)
    if not chain.ok:
        problems.insert(0, (chain.first_bad_seq, str(chain.problem)))

    db_anchor = 0
    for recorded in stored:
        if recorded.seq <= base_seq:
            continue  # before the anchor the quick check starts from
        if public_key is not None and not recorded.signed_by(public_key):
            problems.append((recorded.seq, (
                f"the checkpoint of row {recorded.seq} in the database is not signed by the "
                f"audit key {key_id} (it names key {recorded.key_id or '?'}): the key was "
                f"replaced or the checkpoint forged")))
        elif chain.ok and recorded.seq <= chain.head_seq and \
                chain.hashes.get(recorded.seq) != recorded.hash:
            problems.append((recorded.seq, (
                f"row {recorded.seq} is not the row the checkpoint in the database signed at "
                f"{recorded.ts:.0f} covers: the log up to it was rewritten")))
        else:
            compare.append(recorded)
            db_anchor = max(db_anchor, recorded.seq)

    if chain.ok:
        beyond = [c for c in compare if c.seq > chain.head_seq]
        if beyond:
            last = max(beyond, key=lambda c: c.seq)
            problems.append((chain.head_seq + 1, (
                f"the log ends at row {chain.head_seq} but a checkpoint signed at {last.ts:.0f} "
                f"covers row {last.seq}: rows {chain.head_seq + 1}..{last.seq} were deleted")))
        for checkpoint in compare:
            if checkpoint.seq <= chain.head_seq and \
                    chain.hashes.get(checkpoint.seq) != checkpoint.hash:
                problems.append((checkpoint.seq, (
                    f"row {checkpoint.seq} is not the row the checkpoint signed at "
                    f"{checkpoint.ts:.0f} covers: the log up to it was rewritten")))
                break
    for seq, problem in chain.failed_verifications:
        problems.append((seq, f"row {seq} records a failed verification ({problem}); the "
                              f"alarm stays until the log is archived (runbook)"))
    file_anchor = newest.seq if newest is not None else 0
    if db_anchor > file_anchor and expect_file:
        if file_checkpoints is None:
            problems.append((None, (
                f"{where} is missing but the log records checkpoints up to row {db_anchor}: "
                f"the file was removed")))
        else:
            problems.append((None, (
                f"{where} ends at row {file_anchor} but the log records checkpoints up to row "
                f"{db_anchor}: the file was cut back or replaced")))
    if public_key is None:
        notes.append("signatures not checked: no public key given")
    anchor = max(file_anchor, db_anchor)
    unanchored = max(0, chain.head_seq - anchor)
    if chain.head_seq and anchor == 0:
        notes.append("no checkpoint covers this log yet")
    first = problems[0] if problems else (None, None)
    from supervisor.models.views import AuditVerifyResult  # made on request only

    return AuditVerifyResult(
        ok=not problems, rows=chain.rows, first_bad_seq=first[0], problem=first[1],
        head_hash=chain.head_hash, head_seq=chain.head_seq, anchor_seq=anchor or None,
        unanchored_rows=unanchored, checkpoints=len(stored), key_id=key_id,
        problems=[p for _, p in problems], notes=notes,
    )


def stored_checkpoints(db: sqlite3.Connection) -> list[Checkpoint]:
    """The checkpoints kept in the database beside the chain, oldest first."""
    return [Checkpoint(seq=int(r[0]), hash=str(r[1]), ts=float(r[2]), key_id=str(r[3]),
                       sig=str(r[4]))
            for r in db.execute("SELECT seq, hash, ts, key_id, sig FROM audit_checkpoints "
                                "ORDER BY seq")]


def record(db: sqlite3.Connection, checkpoint: Checkpoint) -> None:
    """Keep `checkpoint` in the database (inside the caller's transaction)."""
    db.execute("INSERT OR IGNORE INTO audit_checkpoints (seq, hash, ts, key_id, sig) "
               "VALUES (?, ?, ?, ?, ?)", (checkpoint.seq, checkpoint.hash, checkpoint.ts,
                                          checkpoint.key_id, checkpoint.sig))


DEFAULT_KEY = Path("/etc/agent-supervisor/audit-key")
DEFAULT_CHECKPOINT_FILE = Path("/var/log/agent-supervisor/audit-checkpoints.jsonl")


def verify_state_dir(state_dir: Path, public_key_path: Path | None,
                     checkpoint_path: Path) -> AuditVerifyResult:
    """`agentctl audit verify --state-dir`: a daemon's state directory checked without the
    daemon (stopped, or a copy taken for evidence), against a public key the caller trusts.
    Opens the database read-only; changes nothing."""
    from supervisor.ci.report import load_public_key
    from supervisor.errors import InvalidRequest
    database = state_dir / "state.db"
    if not database.is_file():
        raise InvalidRequest(f"no audit database at {database}", path=str(database),
                             hint="--state-dir is the daemon's [daemon] state_dir")
    public_key = load_public_key(public_key_path) if public_key_path is not None else None
    db = sqlite3.connect(f"file:{database}?mode=ro", uri=True, isolation_level=None)
    try:
        db.execute("BEGIN")
        return verify(db, public_key, CheckpointFile(checkpoint_path).read(),
                      checkpoint_file=str(checkpoint_path))
    except sqlite3.Error as exc:
        raise InvalidRequest(f"cannot read {database}: {exc}", path=str(database)) from exc
    finally:
        db.close()
