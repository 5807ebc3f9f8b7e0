"""Audit verification in a process of its own: the chain's hashes and the checkpoints'
signatures computed at nice 19 and idle I/O priority, so a verification of any length holds
neither the daemon's GIL nor its share of the CPU in front of a kill (`agentctl audit verify`
of 50,000 rows in a thread of the daemon made a kill 2.9x slower). Its answer is the one
`anchor.verify` gives in the daemon. Needs read access to the database and the checkpoint file
(the daemon runs it as itself, root).

The daemon's own verification took the checkpoint file and the database snapshot under the
writer's signing lock, so the two agree. A process cannot take that lock; it reads the file,
opens its snapshot, and reads the file again, and starts over if a checkpoint was signed in
between: the writer appends to the file before it records the checkpoint in the database, so
an unchanged file around the snapshot means every checkpoint in it covers rows the snapshot
holds."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from supervisor.audit.anchor import CheckpointFile, verify
from supervisor.models import AuditVerifyResult

# A checkpoint signed between the two reads of the file: try again, this many times in all.
_SNAPSHOT_ATTEMPTS = 20
_IOPRIO_SET = {"x86_64": 251, "aarch64": 30}
_IOPRIO_WHO_PROCESS = 1
_IOPRIO_CLASS_IDLE = 3


# The child lowers its priority before it imports anything heavy (cryptography, pydantic: most
# of its start-up CPU), so not even its start competes with the daemon at full weight.
_BOOT = ("import os, sys\n"
         "os.nice(19)\n"
         "from supervisor.audit.verifier import main\n"
         "sys.exit(main(sys.argv[1:]))\n")


class VerifierFailed(RuntimeError):
    """The verifying process did not give an answer."""


def verify_in_process(database: Path, public_key: Ed25519PublicKey | None,
                      checkpoint_file: Path | None, *, from_anchor: bool = False,
                      timeout: float | None = None) -> AuditVerifyResult:
    """Verify the audit log in `database` in a child process (blocking: call it on a thread).
    `checkpoint_file` None: the log is not anchored (no file is expected)."""
    command = [sys.executable, "-c", _BOOT, "--database", str(database)]
    if checkpoint_file is not None:
        command += ["--checkpoint-file", str(checkpoint_file)]
    if public_key is not None:
        command += ["--public-key",
                    public_key.public_bytes(Encoding.Raw, PublicFormat.Raw).hex()]
    if from_anchor:
        command.append("--from-anchor")
    try:
        # In "/": `-c` puts the current directory first on the path, and a daemon started by
        # hand may be in one that others write (a checkout).
        done = subprocess.run(command, capture_output=True, timeout=timeout, check=False,
                              stdin=subprocess.DEVNULL, env=_child_env(), cwd="/")
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise VerifierFailed(f"the audit verifier could not run: {exc}") from exc
    if done.returncode != 0:
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise VerifierFailed(f"the audit verifier exited {done.returncode}: {' | '.join(tail)}")
    try:
        return AuditVerifyResult.model_validate_json(done.stdout)
    except ValueError as exc:
        raise VerifierFailed(f"the audit verifier's answer is not a result: {exc}") from exc


def _child_env() -> dict[str, str]:
    """Only what the interpreter needs to import this package as the daemon did."""
    keep = ("PATH", "PYTHONPATH", "LANG", "LC_ALL")
    env = {name: os.environ[name] for name in keep if name in os.environ}
    # The daemon may run from a source tree (tests, benchmarks): the child imports the same.
    package_root = str(Path(__file__).resolve().parents[2])
    # Made absolute: the child runs in "/" (verify_in_process).
    env["PYTHONPATH"] = os.pathsep.join(
        [package_root, *(os.path.abspath(entry) for entry in env.get("PYTHONPATH", "").split(
            os.pathsep) if entry)])
    return env


def _lower_priority() -> None:
    with contextlib.suppress(OSError):
        if os.getpriority(os.PRIO_PROCESS, 0) < 19:
            os.nice(19 - os.getpriority(os.PRIO_PROCESS, 0))
    number = _IOPRIO_SET.get(os.uname().machine)
    if number is not None:
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.syscall(number, _IOPRIO_WHO_PROCESS, 0, _IOPRIO_CLASS_IDLE << 13)


def _verify(database: Path, public_key: Ed25519PublicKey | None, checkpoint_file: Path | None,
            from_anchor: bool) -> AuditVerifyResult:
    db = sqlite3.connect(database, isolation_level=None, timeout=30.0)
    try:
        db.execute("PRAGMA query_only=ON")
        if checkpoint_file is None:
            db.execute("BEGIN")
            db.execute("SELECT seq FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
            return verify(db, None, None, expect_file=False).model_copy(update={"notes": []})
        file = CheckpointFile(checkpoint_file)
        for _attempt in range(_SNAPSHOT_ATTEMPTS):
            before = file.read()
            db.execute("BEGIN")
            db.execute("SELECT seq FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
            if file.read() == before:
                break
            db.execute("ROLLBACK")
        else:
            raise VerifierFailed("checkpoints kept being signed while the verifier looked")
        return verify(db, public_key, before, checkpoint_file=str(checkpoint_file),
                      from_anchor=from_anchor)
    finally:
        db.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m supervisor.audit.verifier")
    parser.add_argument("--database", type=Path, required=True)
    parser.add_argument("--checkpoint-file", type=Path)
    parser.add_argument("--public-key", help="the audit key's public half, raw, in hex")
    parser.add_argument("--from-anchor", action="store_true")
    args = parser.parse_args(argv)
    _lower_priority()
    public_key = (Ed25519PublicKey.from_public_bytes(bytes.fromhex(args.public_key))
                  if args.public_key else None)
    result = _verify(args.database, public_key, args.checkpoint_file, args.from_anchor)
    sys.stdout.write(json.dumps(result.model_dump(mode="json")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
