"""The daemon's side of the egress gateway: per-run network attachments (veth + nftables),
session tokens, secrets, approvals held for an operator, the budget and breaker tripwires, the
audit rows for every refusal, and each agent's usage across runs. Runs in the daemon's loop.

The gateway itself serves agents in a process of its own (supervisor/egress/worker.py, started
and watched by supervisor/egress/worker_process.py): nothing an agent sends it competes with
the control socket or the kill path for this process's loop, GIL, memory or descriptors. This
module talks to it only by messages that never wait without a deadline; revocation (kill step
2) is a message sent and a local record, never an answer awaited."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import logging
import math
import os
import secrets
import socket
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from supervisor.audit import AuditLog
from supervisor.config import Config
from supervisor.daemon.arbiter import Arbiter, LiveRun
from supervisor.daemon.containment import Containment
from supervisor.daemon.store import RunRecord
from supervisor.egress import link, nft
from supervisor.egress.accounting import Usage
from supervisor.egress.grant import (
    Carried,
    McpCarried,
    RunGrant,
    carried_to_wire,
    grant_to_wire,
    mcp_carried_from_wire,
)
from supervisor.egress.secrets import load_secret
from supervisor.errors import (
    ApprovalDecided,
    ApprovalNotFound,
    BreakerNotTripped,
    EgressSetupFailed,
    EnforcementError,
    GatewayUnavailable,
    IllegalTransition,
    InvalidRequest,
    RuntimeFailure,
    SupervisorError,
)
from supervisor.models import Actor
from supervisor.profiles import load_profile
from supervisor.runtime.init import SandboxInit
from supervisor.runtime.runc import Runc
from supervisor.sandbox.cgroups import Cgroup
from supervisor.states import RunState
from supervisor.tripwires import Firing

if TYPE_CHECKING:  # loaded with the first gateway run (an embedded CI run never needs them)
    from supervisor.egress.worker_process import WorkerProcess
    from supervisor.mcp.sandbox import RunServers, StdioLauncher, StdioServer
    from supervisor.models.egress import GatewayPolicy
    from supervisor.models.views import Approval

log = logging.getLogger(__name__)

GATEWAY = Actor(kind="system", name="gateway")
_DENIAL_ROWS_PER_RUN = 50  # egress_denied rows per run; the gateway's tally counts the rest
# mcp_call rows per run (one per decision); past it they are counted in egress_summary. The
# MCP budgets bound the calls themselves.
_MCP_ROWS_PER_RUN = 5000
_MCP_EXCESS_KEYS = 32  # outcomes named in the summary's count of decisions past the cap
# Held requests over all runs. The gateway caps each run's own; this bound also holds if the
# worker (an agent-facing process) were subverted and sent holds without end.
_MAX_PENDING_APPROVALS = 4096
_READ_TIMEOUT = 2.0  # a usage read waits this long for the worker, then shows the last snapshot
_DETAIL_LIMIT = 8192  # bytes of JSON in a refusal's detail (the worker sends at most 4096)
CARRIED_DENIALS_BYTES = 1024  # of a run's refusal tally in a handover record
# How long a drill's token check may keep an ended run's listener open (it needs a few ms).
_CHECK_HOLD = 30.0
# How long a handover's close may take beyond a request's: the worker first answers the calls
# in flight to the run's stdio MCP servers (supervisor/mcp/gateway.py hand_over).
_HANDOVER_ANSWERS = 10.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS egress_usage (
    agent TEXT PRIMARY KEY,
    requests INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0,
    spend REAL NOT NULL DEFAULT 0,
    tokens INTEGER NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL
);
"""


def _clipped(detail: Any) -> dict[str, Any]:
    """A refusal's detail as the worker reported it, if it is of the size the worker makes;
    what reaches the audit log stays small whatever the worker sends."""
    if isinstance(detail, dict) and len(json.dumps(detail, default=str)) <= _DETAIL_LIMIT:
        return detail
    return {"detail_withheld": "larger than the gateway sends"}


def _summed(carried: dict[str, int], reported: Any) -> dict[str, int]:
    """A refusal tally the worker reported (a dict of counts, or nothing) added to `carried`."""
    total = dict(carried)
    if isinstance(reported, dict):
        for key, count in reported.items():
            total[str(key)] = total.get(str(key), 0) + int(count)
    return total


# The refusal tally in a run's egress_summary row: well inside the audit's cap on a row's
# detail, so the row is never cut (a cut row would lose the totals an operator reads).
SUMMARY_DENIALS_BYTES = 4096


def fit_denials(denials: dict[str, int], budget: int = SUMMARY_DENIALS_BYTES) -> dict[str, int]:
    """The most frequent refusals while they fit in `budget` bytes of JSON; the rest summed
    under one key, so the total stays exact."""
    kept: dict[str, int] = {}
    used, rest, rest_kinds = 2, 0, 0
    for key, count in sorted(denials.items(), key=lambda item: (-item[1], item[0])):
        cost = len(json.dumps({key: count})) + 1
        if used + cost + 64 <= budget:  # 64: room for the "other" entry
            kept[key] = count
            used += cost
        else:
            rest += count
            rest_kinds += 1
    if rest_kinds:
        kept[f"other ({rest_kinds} kinds)"] = rest
    return kept



def _count_mcp(state: _RunEgress, detail: dict[str, Any]) -> None:
    """The run's MCP calls and cost from a decision's running totals (a report that is not a
    finite non-negative number changes nothing)."""
    calls, cost = detail.get("calls"), detail.get("cost")
    if isinstance(calls, int) and not isinstance(calls, bool) and calls > state.mcp_calls:
        state.mcp_calls = calls
    if (isinstance(cost, int | float) and not isinstance(cost, bool) and math.isfinite(cost)
            and cost > state.mcp_cost):
        state.mcp_cost = float(cost)


def _mcp_summary(state: _RunEgress) -> dict[str, Any]:
    """The MCP part of a run's egress_summary: the decisions audited one row each, and those
    past the per-run cap counted by outcome."""
    if not state.grant.policy.mcp.servers and not state.mcp_rows:
        return {}
    return {"mcp": {"calls": state.mcp_calls, "cost": round(state.mcp_cost, 9),
                    "rows": state.mcp_rows, "unrecorded": state.mcp_unrecorded,
                    "unrecorded_by_outcome": dict(state.mcp_excess)}}


def _let_go(stdio: RunServers | None) -> None:
    """An adoption that failed: the servers' descriptors closed, their cgroups no longer
    held; the servers themselves are the run's reaping's to kill."""
    if stdio is not None:
        stdio.close_gateway_ends()
        for server in stdio.servers:
            server.cgroup.release()


