"""The control-socket client agentctl uses. HTTP/1.1 over AF_UNIX through `api/wire.py`
(standard library sockets only), so the CLI starts fast and never imports daemon code. No
privilege beyond access to the socket."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, cast

from supervisor.api import wire
from supervisor.errors import DaemonUnavailable, StreamEnded, SupervisorError, error_from_wire

if TYPE_CHECKING:  # the shapes are types only: agentctl's start does not build them
    from supervisor.api.shapes import (
        JSON,
        ActionRequest,
        ActionResult,
        AgentList,
        AgentView,
        Approval,
        ApprovalList,
        AuditList,
        AuditVerifyResult,
        BreakerReset,
        DrillList,
        DrillRequest,
        DrillResult,
        EgressView,
        ForgetResult,
        Health,
        ReloadResult,
        RunRequest,
        RunView,
        Scope,
        TelemetryView,
    )

# The header naming a follow stream's end mark (supervisor/api/server.py, FollowStreams),
# and the one saying at which byte of the run's output an answer of GET .../logs starts.
STREAM_END_HEADER = "X-Stream-End"
LOG_OFFSET_HEADER = "X-Log-Offset"
# On a state-changing answer: the audit rows it appended were not yet durable when the daemon
# answered (it waits at most 5 s for them: a full disk with its reserve spent, a failing writer).
# The action was carried out; its rows stay queued and are committed once the writer can.
AUDIT_PENDING_HEADER = "X-Audit-Pending"
_ENDINGS = ("restarting", "stopping")

# A request body: one of the request shapes (supervisor/api/shapes.py), sent as JSON.
Body = Mapping[str, object]

DEFAULT_SOCKET = Path(os.environ.get("AGENT_SUPERVISOR_SOCKET",
                                     "/run/agent-supervisor/control.sock"))


def owner_socket_of(control_socket: Path) -> Path:
    """The owners' socket the daemon binds beside its control socket."""
    return control_socket.with_name(f"{control_socket.stem}-owner{control_socket.suffix}")


# Connecting to the owners' socket failed (absent, not ours, or refused at accept before a
# byte was read): the request was not acted on, so it goes to the control socket instead.
_NOT_ON_OWNER_SOCKET = (FileNotFoundError, PermissionError, ConnectionRefusedError,
                        ConnectionResetError, BrokenPipeError)


