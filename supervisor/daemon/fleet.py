"""Fleet membership on the daemon's side: turns what the fleet link (supervisor/fleet/link.py)
reads from etcd into the local verbs (the same `Arbiter.act` the control API calls, so the kill
path is unchanged), acknowledges each action with its outcome and timings, keeps fleet holds
in force before any launch, applies the partition policy on lease loss, and anchors the audit
head in the store. Runs on the control loop; every etcd call is on the link's threads."""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supervisor import __version__
from supervisor.audit import AuditLog
from supervisor.audit.chain import CHECKPOINT_VERB
from supervisor.config import FleetSection
from supervisor.daemon.arbiter import Arbiter
from supervisor.daemon.store import Store
from supervisor.errors import FleetHold, IllegalTransition, SupervisorError
from supervisor.fleet.anchors import chain_against_anchors, check_anchors
from supervisor.fleet.etcd import Credentials
from supervisor.fleet.link import FleetLink, LinkEvents, Snapshot
from supervisor.fleet.model import (
    DRILL_CLASS,
    DRILL_PREFIX,
    REGISTRATION_AGENTS_MAX,
    Ack,
    AgentOutcome,
    AgentSummary,
    FleetAction,
    Keys,
    Registration,
    drill_canary_name,
    dumps,
)
from supervisor.fleet.progress import Progress
from supervisor.models import ActionRequest, Actor, AuditEntry, RunRequest, Scope
from supervisor.states import AgentState, EndCause

log = logging.getLogger(__name__)

APPLIED_KEY = "fleet_applied"
APPLIED_KEEP = 1000  # action ids remembered as applied (actions older than that are settled)
ACTION_QUEUE_MAX = 1024
# This host's acknowledgements and anchors kept in the store; older ones are deleted (the
# audit log on the host keeps every action applied).
ACKS_KEEP = 256
ANCHORS_KEEP = 256
PRUNE_EVERY = 10  # anchor intervals
# While an action is applied and its ack is on its way to the store, the registration and the
# audit anchor wait (all the host's daemons share its cores with the kill); at most this long
# after the ack was handed over, if the store does not take it.
QUIET_MAX = 2.0
# An ack waits this long at most for its action's audit rows (as a control request's answer
# does, supervisor/api/server.py AUDIT_FLUSH_TIMEOUT): a full disk delays it, never loses it.
ACK_ROWS_WAIT = 5.0
# The registration and the anchor wait behind applied actions (above) at most this long: an
# operator's actions a second apart kept some action unsettled at every moment, and a host's
# registration went unpublished for as long (its new agents unseen by `fleet ls` and by the
# scope check of the next command, refused as scope_empty).
DEFER_MAX = 3.0
_VERB_OF = {"kill": "kill", "pause": "pause", "resume": "resume", "reactivate": "reactivate",
            "lift": "reactivate"}


@dataclass(frozen=True)
class _Answer:
    """An applied action's ack on its way: `acked` once the store has it (or QUIET_MAX
    passed); `runtime` (in Arbiter.answers_pending, what step 6 waits for) settle_delay
    after that."""

    acked: asyncio.Future[None]
    runtime: asyncio.Future[None]


ERROR_MAX = 4000  # characters of one error in an ack (the host's journal has it whole)


def _bounded(text: str) -> str:
    """An error for an ack: whole up to ERROR_MAX, else cut where it says so (an ack's error
    cut without a word read as the whole message)."""
    if len(text) <= ERROR_MAX:
        return text
    return text[:ERROR_MAX] + f" ... [cut: {len(text) - ERROR_MAX} more characters in the " \
        "host's journal]"


def _listed(items: list[str], keep: int) -> str | None:
    """The first `keep` items of a list of problems as one error, saying how many more there
    were (a list cut without a word read as every problem there was)."""
    if not items:
        return None
    text = "; ".join(items[:keep])
    if len(items) > keep:
        text += f"; ... and {len(items) - keep} more"
    return _bounded(text)


def _wall(perf: float) -> float:
    """time.time() at the moment time.perf_counter() read `perf`."""
    return time.time() - (time.perf_counter() - perf)


def _agent_error(error: Any) -> str | None:
    """One agent's error from a scoped verb's results, with its code (its message alone
    left the operator guessing which failure it was)."""
    if not isinstance(error, dict):
        return None if error is None else _bounded(str(error))
    return _bounded(f"{error.get('code', 'error')}: {error.get('message', '')}")