def _carry_mcp_audit(state: _RunEgress, mcp: dict[str, Any],
                     carried: McpCarried | None) -> None:
    """The daemon's MCP accounts of an adopted run go on from the previous daemon's: rows
    written (the per-run cap counts them), decisions past the cap, a budget that fired (it
    fires once), and the calls and cost telemetry reads."""
    def count(key: str) -> int:
        value = mcp.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) \
            and value >= 0 else 0

    state.mcp_rows = min(count("rows"), _MCP_ROWS_PER_RUN)
    state.mcp_unrecorded = count("unrecorded")
    excess = mcp.get("unrecorded_by_outcome")
    if isinstance(excess, dict):
        state.mcp_excess = {str(k)[:100]: int(v) for k, v in
                            list(excess.items())[:_MCP_EXCESS_KEYS + 1]
                            if isinstance(v, int) and not isinstance(v, bool) and v >= 0}
    state.mcp_budget_fired = mcp.get("budget_fired") is True
    if carried is not None:
        state.mcp_calls, state.mcp_cost = carried.calls, carried.cost


class RunNetwork:
    """One run's veth and nftables table (a `NetworkAttachment` for the runtime)."""

    def __init__(self, run_id: str, ifname: str, table: str, addresses: link.LinkAddresses,
                 port: int) -> None:
        self.run_id = run_id
        self.ifname = ifname
        self.table = table
        self.addresses = addresses
        self.port = port
        self._detached = False
        # The run's stdio MCP servers (supervisor/mcp/sandbox.py): killed with its network,
        # which every ending tears down after the agent's cgroup is confirmed empty.
        self.stdio: RunServers | None = None

    def attach(self, netns: str) -> None:
        link.attach(netns, self.ifname, self.addresses)
        try:
            nft.install(self.table, self.ifname, self.addresses.host_ip, self.port)
        except BaseException:
            link.detach(self.ifname)
            raise

    def detach(self) -> None:
        if self.stdio is not None:
            self.stdio.kill()
        if self._detached:
            return
        self._detached = True
        for step, name in ((nft.remove, self.table), (link.detach, self.ifname)):
            try:
                step(name)
            except Exception as exc:  # every step must run; the leftover is logged and reaped
                log.error("run %s: removing %s failed: %s", self.run_id, name, exc)

    def set_up(self, up: bool) -> None:
        if not self._detached:
            link.set_up(self.ifname, up)


@dataclass
class PendingApproval:
    """A held request: what operators see (the API's Approval). The request itself waits in
    the gateway worker until a decision is sent there."""

    request: Approval
    timer: asyncio.TimerHandle | None = None
    decided: bool = False

    def view(self) -> dict[str, Any]:
        return self.request.model_dump(exclude_none=True)


@dataclass
class _RunEgress:
    """One run's egress: its network, its grant and what its gateway worker reported."""
    network: RunNetwork
    grant: RunGrant
    generation: int  # the worker that holds its listener
    denial_rows: int = 0
    # The worker's last report: usage, breaker, refusal counts (see supervisor/egress/worker).
    snapshot: dict[str, Any] = field(default_factory=dict)
    lost: bool = False  # its worker died: no listener, no network until the run ends
    revoked: bool = False  # kill step 2 was sent (the worker's answer is never awaited)
    mcp_rows: int = 0
    mcp_unrecorded: int = 0  # decisions past _MCP_ROWS_PER_RUN
    # Those decisions by outcome (at most _MCP_EXCESS_KEYS outcomes, then "other"), for the
    # run's egress_summary row.
    mcp_excess: dict[str, int] = field(default_factory=dict)
    mcp_budget_fired: bool = False
    # Tool calls let through and their cost so far, as the gateway reports them with each
    # decision (telemetry's mcp_calls and mcp_cost; never lowered by a late report).
    mcp_calls: int = 0
    mcp_cost: float = 0.0
    stdio: RunServers | None = None  # its stdio MCP servers, reaped after its end
    # Refusals the previous daemon's worker counted (an adopted run; bounded in the record).
    carried_denials: dict[str, int] = field(default_factory=dict)

    def usage(self) -> Usage:
        return Usage(**self.snapshot["usage"]) if self.snapshot.get("usage") else Usage()


class TokenCheck:
    """A drill's check that kill step 2 revoked a run's token (killpath.RevocationCheck). Made
    before the kill, it keeps the run's listener open in the gateway past the run's end (at
    most _CHECK_HOLD); `result()` then hands the gateway worker one end of a socketpair to
    serve as a connection accepted on that listener, presents the token over it as the agent
    would, and lets the listener close. It needs no network, so step 5 having removed the
    run's address decides nothing: only the gateway answering token_revoked passes."""

    def __init__(self, control: EgressControl, run_id: str, user: str, token: str) -> None:
        self.control = control
        self.run_id = run_id
        self.user = user
        self.token = token
        self._released = asyncio.Event()

    async def result(self) -> str:
        try:
            return await self._present()
        finally:
            self.release()

    def release(self) -> None:
        self._released.set()
        if self.control.checks.get(self.run_id) is self:
            del self.control.checks[self.run_id]

    async def released(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._released.wait(), _CHECK_HOLD)

    async def _present(self) -> str:
        # aiohttp comes with the gateway module: a run without the gateway never loads it.
        from supervisor.egress.gateway import present_token

        worker = self.control.worker
        ours, theirs = socket.socketpair()
        try:
            key = f"check/{self.run_id}/{secrets.token_hex(4)}"
            if not worker.send_fds(key, theirs.fileno()):
                return "fail: the gateway worker could not take the check's connection"
            theirs.close()
            try:
                reply = await worker.request({"op": "accept", "run": self.run_id,
                                              "socket": key})
            except GatewayUnavailable as exc:
                return f"fail: the gateway worker did not answer the check: {exc.message}"
            if not reply.get("ok"):
                return f"fail: the gateway could not take the check: {reply.get('error')}"
            try:
                answer = await asyncio.to_thread(present_token, ours, self.user, self.token)
            except OSError as exc:
                return f"fail: could not present the token: {exc}"
        finally:
            ours.close()
            theirs.close()
        if answer is None:
            return "fail: the gateway closed the connection without answering the token"
        status, code = answer
        if code == "token_revoked":
            return "pass"
        return f"fail: the gateway answered the run's token with {status!r} ({code or '-'})"