class Client:
    def __init__(self, socket_path: Path | str = DEFAULT_SOCKET, timeout: float | None = 300.0
                 ) -> None:
        self.socket_path = str(socket_path)
        # State-changing requests try the owners' socket first: a flood of the control socket
        # by callers with lesser roles cannot queue in front of them there.
        self.owner_socket_path = str(owner_socket_of(Path(socket_path)))
        self.timeout = timeout
        # The last answer said its audit rows were not yet durable (AUDIT_PENDING_HEADER).
        self.audit_pending = False

    def _open(self, method: str, path: str, body: Body | None = None,
              timeout: float | None = None) -> wire.Response:
        """Send the request; connection failures become DaemonUnavailable."""
        timeout = timeout if timeout is not None else self.timeout
        if method not in ("GET", "HEAD"):
            try:
                return wire.request(self.owner_socket_path, method, path, body, timeout)
            except _NOT_ON_OWNER_SOCKET:
                pass
        try:
            return wire.request(self.socket_path, method, path, body, timeout)
        except FileNotFoundError:
            raise DaemonUnavailable(
                f"no control socket at {self.socket_path}: is agent-supervisord running?",
                socket=self.socket_path) from None
        except PermissionError:
            raise DaemonUnavailable(
                f"permission denied on {self.socket_path}: you need root or the operators "
                f"group", socket=self.socket_path) from None
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise DaemonUnavailable(
                f"the daemon at {self.socket_path} closed the connection: {exc}",
                hint="it may be at its connection limit for your uid or in total "
                     "([control] in the daemon's config); retry shortly",
                socket=self.socket_path) from None
        except OSError as exc:  # refused, timed out, or not HTTP (wire.BadResponse)
            raise DaemonUnavailable(f"cannot talk to the daemon at {self.socket_path}: {exc}",
                                    socket=self.socket_path) from None

    def request(self, method: str, path: str, body: Body | None = None) -> JSON:
        """One request; the decoded JSON answer, or the daemon's error raised as its
        SupervisorError. The typed verbs below name the answer's shape."""
        resp = self._open(method, path, body)
        self.audit_pending = AUDIT_PENDING_HEADER.lower() in resp.headers
        try:
            data = resp.read()
        except OSError as exc:
            raise DaemonUnavailable(f"cannot read the daemon's answer at {self.socket_path}: "
                                    f"{exc}", socket=self.socket_path) from None
        finally:
            resp.close()
        try:
            decoded = _loads(data) if data else None
        except json.JSONDecodeError:
            raise SupervisorError(f"the daemon answered {resp.status} with non-JSON",
                                  status=resp.status) from None
        if resp.status >= 400:
            raise _error_from(decoded, resp.status)
        return decoded

    def stream(self, path: str, where: dict[str, int] | None = None) -> Iterator[bytes]:
        """The body as it arrives. A follow stream the daemon ends before the run did (it is
        restarting or stopping) raises StreamEnded with the daemon's notice (detail: why,
        run, midline). `where["offset"]`, when given, is kept at the byte of the run's
        output that comes next."""
        resp = self._open("GET", path, timeout=None)
        try:
            if resp.status >= 400:
                raise _error_from(_loads(resp.read() or b"null"), resp.status)
            if where is not None:
                where["offset"] = int(resp.headers.get(LOG_OFFSET_HEADER.lower()) or 0)
            # api/server.py FollowStreams: the notice is one chunk ending with this mark.
            mark = resp.headers.get(STREAM_END_HEADER.lower(), "").encode("latin-1")
            ends = {b" [" + why.encode() + b" " + mark + b"]\n": why for why in _ENDINGS}
            for chunk in resp.iter_body():
                for end, why in ends.items() if mark else ():
                    if chunk.endswith(end):
                        raise _stream_ended(chunk[:-len(end)], why, resp.headers,
                                            self.socket_path)
                if where is not None:
                    where["offset"] += len(chunk)
                yield chunk
        finally:
            resp.close()

    # Verbs --------------------------------------------------------------------------------

    def health(self) -> Health:
        return cast("Health", self.request("GET", "/v1/health"))

    def agents_page(self, limit: int | None = None, cursor: str | None = None,
                    agent_class: str | None = None, state: str | None = None) -> AgentList:
        """One page of GET /v1/agents (the daemon's default page size unless `limit`)."""
        from urllib.parse import urlencode

        query = {k: v for k, v in (("limit", limit), ("cursor", cursor), ("class", agent_class),
                                   ("state", state)) if v is not None}
        return cast("AgentList", self.request(
            "GET", "/v1/agents" + (f"?{urlencode(query)}" if query else "")))

    def agents(self, agent_class: str | None = None, state: str | None = None,
               page_size: int | None = None) -> AgentList:
        """Every agent (matching the filters), page after page, as one list."""
        page = self.agents_page(page_size, None, agent_class, state)
        agents = list(page["agents"])
        seen = 1
        while page.get("next_cursor") and seen < 10_000:
            page = self.agents_page(page_size, page["next_cursor"], agent_class, state)
            agents.extend(page["agents"])
            seen += 1
        return {**page, "agents": agents, "total": len(agents), "next_cursor": None}

    def agent(self, name: str) -> AgentView:
        return cast("AgentView", self.request("GET", f"/v1/agents/{_quote(name)}"))

    def run(self, body: RunRequest) -> RunView:
        return cast("RunView", self.request("POST", "/v1/runs", body))

    def get_run(self, ref: str) -> RunView:
        return cast("RunView", self.request("GET", f"/v1/runs/{_quote(ref)}"))

    def logs(self, ref: str, follow: bool = False, tail: int | None = None,
             since: float | None = None, offset: int | None = None,
             where: dict[str, int] | None = None) -> Iterator[bytes]:
        """A run's output (`offset`: from that byte on, instead of tail and since); `where`
        as in `stream`."""
        query = f"follow={'1' if follow else '0'}" + (f"&tail={tail}" if tail is not None else "")
        if since is not None:
            query += f"&since={since:.3f}"
        if offset is not None:
            query += f"&offset={offset}"
        return self.stream(f"/v1/runs/{_quote(ref)}/logs?{query}", where)

    def telemetry(self, ref: str, limit: int = 20) -> TelemetryView:
        return cast("TelemetryView", self.request(
            "GET", f"/v1/runs/{_quote(ref)}/telemetry?limit={limit}"))

    def action(self, verb: str, scope: Scope, reason: str = "",
               grace: str | None = None) -> ActionResult:
        body: ActionRequest = {"scope": scope, "reason": reason}
        if grace is not None:
            body["grace"] = grace
        return cast("ActionResult", self.request("POST", f"/v1/actions/{verb}", body))

    def audit(self, limit: int = 100, after: int = 0) -> AuditList:
        return cast("AuditList", self.request("GET", f"/v1/audit?limit={limit}&after={after}"))

    def drill(self, processes: int | None = None, slo: str | None = None) -> DrillResult:
        body: DrillRequest = {}
        if processes is not None:
            body["processes"] = processes
        if slo is not None:
            body["slo"] = slo
        return cast("DrillResult", self.request("POST", "/v1/drills", body))

    def reload(self, reason: str = "") -> ReloadResult:
        return cast("ReloadResult", self.request("POST", "/v1/reload", {"reason": reason}))

    def drills(self, limit: int = 50) -> DrillList:
        return cast("DrillList", self.request("GET", f"/v1/drills?limit={limit}"))

    def egress(self, ref: str) -> EgressView:
        return cast("EgressView", self.request("GET", f"/v1/runs/{_quote(ref)}/egress"))

    def approvals(self) -> ApprovalList:
        return cast("ApprovalList", self.request("GET", "/v1/approvals"))

    def decide(self, approval_id: str, approved: bool, reason: str = "") -> Approval:
        verb = "approve" if approved else "deny"
        return cast("Approval", self.request(
            "POST", f"/v1/approvals/{_quote(approval_id)}/{verb}", {"reason": reason}))

    def reset_breaker(self, agent: str, reason: str = "") -> BreakerReset:
        return cast("BreakerReset", self.request(
            "POST", f"/v1/agents/{_quote(agent)}/breaker/reset", {"reason": reason}))

    def forget(self, agent: str, reason: str = "") -> ForgetResult:
        return cast("ForgetResult", self.request(
            "POST", f"/v1/agents/{_quote(agent)}/forget", {"reason": reason}))

    def audit_verify(self) -> AuditVerifyResult:
        return cast("AuditVerifyResult", self.request("GET", "/v1/audit/verify"))


def _stream_ended(notice: bytes, why: str, headers: Mapping[str, str], socket_path: str
                  ) -> StreamEnded:
    """The daemon's notice as StreamEnded; `midline`: the output stopped inside a line."""
    text = notice.strip().decode("utf-8", errors="replace").removeprefix("agent-supervisor: ")
    return StreamEnded(text, why=why, run=headers.get("x-run-id", ""),
                       midline=notice.startswith(b"\n"), socket=socket_path)


def _loads(data: bytes) -> JSON:
    """The one place untyped JSON enters the client: json.loads's answer is named JSON."""
    decoded: JSON = json.loads(data)
    return decoded


def _quote(part: str) -> str:
    from urllib.parse import quote

    return quote(part, safe="")


def _error_from(decoded: JSON, status: int) -> SupervisorError:
    err = decoded.get("error") if isinstance(decoded, dict) else None
    if isinstance(err, dict):
        given = err.get("detail")
        return error_from_wire(err.get("code"), str(err.get("message", "")),
                               dict(given) if isinstance(given, dict) else {}, status)
    return SupervisorError(f"the daemon answered {status}", status=status)