def _actor(action: FleetAction) -> Actor:
    # Every local row the action causes names the operator and the fleet action id.
    return Actor(kind="system", name=f"fleet:{action.operator}:{action.id}")


class FleetMember:
    def __init__(self, config: FleetSection, arbiter: Arbiter, audit: AuditLog, store: Store,
                 loop: asyncio.AbstractEventLoop, db_path: Path) -> None:
        self.config = config
        self.db_path = db_path
        self.arbiter = arbiter
        self.audit = audit
        self.store = store
        self.loop = loop
        self.keys = Keys(config.prefix)
        password = config.password_file.read_text().strip()
        creds = Credentials(endpoints=tuple(config.endpoints), ca_file=config.ca_file,
                            cert_file=config.cert_file, key_file=config.key_file,
                            user=config.user, password=password)
        self.link = FleetLink(creds, self.keys, config.host_id, config.lease_ttl,
                              config.reread_interval, loop, LinkEvents(
                                  snapshot=self._on_snapshot, action=self._on_action,
                                  hold_lifted=self._on_hold_lifted,
                                  hold_added=self._on_hold_added,
                                  lease_lost=self._on_lease_lost,
                                  lease_back=self._on_lease_back))
        self.progress = Progress.loads(json.loads(store.get_meta(APPLIED_KEY) or "{}"),
                                       APPLIED_KEEP)
        self.holds: dict[str, FleetAction] = {}
        self._holds_revision = 0  # the store's revision `holds` is as of
        self.synced = False
        self.partitioned: dict[str, Any] | None = None  # what the policy did, while cut off
        self.started_at = time.time()
        self._queue: asyncio.Queue[tuple[float, FleetAction]] = asyncio.Queue(ACTION_QUEUE_MAX)
        self._worker: asyncio.Task[None] | None = None
        self._anchorer: asyncio.Task[None] | None = None
        self._registration_due: asyncio.TimerHandle | None = None
        self._anchored_seq = -1
        # The newest state-changing audit row (seq, hash), and the publication it has due.
        self._head: tuple[int, str] | None = None
        self._head_due: asyncio.Handle | None = None
        # Actions being applied or whose ack the store has not yet taken; while any is, what
        # is not needed before the ack (registration, anchor) waits: _quiet_ended.
        self._quiet = 0
        self._deferred: set[str] = set()
        self._answers: set[_Answer] = set()  # applied actions whose settle_delay runs
        self._began = 0.0

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Read the holds and any action missed while down, and apply them, before the caller
        opens launches; then watch. A store that cannot be read keeps launches refused (the
        arbiter asks `gate` as its observers.fleet, set before this starts)."""
        self.audit.subscribe(self._on_audit)
        snapshot: Snapshot | None = None
        try:
            snapshot = await asyncio.wait_for(
                asyncio.to_thread(self.link.read_control), self.config.sync_timeout)
        except (SupervisorError, TimeoutError) as exc:
            message = getattr(exc, "message", "") or "timed out"
            log.error("fleet: cannot read the fleet store at start (%s); launches wait", message)
            self.audit.append(actor="system:fleet", verb="fleet_unsynced", scope="global",
                              outcome="failed", detail={"error": message})
        revision = self.progress.revision
        if snapshot is not None:
            self._on_snapshot(snapshot)
            await self._drain()
            revision = snapshot.revision
        self._worker = asyncio.create_task(self._work())
        self._anchorer = asyncio.create_task(self._anchor_periodically())
        self.link.publish_registration(self._registration())
        self.link.start(revision)
        self.audit.append(actor="system:fleet", verb="fleet_join", scope="global",
                          detail={"host": self.config.host_id, "synced": self.synced,
                                  "holds": sorted(self.holds), "revision": revision})

    def settle_now(self) -> None:
        """The daemon is stopping: what waits for settle_delay goes now (its stop kills and
        cleans up every run, and must not wait a second for a fleet halt's courtesy)."""
        for stored in list(self._answers):
            self._settled(stored)

    async def stop(self) -> None:
        for task in (self._worker, self._anchorer):
            if task is not None:
                task.cancel()
        self._quiet = 0  # the last anchor goes whatever is on its way
        self._publish_anchor()
        await asyncio.to_thread(self.link.stop)

    # ------------------------------------------------------------------ the launch gate

    def gate(self, name: str, agent_class: str) -> SupervisorError | None:
        if not self.synced:
            return FleetHold("this host has not yet read the fleet holds from the store; "
                             "launches wait until it has", host=self.config.host_id)
        if self.partitioned is not None:
            return FleetHold("this host is cut off from the fleet store; no launches until "
                             "it is back", host=self.config.host_id)
        for hold in self.holds.values():
            if self._reaches_host(hold) and hold.selector.reaches_agent(name, agent_class):
                return FleetHold(f"fleet hold {hold.id} ({hold.selector.describe()}) by "
                                 f"{hold.operator}: {hold.reason}", hold=hold.id,
                                 operator=hold.operator)
        return None

    def _reaches_host(self, action: FleetAction) -> bool:
        return action.selector.reaches_host(self.config.host_id, self.config.labels)

    # ------------------------------------------------------------------ events from the link

    def _on_snapshot(self, snapshot: Snapshot) -> None:
        # Two threads read control/: the keeper once the store is back, the watcher before
        # each watch. A read can reach the loop after a watch event newer than it (a hold
        # written just after the keeper's read): the holds it saw are then out of date, and
        # replacing the newer ones with them would reopen launches a hold covers until the
        # next re-read. Its actions still go through the progress, which skips the known.
        if snapshot.revision >= self._holds_revision:
            self.holds = dict(snapshot.holds)
            self._holds_revision = snapshot.revision
        first_read = not self.synced
        # The first read (at start, or once a store out of reach at start answers): a host
        # that never applied anything applies the holds in force, not history.
        progress = self.progress
        at_start = first_read and progress.revision == 0
        progress.start_read()
        for revision, action in snapshot.actions:
            if progress.settled(action.id) or progress.pending(action.id):
                continue
            held = action.id in self.holds
            # A host that joins for the first time applies the holds in force, not history.
            if at_start and not held:
                continue
            if not at_start and revision <= progress.revision and not held:
                continue
            self._enqueue(revision, action)
        progress.saw_read(snapshot.revision)
        if first_read:
            self.synced = True
            progress.advance()
            self._save_applied()

    def _on_action(self, revision: int, action: FleetAction, seen: float) -> None:
        if not self.synced:
            return  # history before the first read; the read decides what applies
        if self.progress.wanted(revision, action.id):
            self._enqueue(revision, action, seen)
        self.progress.saw_event(revision)

    def _on_hold_added(self, action: FleetAction, revision: int) -> None:
        self.holds[action.id] = action
        self._holds_revision = max(self._holds_revision, revision)

    def _on_hold_lifted(self, hold_id: str, revision: int) -> None:
        self.holds.pop(hold_id, None)
        self._holds_revision = max(self._holds_revision, revision)

    def _enqueue(self, revision: int, action: FleetAction, seen: float | None = None) -> None:
        """`seen`: perf_counter() when the watch delivered it (a kill's time_to_halt starts
        there, as a control request's starts at its connection)."""
        if self.progress.pending(action.id):
            return
        try:
            self._queue.put_nowait((seen or time.perf_counter(), action))
        except asyncio.QueueFull:
            log.error("fleet: action queue full; %s waits for the next re-read", action.id)
            self.progress.refuse(revision)
            return
        self.progress.queue(action.id, revision)
        log.debug("fleet: %s %s (revision %d) queued", action.verb, action.id, revision)

    async def _drain(self) -> None:
        while not self._queue.empty():
            arrived, action = self._queue.get_nowait()
            await self._apply_or_report(action, arrived)

    async def _work(self) -> None:
        while True:
            arrived, action = await self._queue.get()
            await self._apply_or_report(action, arrived)

    async def _apply_or_report(self, action: FleetAction, arrived: float) -> None:
        try:
            await self._apply(action, arrived)
        except Exception as exc:
            # A bug, not a refusal (those are acks): the operator sees this host fail with
            # the reason instead of "no answer", and the action is not retried in a loop.
            log.exception("fleet: applying %s failed", action.id)
            self._mark_applied(action)
            ack = Ack(action=action.id, host=self.config.host_id, outcome="failed",
                      applied_at=time.time(), error=_bounded(f"internal error: {exc!r}"))
            self.link.write(self.keys.ack(self.config.host_id, action.id), dumps(ack))

    # ------------------------------------------------------------------ applying an action

    async def _apply(self, action: FleetAction, arrived: float) -> None:
        if self.progress.settled(action.id):
            self.progress.done(action.id)
            return
        if not self._reaches_host(action):
            self._mark_applied(action)
            return
        if action.verb == "lift":
            for hold_id in action.lifts:
                self.holds.pop(hold_id, None)
        applying = time.time()
        cpu0 = time.process_time()
        # From here until the store has the ack (and settle_delay after it), only the action
        # and its ack use this host's share of the CPU: no registration, no anchor, no
        # runtime cleanup (step 6).
        self._quiet += 1
        self._began = time.perf_counter()
        stored = _Answer(self.loop.create_future(), self.loop.create_future())
        self.arbiter.answers_pending.add(stored.runtime)
        self._answers.add(stored)
        try:
            ack = await self._apply_verb(action, arrived, applying, stored)
        except BaseException:
            self._quiet_ends(stored, action.id)
            raise
        log.info("fleet: %s %s applied (%s) %.1f ms after it arrived; daemon CPU %.1f ms "
                 "(all its threads, since it began)", action.verb, action.id, ack.outcome,
                 (time.perf_counter() - arrived) * 1000, (time.process_time() - cpu0) * 1000)
        if action.verb == "kill" and action.selector.agent_class is None \
                and (action.selector.agent or "").startswith(DRILL_PREFIX):
            await asyncio.sleep(0)
            self._forget_drill_canaries()
        self.agents_changed()

    async def _apply_verb(self, action: FleetAction, arrived: float, applying: float,
                          stored: _Answer) -> Ack:
        # The action's row waits for the verb's own rows and goes to the writer with them:
        # woken for it alone, the writer committed it and woke the loop with it while the
        # loop was sending the kill's SIGKILLs (docs/benchmarks.md, fleet "Fourth pass").
        self.audit.append(actor=_actor(action).label(), verb="fleet_action", scope="global",
                          reason=action.reason,
                          detail={"action": action.id, "fleet_verb": action.verb,
                                  "operator": action.operator,
                                  "selector": action.selector.model_dump(mode="json"),
                                  "issued_at": action.issued_at}, wake=False)
        try:
            ack = await self._run_verb(action, arrived)
        finally:
            self.audit.wake()
        # Settled in memory, then the ack handed to the writer thread, then the progress
        # saved: the SQLite commit runs while the ack is on its way, not before it.
        self.progress.done(action.id)
        ack.timings = {"seen": round(_wall(arrived), 6), "applying": round(applying, 6),
                       "done": round(ack.applied_at, 6), "sent": round(time.time(), 6)}
        # The ack says the kill is done, so it leaves once the kill's audit rows are durable,
        # as a control request's answer does: waited for on the fleet writer's thread (the
        # audit writer's commit wakes it, not the loop), bounded as the answer's wait is.
        self.link.write(self.keys.ack(self.config.host_id, action.id), dumps(ack),
                        functools.partial(self._quiet_ends, stored, action.id),
                        before=functools.partial(self.audit.flush_blocking, ACK_ROWS_WAIT,
                                                 upto=self.audit.appended()))
        self.loop.call_later(QUIET_MAX, self._quiet_ends, stored, action.id)
        self._save_applied()
        return ack

    def _quiet_ends(self, stored: _Answer, action_id: str) -> None:
        """An ack is in the store (or QUIET_MAX passed): `settle_delay` later, once no other
        action is being applied, what waited goes (`_settled`). Runs once per action,
        whichever comes first."""
        if stored.acked.done():
            return
        stored.acked.set_result(None)
        log.info("fleet: the ack of %s in the store (or given up on) %.1f ms after the verb "
                 "began", action_id, (time.perf_counter() - self._began) * 1000)
        if self.config.settle_delay > 0:
            self.loop.call_later(self.config.settle_delay, self._settled, stored)
        else:
            self._settled(stored)

    def _settled(self, stored: _Answer) -> None:
        """What waited for an applied action's ack goes: the registration, the anchor, the
        runtime cleanups of the runs it ended (Arbiter.answers_out)."""
        if stored not in self._answers:
            return  # settled already (settle_now, at a stop)
        self._answers.discard(stored)
        if not stored.runtime.done():
            stored.runtime.set_result(None)
        self.arbiter.answers_pending.discard(stored.runtime)
        self._quiet = max(0, self._quiet - 1)
        if self._quiet:
            return
        deferred, self._deferred = self._deferred, set()
        if "anchor" in deferred:
            self._publish_anchor()
        if "registration" in deferred:
            self.agents_changed()

    async def _run_verb(self, action: FleetAction, arrived: float) -> Ack:
        if action.verb == "verify":
            return await self._verify(action)
        if action.verb == "drill":
            return await self._drill_canary(action)
        selector = action.selector
        verb = _VERB_OF.get(action.verb)
        now = time.time()
        if verb is None:
            return Ack(action=action.id, host=self.config.host_id, outcome="not_applicable",
                       applied_at=now, error=f"verb {action.verb} is not applied by hosts")
        scope: Scope
        if selector.agent is not None:
            record = self.arbiter.agents.get(selector.agent)
            if record is None or not selector.reaches_agent(record.name, record.agent_class):
                return Ack(action=action.id, host=self.config.host_id,
                           outcome="not_applicable", applied_at=now)
            scope = Scope(agent=selector.agent)
        elif selector.agent_class is not None:
            scope = Scope.model_validate({"class": selector.agent_class})
        else:
            scope = Scope(all=True)
        request = ActionRequest(scope=scope, reason=action.reason[:500])
        agents: list[AgentOutcome] = []
        skipped = 0
        outcome = "ok"
        error: str | None = None
        try:
            result = await self.arbiter.act(verb, request, _actor(action),
                                            cause=EndCause.KILLED, arrived=arrived)
            skipped = sum(1 for r in result.results if r.skipped)
            agents = [AgentOutcome(agent=r.agent, agent_class=self._class_of(r.agent),
                                   previous_state=r.previous_state, new_state=r.new_state,
                                   time_to_halt_ms=r.time_to_halt_ms)
                      for r in result.results if not r.skipped]
        except IllegalTransition as exc:
            outcome = "not_applicable"
            error = exc.message
        except SupervisorError as exc:
            outcome = "failed"
            error = _bounded(f"{exc.code}: {exc.message}")
            for item in exc.detail.get("results", []):
                if item.get("skipped"):
                    skipped += 1
                    continue
                agents.append(AgentOutcome(
                    agent=item.get("agent", "?"), agent_class=self._class_of(item.get("agent")),
                    previous_state=item.get("previous_state", ""),
                    new_state=item.get("new_state", ""),
                    time_to_halt_ms=item.get("time_to_halt_ms"),
                    error=_agent_error(item.get("error"))))
        survivors = self._survivors(action.verb, scope)
        halts = [a.time_to_halt_ms for a in agents if a.time_to_halt_ms is not None]
        if survivors and outcome == "ok":
            outcome = "failed"
            error = f"still running: {', '.join(survivors)}"
        return Ack(action=action.id, host=self.config.host_id, outcome=outcome,  # type: ignore[arg-type]
                   applied_at=time.time(), agents=agents, agents_skipped=skipped,
                   survivors=survivors,
                   slowest_time_to_halt_ms=max(halts) if halts else None, error=error)

    async def _drill_canary(self, action: FleetAction) -> Ack:
        """Step one of a fleet drill: a canary of a few processes, which agentctl then kills
        through the fleet path and times end to end (agentctl fleet drill)."""
        name = drill_canary_name(action.id)
        request = RunRequest.model_validate({
            "name": name, "class": DRILL_CLASS,
            "command": ["sh", "-c", "sleep 600 & sleep 600 & exec sleep 600"]})
        try:
            view = await self.arbiter.launch(request, _actor(action))
        except SupervisorError as exc:
            return Ack(action=action.id, host=self.config.host_id, outcome="failed",
                       applied_at=time.time(), error=f"{exc.code}: {exc.message}")
        return Ack(action=action.id, host=self.config.host_id, outcome="ok",
                   applied_at=time.time(), drill={"canary": name, "run": view.id})

    def _forget_drill_canaries(self) -> None:
        """A drill's canary, once killed, leaves no agent behind (drills never pile up)."""
        for record in list(self.arbiter.agents.values()):
            if record.agent_class == DRILL_CLASS and record.state == AgentState.KILLED.value \
                    and record.current_run is None:
                try:
                    self.arbiter.forget_agent(record.name, Actor(kind="system", name="fleet"),
                                              "fleet drill done")
                except SupervisorError as exc:
                    log.warning("fleet: could not forget drill canary %s: %s", record.name,
                                exc.message)

    async def _verify(self, action: FleetAction) -> Ack:
        """The chain on this host held against the anchors it published to the store (read
        back from the store, not from anything on this host), and the chain itself."""
        host = self.config.host_id
        kvs, _ = await asyncio.to_thread(self.link.reader.get_prefix, self.keys.anchors(host))
        check = check_anchors(host, kvs, pinned=self._public_key())
        problems = list(check.problems)
        problems += await asyncio.to_thread(chain_against_anchors, str(self.db_path),
                                            check.anchors)
        chain = await self.audit.verify_async()
        if not chain.ok:
            problems.append(f"chain: {chain.problem}")
        return Ack(action=action.id, host=host, outcome="failed" if problems else "ok",
                   applied_at=time.time(), error=_listed(problems, 20),
                   audit={**check.as_dict(), "problems": problems[:100],
                          "ok": not problems, "rows": chain.rows, "head_seq": chain.head_seq})

    def _class_of(self, name: str | None) -> str:
        record = self.arbiter.agents.get(name or "")
        return record.agent_class if record is not None else "default"

    def _survivors(self, verb: str, scope: Scope) -> list[str]:
        """Agents in scope that the verb should have stopped and that still have a run."""
        if verb != "kill":
            return []
        targets = [a for a in self.arbiter.agents.values()
                   if (scope.agent is None or a.name == scope.agent)
                   and (scope.agent_class is None or a.agent_class == scope.agent_class)]
        return sorted(a.name for a in targets if a.state != AgentState.KILLED.value
                      and a.current_run is not None)

    def _mark_applied(self, action: FleetAction) -> None:
        self.progress.done(action.id)
        self._save_applied()

    def _save_applied(self) -> None:
        self.store.set_meta(APPLIED_KEY, json.dumps(self.progress.dumps()))

    # ------------------------------------------------------------------ partitions

    def _policy(self, agent_class: str) -> str:
        return self.config.partition_policy_by_class.get(agent_class,
                                                         self.config.partition_policy)

    def _on_lease_lost(self, cut_for: float) -> None:
        if self.partitioned is not None:
            return
        self.partitioned = {"lost_at": time.time(), "cut_for_s": round(cut_for, 3),
                            "applied": {}}
        self.arbiter.track(asyncio.ensure_future(self._apply_partition_policy()))

    async def _apply_partition_policy(self) -> None:
        assert self.partitioned is not None
        actor = Actor(kind="system", name="fleet:partition")
        classes = sorted({a.agent_class for a in self.arbiter.agents.values()})
        applied: dict[str, Any] = {}
        for agent_class in classes:
            policy = self._policy(agent_class)
            verb = {"halt": "kill", "pause": "pause"}.get(policy)
            entry: dict[str, Any] = {"policy": policy}
            if verb is not None:
                reason = f"partition: cut off from the fleet store ({policy})"
                try:
                    result = await self.arbiter.act(
                        verb, ActionRequest(scope=Scope.model_validate({"class": agent_class}),
                                            reason=reason), actor)
                    entry["agents"] = [r.agent for r in result.results if not r.skipped]
                except SupervisorError as exc:
                    entry["error"] = f"{exc.code}: {exc.message}"
            applied[agent_class] = entry
        self.partitioned["applied"] = applied
        log.warning("fleet: cut off from the store for over the lease; policy applied: %s",
                    applied)
        self.audit.append(actor=actor.label(), verb="fleet_partition", scope="global",
                          outcome="ok", reason="lease lost",
                          detail={"host": self.config.host_id, "default_policy":
                                  self.config.partition_policy, "applied": applied})

    def _on_lease_back(self, cut_for: float) -> None:
        report = dict(self.partitioned or {})
        report.update({"host": self.config.host_id, "back_at": time.time(),
                       "cut_for_s": round(cut_for, 3)})
        self.partitioned = None
        self.audit.append(actor="system:fleet:partition", verb="fleet_reconnect",
                          scope="global", detail=report)
        self.link.write(self.keys.partition(self.config.host_id), json.dumps(report))
        self.agents_changed()

    # ------------------------------------------------------------------ registration

    def agents_changed(self) -> None:
        """Republish the registration soon; many changes in a burst make one put. While an
        action is applied, once its ack is out (_quiet_ends)."""
        if self._quiet:
            self._defer("registration")
            return
        if self._registration_due is None:
            self._registration_due = self.loop.call_later(0.05, self._publish_registration)

    def _publish_registration(self) -> None:
        self._registration_due = None
        self.link.publish_registration(self._registration())

    def _registration(self) -> str:
        records = sorted(self.arbiter.agents.values(), key=lambda a: a.name)
        agents = [AgentSummary(name=a.name, agent_class=a.agent_class, state=a.state)
                  for a in records[:REGISTRATION_AGENTS_MAX]]
        return dumps(Registration(
            host=self.config.host_id, labels=self.config.labels, version=__version__,
            started_at=self.started_at, updated_at=time.time(), agents=agents,
            agents_total=len(records), agents_truncated=len(records) > len(agents),
            fleet_held=bool(self.holds) or self.arbiter.global_halt))

    # ------------------------------------------------------------------ audit anchors

    def _on_audit(self, _db: Any, entry: AuditEntry) -> None:
        if entry.verb == CHECKPOINT_VERB:
            self._publish_anchor()
        elif entry.new_state is not None and entry.new_state != entry.previous_state:
            # A state change (launch, pause, resume, kill, reactivate, an exit): its row is
            # anchored now, not at the next checkpoint. The rows of one commit reach the loop
            # together: one signature and one write for the newest, once they all have.
            if self._head is None or entry.seq > self._head[0]:
                self._head = (entry.seq, entry.hash)
            if self._head_due is None:
                self._head_due = self.loop.call_soon(self._anchor_head)

    def _anchor_head(self) -> None:
        self._head_due = None
        self._publish_anchor()

    def _public_key(self) -> str | None:
        if self.audit.anchoring is None:
            return None
        from cryptography.hazmat.primitives import serialization
        public = self.audit.anchoring.signer.public_key
        return base64.b64encode(public.public_bytes(serialization.Encoding.Raw,
                                                    serialization.PublicFormat.Raw)).decode()

    def _defer(self, what: str) -> None:
        """`what` ("registration", "anchor") goes once no action is being settled, or
        DEFER_MAX from now, whichever comes first."""
        if what in self._deferred:
            return
        self._deferred.add(what)
        self.loop.call_later(DEFER_MAX, self._overdue, what)

    def _overdue(self, what: str) -> None:
        if what not in self._deferred:
            return  # went when the actions settled
        self._deferred.discard(what)
        if what == "anchor":
            self._publish_anchor(now=True)
        else:
            self._publish_registration()

    def _publish_anchor(self, now: bool = False) -> None:
        if self._quiet and not now:
            self._defer("anchor")
            return
        checkpoint = self.audit.last_checkpoint
        head, anchoring = self._head, self.audit.anchoring
        if head is not None and anchoring is not None and head[0] > self._anchored_seq \
                and (checkpoint is None or head[0] > checkpoint.seq):
            # The newest state change is past the last checkpoint: its row signed here with
            # the audit key, as a checkpoint would be (the checkpoint file is the writer's;
            # the store's anchors are checked against the chain, not against that file).
            checkpoint = anchoring.signer.sign(head[0], head[1], time.time())
        if checkpoint is None or checkpoint.seq <= self._anchored_seq:
            return
        self._anchored_seq = checkpoint.seq
        body: dict[str, Any] = {"host": self.config.host_id, **checkpoint.as_dict(),
                                "public_key": self._public_key()}
        self.link.write_latest("anchor", self.keys.anchor(self.config.host_id, checkpoint.seq),
                               json.dumps(body, sort_keys=True))

    async def _anchor_periodically(self) -> None:
        ticks = 0
        while True:
            if ticks % PRUNE_EVERY == 0:
                try:
                    await asyncio.to_thread(self._prune)
                except SupervisorError as exc:
                    log.warning("fleet: pruning old acks and anchors failed: %s", exc.message)
            await asyncio.sleep(self.config.anchor_interval)
            self._publish_anchor()
            ticks += 1

    def _prune(self) -> None:
        """Keep this host's acks and anchors in the store bounded (runs on a thread)."""
        host = self.config.host_id
        for prefix, keep in ((self.keys.acks(host), ACKS_KEEP),
                             (self.keys.anchors(host), ANCHORS_KEEP)):
            kvs, _ = self.link.reader.get_prefix(prefix)
            for kv in sorted(kvs, key=lambda kv: kv.key)[:-keep]:
                self.link.reader.delete(kv.key)