class EgressControl:
    def __init__(self, config: Config, arbiter: Arbiter, containment: Containment,
                 audit: AuditLog, db: sqlite3.Connection,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.arbiter = arbiter
        self.containment = containment
        self.audit = audit
        self.db = db
        self.loop = loop
        # Its share of the pool: a daemon's the lower half, an embedded run's its slot's /30
        # (config.py `pool_share`), so neither picks another's address.
        self.pool = link.AddressPool(config.egress.pool, share=config.egress.share())
        self.runs: dict[str, _RunEgress] = {}
        self.approvals: dict[str, PendingApproval] = {}
        self.records: dict[str, dict[str, Any]] = {}  # ended runs' egress, for CI reports
        self.dropped_events = 0  # reports the worker could not send (the daemon was behind)
        # Ended runs whose final count is still being fetched: shutdown waits for them (the
        # arbiter cancels its own tasks), so a CI report and the summary row are exact.
        self._finishing: set[asyncio.Task[None]] = set()
        self.checks: dict[str, TokenCheck] = {}  # drills' token checks, by run
        # False: no earlier instance can have left an nftables table of this name prefix, so
        # reconcile lists none (one `nft` process fewer; an embedded CI run whose slot's last
        # runs had no gateway says so, ci/runner.py).
        self.leftover_tables_possible = True
        db.executescript(_SCHEMA)

    # ------------------------------------------------------------------ lifecycle

    @cached_property
    def worker(self) -> WorkerProcess:
        """The gateway worker's handle, made (and its module loaded) when first needed; the
        process itself starts with the first gateway run. A supervisor whose agents have no
        network never loads either (an embedded CI run starts faster)."""
        from supervisor.egress.worker_process import WorkerProcess

        return WorkerProcess(self.config, self.loop, self._on_event, self._on_worker_exit)

    @cached_property
    def stdio(self) -> StdioLauncher:
        """Starts a gateway run's stdio MCP servers; made when a run first has any."""
        from supervisor.mcp.sandbox import StdioLauncher

        config = self.config
        return StdioLauncher(
            runc=Runc(config.sandbox.runc_path, config.daemon.runtime_dir / "runc"),
            init=SandboxInit(Path(config.sandbox.init)), bundles_dir=self.arbiter.bundles_dir,
            logs_dir=self.arbiter.logs_dir, cgroup_parent=config.sandbox.cgroup_parent,
            name_prefix=config.sandbox.name_prefix, uid_base=config.sandbox.uid_base,
            agent_uid=config.sandbox.agent_uid, max_runs=config.sandbox.max_runs,
            secrets_dir=config.egress.secrets_dir, confirm_timeout=config.kill.confirm_timeout)

    async def stop(self) -> None:
        """After every run has ended: their final counts, then the worker (if ever made)."""
        for approval in list(self.approvals.values()):
            self._decide(approval, False, "system:supervisor", "the supervisor stopped",
                         "cancelled")
        if self._finishing:
            from supervisor.egress.worker_process import REQUEST_TIMEOUT

            await asyncio.wait(self._finishing, timeout=REQUEST_TIMEOUT + 1)
        worker: WorkerProcess | None = self.__dict__.get("worker")
        if worker is not None:  # None: no gateway run ever needed it
            worker.stop()

    def reap_leftovers(self) -> list[str]:
        """nftables tables a previous instance left (its veths went with its netns); those of
        runs this daemon adopted are theirs."""
        if not self.leftover_tables_possible:
            return []
        removed = []
        adopted = {state.network.table for state in self.runs.values()}
        for table in nft.tables_with_prefix(self.config.sandbox.name_prefix):
            if table in adopted:
                continue
            nft.remove(table)
            removed.append(table)
        if removed:
            self.audit.append(actor="system:supervisor", verb="reap", scope="global",
                              target="nftables", reason="left by a previous supervisor instance",
                              detail={"nft_tables": removed})
        return removed

    # ---------------------- for the arbiter: network provider, Credentials, observers.Gateway

    async def prepare(self, live: LiveRun) -> tuple[RunNetwork, dict[str, str]]:
        """Before the sandbox exists: secrets (fail closed), addresses, token, the gateway's
        listener (bound with IP_FREEBIND, so it need not wait for the veth), the proxy env.
        A failure here leaves nothing: the launch fails before any sandbox is made."""
        run, profile = live.record, live.profile
        assert profile is not None
        policy = profile.network.gateway
        secret_values = self._secret_values(policy)
        secret_values.update(self._mcp_secrets(policy))
        await self.worker.ensure_up()
        addresses = self.pool.allocate()
        network = RunNetwork(run.id, link.host_ifname(run.container_id),
                             nft.table_name(self.config.sandbox.name_prefix, run.id), addresses,
                             self.config.egress.port)
        token = secrets.token_urlsafe(32)
        grant = RunGrant(
            run_id=run.id, agent=run.agent, token=token,
            expires_at=run.started_at + policy.token_ttl, policy=policy,
            host_ip=str(addresses.host_ip), port=self.config.egress.port,
            secrets=secret_values, agent_usage=self._agent_usage(run.agent))
        generation = self.worker.generation
        try:
            stdio = await self._start_stdio(live)
        except BaseException:
            self.pool.release(addresses)
            raise
        try:
            # The secrets travel only over the worker's socketpair; the stdio servers' ends
            # over its descriptor channel, before the message that names them.
            reply = await self.worker.request({"op": "open", "grant": grant_to_wire(grant),
                                               "stdio": self._pass_stdio(stdio)})
        except GatewayUnavailable:
            self._release_unless_held(addresses, generation)
            await self._reap_stdio(stdio)
            raise
        except BaseException:
            await self._reap_stdio(stdio)
            raise
        # The daemon keeps its copy of each server's gateway end: a restart hands it to the
        # next daemon's worker (the server's stdin stays open while the workers change).
        if not reply.get("ok"):
            self.pool.release(addresses)
            await self._reap_stdio(stdio)
            raise EgressSetupFailed(
                f"run {run.id}: the gateway cannot listen on {grant.host_ip}:{grant.port}: "
                f"{reply.get('error')}", run=run.id, errno=reply.get("errno"))
        network.stdio = stdio
        self.runs[run.id] = _RunEgress(network, grant, generation, stdio=stdio)
        proxy = f"http://{run.agent}:{token}@{addresses.host_ip}:{self.config.egress.port}"
        env = {"HTTP_PROXY": proxy, "HTTPS_PROXY": proxy, "http_proxy": proxy,
               "https_proxy": proxy, "NO_PROXY": "", "no_proxy": "",
               "AGENT_SUPERVISOR_GATEWAY": f"{addresses.host_ip}:{self.config.egress.port}"}
        return network, env

    def _secret_values(self, policy: GatewayPolicy) -> dict[str, str]:
        """Each route's secret as this daemon's configuration names it now (fail closed:
        EgressSetupFailed naming the reference, never a value)."""
        return {route.name: load_secret(route.secret, self.config.egress.secrets_dir)
                for route in policy.routes}

    # ---------------------------------------------------- a restart (daemon/handover.py)

    def handover_refusal(self, run_id: str) -> str | None:
        """Why the run's gateway session cannot go to the next daemon; None when it can."""
        state = self.runs.get(run_id)
        if state is None or state.lost:
            return "its egress gateway session is lost (the gateway worker died)"
        if state.revoked:
            return "its gateway token is revoked"
        if state.stdio is not None and len(state.stdio.gateway_ends()) != len(
                state.stdio.servers):
            return "the daemon no longer holds an end of each of its stdio MCP servers"
        return None

    async def hand_over(self, run_id: str) -> tuple[dict[str, Any], list[int]]:
        """An orderly restart hands `run_id` to the next daemon: held requests are cancelled
        (audited; the agent is told to retry), the run's gate is closed in this worker, which
        answers with what it counted, and the run leaves this daemon's books without an end
        (no egress_summary, nothing added to its agent's usage; its /30, veth and nft table
        stay as they are). A run with MCP servers: the worker first answers the calls in
        flight to its stdio servers (supervisor_restarting) and gives its MCP state (call
        counters, sessions, request ids); the servers keep running, and a duplicate of this
        daemon's end of each one's socketpair goes with the record. Returns the run's entry
        of the handover record (its link, the token the agent holds, its expiry, the gate's
        counts and decisions; never a secret) and those descriptors, the caller's to close,
        in the order of the entry's `mcp.stdio`. EgressSetupFailed when the counts cannot be
        had (the run is then killed)."""
        why = self.handover_refusal(run_id)
        if why is not None:
            raise EgressSetupFailed(why, run=run_id)
        state = self.runs[run_id]
        self._cancel_approvals(run_id, "the supervisor restarted: a request held for an "
                                       "operator is not handed over (the agent may retry)")
        from supervisor.egress.worker_process import REQUEST_TIMEOUT

        try:
            reply = await self.worker.request({"op": "close", "run": run_id, "handover": True},
                                              timeout=REQUEST_TIMEOUT + _HANDOVER_ANSWERS)
        except GatewayUnavailable as exc:
            raise EgressSetupFailed(f"the gateway's counts for run {run_id} could not be "
                                    f"read: {exc.message}", run=run_id) from exc
        usage = reply.get("usage")
        if not isinstance(usage, dict):
            raise EgressSetupFailed(f"the gateway had no session for run {run_id}",
                                    run=run_id)
        mcp: dict[str, Any] | None = None
        fds: list[int] = []
        if state.grant.policy.mcp.servers or state.stdio is not None:
            gateway_mcp = reply.get("mcp")
            if state.stdio is not None and not isinstance(gateway_mcp, dict):
                raise EgressSetupFailed(f"the gateway gave no MCP state for run {run_id}",
                                        run=run_id)
            mcp = {"gateway": gateway_mcp, "rows": state.mcp_rows,
                   "unrecorded": state.mcp_unrecorded,
                   "unrecorded_by_outcome": dict(state.mcp_excess),
                   "budget_fired": state.mcp_budget_fired, "stdio": []}
            ends = state.stdio.gateway_ends() if state.stdio is not None else {}
            try:
                for server in state.stdio.servers if state.stdio is not None else []:
                    fds.append(os.dup(ends[server.name].fileno()))
                    mcp["stdio"].append({"name": server.name,
                                         "container_id": server.container_id,
                                         "pid": server.pid, "host_uid": server.host_uid})
            except OSError as exc:
                for fd in fds:
                    os.close(fd)
                raise EgressSetupFailed(f"run {run_id}: its MCP servers' ends: {exc}",
                                        run=run_id) from exc
        del self.runs[run_id]
        network, grant = state.network, state.grant
        denials = _summed(state.carried_denials, reply.get("denials"))
        return {**({"mcp": mcp} if mcp is not None else {}),
                "ifname": network.ifname, "table": network.table,
                "host_ip": str(network.addresses.host_ip),
                "sandbox_ip": str(network.addresses.sandbox_ip),
                "prefixlen": network.addresses.prefixlen, "port": grant.port,
                "token": grant.token, "expires_at": grant.expires_at,
                "usage": Usage(**usage).as_dict(), "breaker": reply.get("breaker"),
                "budget_fired": bool(reply.get("budget_fired")),
                # Bounded in the record whatever the agent made the gateway refuse.
                "denials": fit_denials(denials, CARRIED_DENIALS_BYTES),
                "denial_rows": state.denial_rows}, fds

    async def adopt(self, run: RunRecord, policy: GatewayPolicy, entry: dict[str, Any],
                    fds: list[int] | None = None) -> RunNetwork:
        """Take over the gateway session of a run the previous daemon handed over (its `entry`
        of the record, from `hand_over`): the same link and nft table (which must still be
        there), the same address, port and token (what the agent holds), the routes, allow
        list, budgets and approval rules of its profile as this daemon reads it, and their
        secrets read again from this daemon's configuration; a gateway worker of this daemon
        listens for it with the counts and decisions carried over; its stdio MCP servers
        (still running in their sandboxes) are checked and reached through `fds` (the
        daemon's ends handed over, in the order of `entry["mcp"]["stdio"]`; duplicated here,
        the caller closes its own). EgressSetupFailed (or GatewayUnavailable) when any part
        cannot be had; nothing of it is left registered (the run's reaping kills the
        servers)."""
        mcp = entry.get("mcp")
        if bool(policy.mcp.servers) != (mcp is not None):
            raise EgressSetupFailed("its profile now names MCP servers the run did not have, "
                                    "or none where the run had some", run=run.id)
        mcp_carried = mcp_carried_from_wire(mcp["gateway"]) if mcp is not None and \
            mcp.get("gateway") is not None else None
        ifname, table = str(entry["ifname"]), str(entry["table"])
        if (ifname != link.host_ifname(run.container_id)
                or table != nft.table_name(self.config.sandbox.name_prefix, run.id)):
            raise EgressSetupFailed(f"the record names link {ifname} and table {table}, not "
                                    f"the run's own", run=run.id)
        addresses = link.LinkAddresses(host_ip=ipaddress.IPv4Address(entry["host_ip"]),
                                       sandbox_ip=ipaddress.IPv4Address(entry["sandbox_ip"]),
                                       prefixlen=int(entry["prefixlen"]))
        present = await self.loop.run_in_executor(
            None, lambda: {f"link {ifname}": link.exists(ifname),
                           f"nft table {table}": nft.exists(table)})
        if gone := [what for what, there in present.items() if not there]:
            raise EgressSetupFailed(f"its {' and '.join(gone)} {'is' if len(gone) == 1 else 'are'}"
                                    f" gone", run=run.id)
        secret_values = self._secret_values(policy)
        secret_values.update(self._mcp_secrets(policy))
        carried = Carried(usage=Usage(**entry["usage"]), breaker=entry["breaker"],
                          budget_fired=bool(entry["budget_fired"]),
                          suspended=run.state == RunState.PAUSED.value,
                          mcp=mcp_carried or (McpCarried() if mcp is not None else None))
        grant = RunGrant(run_id=run.id, agent=run.agent, token=str(entry["token"]),
                         expires_at=float(entry["expires_at"]), policy=policy,
                         host_ip=str(addresses.host_ip), port=int(entry["port"]),
                         secrets=secret_values, agent_usage=self._agent_usage(run.agent))
        if not self.pool.reserve(addresses):
            raise EgressSetupFailed(f"address {addresses.host_ip} is held by another run",
                                    run=run.id)
        stdio: RunServers | None = None
        generation = self.worker.generation
        try:
            if mcp is not None:
                stdio = await self._adopt_stdio(run, policy, mcp.get("stdio"), fds or [])
            await self.worker.ensure_up()
            generation = self.worker.generation
            reply = await self.worker.request({"op": "open", "grant": grant_to_wire(grant),
                                               "carried": carried_to_wire(carried),
                                               "stdio": self._pass_stdio(stdio)})
        except GatewayUnavailable:
            self._release_unless_held(addresses, generation)
            _let_go(stdio)
            raise
        except BaseException:
            self.pool.release(addresses)
            _let_go(stdio)
            raise
        if not reply.get("ok"):
            self.pool.release(addresses)
            _let_go(stdio)
            raise EgressSetupFailed(f"the gateway cannot listen on {grant.host_ip}:"
                                    f"{grant.port}: {reply.get('error')}", run=run.id,
                                    errno=reply.get("errno"))
        network = RunNetwork(run.id, ifname, table, addresses, grant.port)
        network.stdio = stdio
        state = _RunEgress(network, grant, generation,
                           denial_rows=int(entry.get("denial_rows", 0)),
                           carried_denials={str(k): int(v) for k, v in
                                            dict(entry.get("denials") or {}).items()},
                           stdio=stdio)
        if mcp is not None:
            _carry_mcp_audit(state, mcp, mcp_carried)
        state.snapshot = {"usage": carried.usage.as_dict(), "breaker": carried.breaker,
                          "denials": {}}
        self.runs[run.id] = state
        return network

    def _mcp_secrets(self, policy: GatewayPolicy) -> dict[str, str]:
        """Each MCP server's credential, as this daemon's configuration names it now."""
        # aiohttp comes with the MCP gateway module: a run without the gateway never loads it.
        from supervisor.mcp.gateway import secret_key as mcp_secret_key

        return {mcp_secret_key(server.name): load_secret(server.secret,
                                                         self.config.egress.secrets_dir)
                for server in policy.mcp.servers if server.secret is not None}

    async def _adopt_stdio(self, run: RunRecord, policy: GatewayPolicy, carried: Any,
                           fds: list[int]) -> RunServers | None:
        """The run's stdio MCP servers as the previous daemon left them: the same servers its
        profile names, each container still running with the init the record names, inside
        its own cgroup (held from here on), and a duplicate of the daemon's end of its
        socketpair. EgressSetupFailed (naming what is missing) otherwise."""
        wanted = [server.name for server in policy.mcp.stdio_servers]
        if not isinstance(carried, list) or len(carried) != len(fds) or \
                [c.get("name") if isinstance(c, dict) else None for c in carried] != wanted:
            raise EgressSetupFailed(f"its stdio MCP servers are not those its profile names "
                                    f"({', '.join(wanted) or 'none'})", run=run.id)
        if not wanted:
            return None
        from supervisor.mcp.sandbox import RunServers

        servers = RunServers(run.id)
        try:
            for index, (entry, fd) in enumerate(zip(carried, fds, strict=True)):
                servers.servers.append(await self._adopt_server(run, index, entry, fd))
        except BaseException:
            _let_go(servers)
            raise
        return servers

    async def _adopt_server(self, run: RunRecord, index: int, entry: dict[str, Any],
                            fd: int) -> StdioServer:
        name = str(entry["name"])
        container_id = f"{self.config.sandbox.name_prefix}-{run.id}-mcp{index}"
        pid = entry.get("pid")
        if entry.get("container_id") != container_id or not isinstance(pid, int) \
                or isinstance(pid, bool) or entry.get("host_uid") != \
                self.stdio.host_uid(run.uid_slot, index):
            raise EgressSetupFailed(f"MCP server {name}: the record does not describe the "
                                    f"run's own server {container_id}", run=run.id)
        state = await self.stdio.runc.state(container_id)
        if state is None or state.status != "running" or state.pid != pid:
            raise EgressSetupFailed(f"MCP server {name}: runc state of {container_id}: "
                                    f"{state.status if state else 'none'} (pid "
                                    f"{state.pid if state else '-'}, the record {pid})",
                                    run=run.id)
        cgroup = Cgroup(f"{self.stdio.cgroup_parent}/{container_id}")
        if not cgroup.exists() or pid not in cgroup.pids():
            raise EgressSetupFailed(f"MCP server {name}: pid {pid} is not in {cgroup.path}",
                                    run=run.id)
        from supervisor.mcp.sandbox import StdioServer

        server = StdioServer(name=name, container_id=container_id,
                             bundle=self.stdio.bundles_dir / container_id, cgroup=cgroup,
                             host_uid=int(entry["host_uid"]), pid=pid)
        try:
            cgroup.hold()
            server.gateway_end = socket.socket(fileno=os.dup(fd))
        except OSError as exc:
            cgroup.release()
            raise EgressSetupFailed(f"MCP server {name}: {exc}", run=run.id) from exc
        return server

    async def regrant(self, profiles: set[str], secret_refs: set[str]) -> list[dict[str, Any]]:
        """A reload changed `profiles` or the route secrets `secret_refs`: every running
        gateway run of such a profile, or with a route naming such a secret, gets its profile's
        routes, allow list, budgets and approval rules and the routes' secrets as they are now,
        for its next request (open tunnels are cut). What a run started with stays: its token
        and expiry (the old token_ttl), its breaker and MCP servers, and the rest of its profile
        (limits, tripwires, seccomp). A run the new profile or a secret cannot serve keeps what
        it has, and says why. One report per run reached, for the reload's audit row (names
        only, never a value)."""
        reports: list[dict[str, Any]] = []
        for run_id, state in list(self.runs.items()):
            live = self.arbiter.live.get(run_id)
            old = state.grant.policy
            if live is None or live.profile is None or state.revoked or state.lost:
                continue
            name = live.profile.name
            if name not in profiles and not {r.secret for r in old.routes} & secret_refs:
                continue
            report: dict[str, Any] = {"run": run_id, "agent": state.grant.agent,
                                      "profile": name}
            reports.append(report)
            try:
                grant = self._regranted(state.grant, name)
            except SupervisorError as exc:
                report["kept"] = exc.message
                continue
            try:
                reply = await self.worker.request({"op": "regrant", "run": run_id,
                                                   "grant": grant_to_wire(grant)})
            except GatewayUnavailable as exc:
                report["kept"] = exc.message
                continue
            if not reply.get("ok"):
                report["kept"] = "the run's gateway session has ended"
                continue
            state.grant = grant
            report["routes"] = [route.name for route in grant.policy.routes]
        return reports

    def _regranted(self, grant: RunGrant, profile_name: str) -> RunGrant:
        config = self.arbiter.config
        profile = load_profile(profile_name, config.daemon.profile_dirs)
        if profile.network.mode != "gateway":
            raise EgressSetupFailed(f"profile {profile_name!r} no longer uses the gateway; "
                                    f"the run keeps its network until it ends")
        old = grant.policy
        policy = profile.network.gateway.model_copy(update={
            "token_ttl": old.token_ttl, "breaker": old.breaker, "mcp": old.mcp})
        # The MCP servers' credentials stay the run's own; the routes' are read again.
        secret_values = {key: value for key, value in grant.secrets.items()
                         if key not in {route.name for route in old.routes}}
        secret_values.update({route.name: load_secret(route.secret, config.egress.secrets_dir)
                              for route in policy.routes})
        return dataclasses.replace(grant, policy=policy, secrets=secret_values)

    async def _start_stdio(self, live: LiveRun) -> RunServers | None:
        """The run's stdio MCP servers, each in its sandbox (none started: a launch failure
        that leaves nothing)."""
        assert live.profile is not None
        servers = live.profile.network.gateway.mcp.stdio_servers
        if not servers:
            return None
        try:
            return await self.stdio.start(live.record.id, live.record.uid_slot, servers)
        except (OSError, RuntimeFailure, EnforcementError) as exc:
            raise EgressSetupFailed(f"run {live.record.id}: an MCP stdio server could not be "
                                    f"started: {exc}", run=live.record.id) from exc

    def _pass_stdio(self, stdio: RunServers | None) -> dict[str, str]:
        """Each server's gateway end to the worker; the keys the `open` names them by."""
        keys: dict[str, str] = {}
        for name, sock in (stdio.gateway_ends() if stdio is not None else {}).items():
            key = f"{stdio.run_id if stdio else ''}/{name}/{secrets.token_hex(4)}"
            if not self.worker.send_fds(key, sock.fileno()):
                raise GatewayUnavailable("the gateway worker cannot take the MCP servers' "
                                         "descriptors")
            keys[name] = key
        return keys

    async def _reap_stdio(self, stdio: RunServers | None) -> None:
        if stdio is None:
            return
        done = await self.stdio.reap(stdio)
        if any(not isinstance(d, dict) or d.get("confirmed_empty") is False
               for d in done.values()):
            log.error("run %s: MCP stdio servers not cleanly removed: %s", stdio.run_id, done)

    def _release_unless_held(self, addresses: link.LinkAddresses, generation: int) -> None:
        """An address may go back to the pool only once no worker can be listening on it: the
        one asked is gone (a timed-out request kills it) or never got the request."""
        if self.worker.generation != generation or not self.worker.up:
            self.pool.release(addresses)
        else:
            self.loop.create_task(self._release_after_exit(addresses, generation))

    async def _release_after_exit(self, addresses: link.LinkAddresses, generation: int) -> None:
        while self.worker.generation == generation and self.worker.up:
            await asyncio.sleep(0.5)
        self.pool.release(addresses)

    def mcp_counter(self, run_id: str) -> Callable[[], tuple[int, float]] | None:
        """For telemetry's mcp_calls and mcp_cost, if the run may reach MCP servers."""
        state = self.runs.get(run_id)
        if state is None or not state.grant.policy.mcp.servers:
            return None
        return lambda: (state.mcp_calls, state.mcp_cost)

    def network_counter(self, run_id: str) -> Callable[[], tuple[int, int]] | None:
        """For telemetry's network_bytes: the run's veth counters, if it has a veth."""
        state = self.runs.get(run_id)
        if state is None:
            return None
        ifname = state.network.ifname
        return lambda: link.counters(ifname)

    async def revoke(self, run_id: str) -> bool:
        """Kill step 2 (supervisor/daemon/killpath.py `Credentials`): one message to the worker
        and a local record, no wait for an answer. A worker that is hung cannot delay the
        kill; one that cannot take the message is killed, which revokes everything it held;
        and step 5 removes the veth whatever the worker does."""
        state = self.runs.get(run_id)
        if state is None:
            return False
        state.revoked = True
        self.worker.send({"op": "revoke", "run": run_id})
        self._cancel_approvals(run_id, "the run was stopped or killed")
        return True

    def revocation_check(self, run_id: str) -> TokenCheck | None:
        state = self.runs.get(run_id)
        if state is None:
            return None
        check = self.checks[run_id] = TokenCheck(self, run_id, state.grant.agent,
                                                 state.grant.token)
        return check

    async def pause(self, run_id: str) -> None:
        state = self.runs.get(run_id)
        if state is None:
            return
        self.worker.send({"op": "suspend", "run": run_id})
        self._cancel_approvals(run_id, "the agent was paused")
        await self.loop.run_in_executor(None, state.network.set_up, False)

    async def resume(self, run_id: str) -> None:
        state = self.runs.get(run_id)
        if state is None:
            return
        await self.loop.run_in_executor(None, state.network.set_up, True)
        self.worker.send({"op": "resume", "run": run_id})

    def run_ended(self, run_id: str) -> None:
        state = self.runs.pop(run_id, None)
        if state is None:
            return
        if not state.revoked:  # a run that ended on its own (a kill revoked at step 2)
            self.worker.send({"op": "revoke", "run": run_id})
        self._keep_record(run_id, self._record(state))
        self._cancel_approvals(run_id, "the run ended")
        task = self.loop.create_task(self._finish(run_id, state))
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)
        if state.stdio is not None:
            state.stdio.kill()  # ended without a network teardown (a failed launch): now
            reaping = self.loop.create_task(self._reap_stdio(state.stdio))
            self._finishing.add(reaping)
            reaping.add_done_callback(self._finishing.discard)

    async def _finish(self, run_id: str, state: _RunEgress) -> None:
        if (check := self.checks.get(run_id)) is not None:
            await check.released()  # a drill presents the token before the listener goes
        if not state.lost and state.generation == self.worker.generation:
            try:
                reply = await self.worker.request({"op": "close", "run": run_id})
            except GatewayUnavailable:
                pass  # killed for not answering: its listeners are gone with it
            else:
                if reply.get("usage") is not None:
                    state.snapshot = reply
        # Only now, with the listener closed (or its worker gone), may another run get this
        # address and port.
        self.pool.release(state.network.addresses)
        usage = state.usage()
        self._keep_record(run_id, self._record(state))
        self._add_agent_usage(state.grant.agent, usage)
        self.audit.append(
            actor=GATEWAY.label(), verb="egress_summary", scope=f"agent:{state.grant.agent}",
            target=state.grant.agent, detail={"run": run_id, "usage": usage.as_dict(),
                                              "denials": fit_denials(self._denials(state)),
                                              **_mcp_summary(state),
                                              **({"gateway_lost": True} if state.lost else {})})

    # ------------------------------------------------------------------ the worker's reports

    def _on_event(self, message: dict[str, Any]) -> None:
        op = message["op"]
        run_id = str(message.get("run", ""))
        if op == "usage":
            self.dropped_events = int(message.get("dropped", 0))
            for reported, snapshot in dict(message.get("runs") or {}).items():
                state = self.runs.get(str(reported))
                if state is not None and isinstance(snapshot, dict):
                    state.snapshot = snapshot
        elif op == "budget":
            self._fire_budget(run_id, dict(message["detail"]))
        elif op == "breaker":
            self._fire_breaker(run_id, dict(message["detail"]))
        elif op == "denied":
            self._audit_denial(run_id, str(message["code"])[:64], _clipped(message["detail"]))
        elif op == "mcp":
            self._audit_mcp(run_id, _clipped(message["detail"]))
        elif op == "approval":
            self._hold(str(message["id"])[:16], run_id, str(message["method"])[:16],
                       str(message["host"])[:300], str(message["path"])[:1000],
                       str(message["rule"])[:300])
        elif op == "withdrawn":
            self._withdraw(str(message["id"]))
        else:
            log.error("unknown report %r from the gateway worker", op)

    def _on_worker_exit(self, exit_info: dict[str, Any]) -> None:
        """Every run behind the dead worker has lost its listener, and so its network (nft
        lets its veth reach nothing else); say so in the audit log. New gateway runs wait for
        the restart (GatewayUnavailable meanwhile)."""
        lost = sorted(run_id for run_id, state in self.runs.items()
                      if state.generation == exit_info["generation"])
        for run_id in lost:
            self.runs[run_id].lost = True
            self._cancel_approvals(run_id, "the egress gateway stopped")
        self.audit.append(actor="system:supervisor", verb="gateway_exited", scope="global",
                          target="egress-gateway", outcome="restarting",
                          reason=f"the egress gateway worker exited: {exit_info['reason']}",
                          detail={**exit_info, "runs_without_network": lost})

    def _fire_budget(self, run_id: str, detail: dict[str, Any]) -> None:
        if run_id not in self.runs:
            return
        firing = Firing(rule="egress_budget", metric=f"egress_{detail['metric']}",
                        value=detail["value"], threshold=detail["limit"],
                        action=detail["action"],
                        reason=(f"tripwire egress_budget: the {detail['budget']} budget is spent"
                                f" ({detail['metric']} {detail['value']:.6g} >= "
                                f"{detail['limit']:.6g})"),
                        sample_ts=time.time())
        self.containment.fire(run_id, firing, {"budget": detail["budget"],
                                               "usage": detail["usage"]})

    def _fire_breaker(self, run_id: str, detail: dict[str, Any]) -> None:
        state = self.runs.get(run_id)
        if state is None:
            return
        state.snapshot = {**state.snapshot, "breaker": detail["reason"],
                          "usage": detail["usage"]}
        firing = Firing(rule="egress_breaker", metric="egress_breaker", value=1.0, threshold=1.0,
                        action="pause",
                        reason=f"tripwire egress_breaker: circuit breaker open: {detail['reason']}",
                        sample_ts=time.time())
        self.containment.fire(run_id, firing, {"breaker": detail["reason"],
                                               "usage": detail["usage"]})

    def _audit_denial(self, run_id: str, code: str, detail: dict[str, Any]) -> None:
        """The gateway reports the first refusal of each (code, target), clipped, and counts
        all of them (usage snapshots carry the tally; the run's egress_summary the totals)."""
        state = self.runs.get(run_id)
        if state is None or state.denial_rows >= _DENIAL_ROWS_PER_RUN:
            return
        state.denial_rows += 1
        agent = state.grant.agent
        self.audit.append(actor=GATEWAY.label(), verb="egress_denied", scope=f"agent:{agent}",
                          target=agent, outcome=f"refused:{code}",
                          detail={"run": run_id, **detail})

    def _audit_mcp(self, run_id: str, detail: dict[str, Any]) -> None:
        """One MCP decision (supervisor/mcp/gateway.py): an audit row (and so an event and the
        metrics); a spent MCP budget fires like the egress budget."""
        state = self.runs.get(run_id)
        if state is None:
            return
        agent = state.grant.agent
        _count_mcp(state, detail)
        if state.mcp_rows >= _MCP_ROWS_PER_RUN:
            state.mcp_unrecorded += 1
            outcome = str(detail.get("outcome", ""))[:16]
            reason = str(detail.get("reason", ""))[:64]
            key = f"{outcome}:{reason}" if reason else outcome
            if key not in state.mcp_excess and len(state.mcp_excess) >= _MCP_EXCESS_KEYS:
                key = "other"
            state.mcp_excess[key] = state.mcp_excess.get(key, 0) + 1
        else:
            state.mcp_rows += 1
            outcome = str(detail.get("outcome", ""))[:16]
            reason = str(detail.get("reason", ""))[:64]
            self.audit.append(actor=GATEWAY.label(), verb="mcp_call", scope=f"agent:{agent}",
                              target=agent, outcome=f"{outcome}:{reason}" if reason else outcome,
                              reason=str(detail.get("message", ""))[:300],
                              detail={"run": run_id, **detail})
        if detail.get("reason") == "budget_exhausted" and not state.mcp_budget_fired:
            state.mcp_budget_fired = True
            action = state.grant.policy.budget.action
            firing = Firing(rule="mcp_budget", metric="mcp_calls",
                            value=float(detail.get("calls") or 0), threshold=0.0, action=action,
                            reason=f"tripwire mcp_budget: {detail.get('rule')}: "
                                   f"{str(detail.get('message', ''))[:200]}",
                            sample_ts=time.time())
            self.containment.fire(run_id, firing, {"mcp": {
                "calls": detail.get("calls"), "cost": detail.get("cost")}})

    def _hold(self, approval_id: str, run_id: str, method: str, host: str, path: str,
              rule: str) -> None:
        state = self.runs.get(run_id)
        if (state is None or state.revoked or state.lost or approval_id in self.approvals
                or len(self.approvals) >= _MAX_PENDING_APPROVALS):
            # A hold that crossed the revocation on the channel: nobody may approve it.
            self.worker.send({"op": "decide", "approval": approval_id, "approved": False,
                              "by": "system:supervisor",
                              "reason": "the run's token was revoked, the run has ended, or "
                                        "too many requests are waiting for an operator"})
            return
        now = time.time()
        timeout = state.grant.policy.approval_timeout
        from supervisor.models.views import Approval

        request = Approval(id=approval_id, run=run_id, agent=state.grant.agent,
                           method=method, host=host, path=path, rule=rule, requested_at=now,
                           expires_at=now + timeout)
        approval = PendingApproval(request)
        self.approvals[request.id] = approval
        approval.timer = self.loop.call_later(timeout, self._expire, request.id)
        self.audit.append(actor=GATEWAY.label(), verb="approval_requested",
                          scope=f"agent:{request.agent}", target=request.agent,
                          reason=f"{method} {host}{path} matches approval rule '{rule}'",
                          outcome="pending", detail=approval.view())

    def _expire(self, approval_id: str) -> None:
        approval = self.approvals.get(approval_id)
        if approval is not None:
            held = approval.request.expires_at - approval.request.requested_at
            self._decide(approval, False, "system:gateway", f"no answer within {held:g}s",
                         "expired")

    def _withdraw(self, approval_id: str) -> None:
        """The agent hung up while its request was held: nobody waits for an answer any more."""
        approval = self.approvals.get(approval_id)
        if approval is not None:
            self._decide(approval, False, "system:gateway", "the agent hung up", "cancelled")

    def _cancel_approvals(self, run_id: str, reason: str) -> None:
        for approval in [a for a in self.approvals.values() if a.request.run == run_id]:
            self._decide(approval, False, "system:supervisor", reason, "cancelled")

    def _decide(self, approval: PendingApproval, approved: bool, by: str, reason: str,
                outcome: str) -> None:
        request = approval.request
        self.approvals.pop(request.id, None)
        approval.decided = True
        if approval.timer is not None:
            approval.timer.cancel()
        self.audit.append(actor=by, verb="approval_granted" if approved else "approval_denied",
                          scope=f"agent:{request.agent}", target=request.agent, reason=reason,
                          outcome=outcome, detail=approval.view())
        # The held request lives in the worker; a worker that is gone took it along.
        self.worker.send({"op": "decide", "approval": request.id, "approved": approved,
                          "by": by, "reason": reason})

    # ------------------------------------------------------------------ operators (API)

    def list_approvals(self) -> list[dict[str, Any]]:
        return [a.view() for a in sorted(self.approvals.values(),
                                         key=lambda a: a.request.requested_at)]

    def decide(self, approval_id: str, approved: bool, actor: Actor, reason: str
               ) -> dict[str, Any]:
        if not approved and not reason.strip():
            raise InvalidRequest("a denial needs a reason (the agent is told it)",
                                 field="reason")
        approval = self.approvals.get(approval_id)
        if approval is None:
            raise ApprovalNotFound(f"no pending approval {approval_id!r} (it may have been "
                                   f"decided, expired or cancelled; see the audit log)",
                                   approval=approval_id)
        if approval.decided:
            raise ApprovalDecided(f"approval {approval_id} was already decided",
                                  approval=approval_id)
        self._decide(approval, approved, actor.label(), reason,
                     "approved" if approved else "denied")
        return approval.request.model_copy(
            update={"approved": approved, "by": actor.label(), "reason": reason}).model_dump()

    async def reset_breaker(self, agent: str, actor: Actor, reason: str) -> dict[str, Any]:
        record = self.arbiter.agents.get(agent)
        run_id = record.current_run if record else None
        state = self.runs.get(run_id) if run_id is not None else None
        if record is None or run_id is None or state is None or state.lost:
            raise IllegalTransition(f"agent {agent!r} has no run behind the egress gateway",
                                    agent=agent)
        reply = await self.worker.request({"op": "reset_breaker", "run": run_id},
                                          kill_on_timeout=False)
        tripped = reply.get("was")
        if tripped is None:
            raise BreakerNotTripped(f"the circuit breaker of agent {agent!r} is not open",
                                    agent=agent, run=run_id)
        state.snapshot = {**state.snapshot, "breaker": None}
        self.audit.append(actor=actor.label(), verb="breaker_reset", scope=f"agent:{agent}",
                          target=agent, reason=reason,
                          detail={"run": run_id, "was": tripped, "actor": actor.label()})
        return {"agent": agent, "run": run_id, "was": tripped}

    def open_breakers(self) -> int:
        """Gateway runs whose circuit breaker is open, as the worker last reported (metrics)."""
        return sum(1 for state in self.runs.values() if state.snapshot.get("breaker"))

    async def usage(self, run_id: str) -> dict[str, Any] | None:
        state = self.runs.get(run_id)
        if state is None:
            return None
        if not state.lost:
            with contextlib.suppress(GatewayUnavailable):
                reply = await self.worker.request({"op": "usage", "runs": [run_id]},
                                                  timeout=_READ_TIMEOUT, kill_on_timeout=False)
                if run_id in (reply.get("runs") or {}) and run_id in self.runs:
                    state.snapshot = reply["runs"][run_id]
        usage = state.usage()
        return {"run": run_id, "agent": state.grant.agent, "usage": usage.as_dict(),
                "agent_total": state.grant.agent_usage.add(usage).as_dict(),
                "breaker": state.snapshot.get("breaker"),
                "gateway": f"{state.grant.host_ip}:{state.grant.port}",
                "token_expires_at": state.grant.expires_at,
                "pending_approvals": [a.request.id for a in self.approvals.values()
                                      if a.request.run == run_id]}

    def run_record(self, run_id: str) -> dict[str, Any] | None:
        """A run's egress for a CI report: calls, bytes, spend, refusals; None without one."""
        state = self.runs.get(run_id)
        if state is not None:
            return self._record(state)
        return self.records.get(run_id)

    def _denials(self, state: _RunEgress) -> dict[str, int]:
        """The worker's tally, with what an adopted run's previous worker had counted."""
        return _summed(state.carried_denials, state.snapshot.get("denials"))

    def _record(self, state: _RunEgress) -> dict[str, Any]:
        usage = state.usage()
        return {"gateway": f"{state.grant.host_ip}:{state.grant.port}",
                "calls": usage.requests, "bytes": usage.bytes, "spend": round(usage.spend, 9),
                "tokens": usage.tokens, "errors": usage.errors, "denied": usage.denied,
                "denials": self._denials(state), "breaker": state.snapshot.get("breaker"),
                # Each call through a route (supervisor/egress/calls.py), in the worker's
                # answer to the run's close; None until then.
                "model_calls": state.snapshot.get("calls")}

    def _keep_record(self, run_id: str, record: dict[str, Any], kept: int = 256) -> None:
        """Ended runs' records, for CI reports; the oldest go past `kept` (a record carries
        up to egress/calls.py's MAX_CALLS call entries, and a daemon ends runs for months)."""
        self.records.pop(run_id, None)
        self.records[run_id] = record
        while len(self.records) > kept:
            del self.records[next(iter(self.records))]

    # ------------------------------------------------------------------ agent usage (SQLite)

    def _agent_usage(self, agent: str) -> Usage:
        row = self.db.execute("SELECT requests, bytes, spend, tokens FROM egress_usage "
                              "WHERE agent = ?", (agent,)).fetchone()
        return Usage(requests=row[0], bytes=row[1], spend=row[2], tokens=row[3]) if row \
            else Usage()

    def _add_agent_usage(self, agent: str, usage: Usage) -> None:
        with self.db:
            self.db.execute(
                "INSERT INTO egress_usage (agent, requests, bytes, spend, tokens, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(agent) DO UPDATE SET "
                "requests = requests + excluded.requests, bytes = bytes + excluded.bytes, "
                "spend = spend + excluded.spend, tokens = tokens + excluded.tokens, "
                "updated_at = excluded.updated_at",
                (agent, usage.requests, usage.bytes, usage.spend, usage.tokens, time.time()))

