"""The daemon's side of the audit log: the anchors opened at start (the key outside the state
directory, created on first start), the chain verified from its last anchor before anything
is served (refuse or alarm, audited), the writer thread started, then a full verification off
the loop, and the housekeeping that takes the disk reserve back and writes kept state records.
Needs root (the key is root's, 0600)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from supervisor.audit import Anchoring, AuditLog
from supervisor.audit.anchor import CheckpointFile, KeyProblem, Signer
from supervisor.audit.reserve import DiskReserve
from supervisor.config import Config
from supervisor.daemon.store import Store
from supervisor.errors import EnforcementError
from supervisor.models import AuditVerifyResult

log = logging.getLogger(__name__)

SYSTEM_ACTOR = "system:supervisor"
HOUSEKEEPING_EVERY = 5.0


def _summary(result: AuditVerifyResult, scope: str) -> dict[str, Any]:
    return {"scope": scope, "rows": result.rows, "head_seq": result.head_seq,
            "anchor_seq": result.anchor_seq, "unanchored_rows": result.unanchored_rows,
            "checkpoints": result.checkpoints, "key_id": result.key_id,
            "problems": result.problems[:10], "notes": result.notes}


async def start_audit(config: Config, audit: AuditLog) -> AuditVerifyResult:
    """Open the anchors, verify from the last one, start the writer. Under
    `on_tamper = "refuse"` a chain that does not hold stops the start (after auditing why)."""
    try:
        signer = Signer.load_or_create(config.audit.key)
    except KeyProblem as exc:
        raise EnforcementError(f"cannot use the audit key: {exc}",
                               path=str(config.audit.key)) from exc
    audit.anchoring = Anchoring(signer=signer, file=CheckpointFile(config.audit.checkpoint_file),
                                every_rows=config.audit.checkpoint_every,
                                interval=config.audit.checkpoint_interval)
    result = await audit.verify_async(from_anchor=True, in_process=False)
    detail = _summary(result, "from_anchor")
    if result.ok:
        log.info("audit log holds against its checkpoints: %d rows checked, anchored at row %s "
                 "(key %s)", result.rows, result.anchor_seq, signer.key_id)
    else:
        audit.alarms.chain_problem = result.problem
        log.critical("AUDIT LOG TAMPERED OR DAMAGED: %s (%d problems; checkpoint file %s, key "
                     "%s). See the runbook: 'The audit log does not verify'.", result.problem,
                     len(result.problems), config.audit.checkpoint_file, signer.key_id)
        if config.audit.on_tamper == "refuse":
            audit.append(actor=SYSTEM_ACTOR, verb="audit_verify", scope="global",
                         outcome="failed", reason="refusing to start: [audit] on_tamper = "
                         "\"refuse\"", detail=detail)
            raise EnforcementError(f"the audit log does not verify: {result.problem}; "
                                   f"refusing to start ([audit] on_tamper = \"refuse\")",
                                   problems=result.problems[:10])
    audit.start(asyncio.get_running_loop())
    audit.append(actor=SYSTEM_ACTOR, verb="audit_verify", scope="global",
                 outcome="ok" if result.ok else "failed",
                 reason="" if result.ok else "started on a log that does not verify "
                 "([audit] on_tamper = \"alarm\")", detail=detail)
    return result


async def verify_fully(audit: AuditLog) -> AuditVerifyResult:
    """The whole chain against every checkpoint, in a process of its own; a problem raises
    the alarm."""
    result = await audit.verify_async()
    if not result.ok:
        audit.alarms.chain_problem = result.problem
        log.critical("AUDIT LOG TAMPERED OR DAMAGED (full verification): %s", result.problem)
        audit.append(actor=SYSTEM_ACTOR, verb="audit_verify", scope="global", outcome="failed",
                     reason="the full verification found a problem",
                     detail=_summary(result, "full"))
    return result


async def housekeeping(audit: AuditLog, store: Store, reserve: DiskReserve | None) -> None:
    """Every few seconds: write state records kept while writes failed, and take the disk
    reserve back once there is room for it (then its alarm clears)."""
    while True:
        await asyncio.sleep(HOUSEKEEPING_EVERY)
        store.flush()
        if (reserve is not None and audit.alarms.disk_reserve is not None
                and await asyncio.to_thread(reserve.ensure)):
            audit.alarms.disk_reserve = None
            audit.append(actor=SYSTEM_ACTOR, verb="disk_reserve", scope="global",
                         reason="the disk reserve is held again",
                         detail={"path": str(reserve.path), "bytes": reserve.size})
