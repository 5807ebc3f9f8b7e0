"""The control API: HTTP/JSON on a Unix socket, the peer's identity from SO_PEERCRED.
Runs in the daemon (root); the socket is created 0660 root:<socket_group> and then moved into
place, so there is no moment at which it is reachable with looser permissions."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import logging
import os
import pwd
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web
from pydantic import BaseModel, ValidationError

from supervisor import __version__
from supervisor.audit import AuditLog
from supervisor.authz import PERMISSIONS, check, roles_of
from supervisor.config import RolesSection
from supervisor.errors import (
    Forbidden,
    InvalidJson,
    InvalidRequest,
    LogsExpired,
    RouteNotFound,
    SupervisorError,
)
from supervisor.models import (
    SCOPED_VERBS,
    ActionRequest,
    ActionResult,
    Actor,
    AgentView,
    Approval,
    ApprovalList,
    AuditList,
    DrillList,
    DrillRequest,
    DrillResult,
    EgressView,
    Health,
    ReasonRequest,
    RunRequest,
    RunView,
    TelemetrySummary,
    TelemetryView,
)
from supervisor.openapi import openapi_document
from supervisor.telemetry import Sample

log = logging.getLogger(__name__)


class LiveRunView(Protocol):
    done: asyncio.Event


class RunRecordView(Protocol):
    id: str
    log_path: str


class DrillRunner(Protocol):
    async def run(self, actor: Actor, processes: int | None = None,
                  slo: float | None = None) -> DrillResult: ...
    def history(self, limit: int = 50) -> list[DrillResult]: ...


class Controller(Protocol):
    """What the API needs of the daemon's arbiter (the daemon layer sits above this one)."""

    audit: AuditLog
    global_halt: bool
    shutting_down: bool

    @property
    def agents(self) -> Mapping[str, Any]: ...

    def agent_view(self, name: str) -> AgentView: ...
    def list_agents(self) -> list[AgentView]: ...
    def resolve_run(self, ref: str) -> tuple[Any, Any]: ...
    def run_view(self, run: Any) -> RunView: ...
    def active_runs(self) -> int: ...
    def runtime_info(self) -> dict[str, Any]: ...
    async def launch(self, request: RunRequest, actor: Actor) -> RunView: ...
    async def act(self, verb: str, request: ActionRequest, actor: Actor, *,
                  arrived: float | None = None) -> ActionResult: ...


class EgressSource(Protocol):
    """What the API needs of the egress gateway's daemon side (supervisor/daemon/egress.py)."""

    def list_approvals(self) -> list[dict[str, Any]]: ...
    def decide(self, approval_id: str, approved: bool, actor: Actor, reason: str
               ) -> dict[str, Any]: ...
    def reset_breaker(self, agent: str, actor: Actor, reason: str) -> dict[str, Any]: ...
    def usage(self, run_id: str) -> dict[str, Any] | None: ...


class TelemetrySource(Protocol):
    """What the API reads of the daemon's telemetry (supervisor/telemetry/sampler.py)."""

    def tracking(self, run_id: str) -> bool: ...
    def samples(self, run_id: str, limit: int) -> list[Sample]: ...
    def summary(self, run_id: str) -> TelemetrySummary | None: ...


ARBITER = web.AppKey("arbiter", Controller)
TELEMETRY = web.AppKey("telemetry", TelemetrySource)
ROLES = web.AppKey("roles", RolesSection)
DRILLS = web.AppKey("drills", DrillRunner)
EGRESS = web.AppKey("egress", EgressSource)
ACTOR = web.RequestKey("actor", Actor)
# perf_counter() when the request was read off the socket: a kill's time_to_halt_ms starts here,
# so time spent queued in the daemon is in the figure.
ARRIVED = web.RequestKey("arrived", float)
PEER_ROLES = web.RequestKey("roles", frozenset)
_PEERCRED = struct.Struct("3i")
_LOG_CHUNK = 65536
_LOG_POLL = 0.05


def peer_actor(request: web.Request) -> Actor:
    sock: socket.socket | None = request.transport.get_extra_info("socket") if request.transport \
        else None
    if sock is None:
        raise Forbidden("no peer credentials on this connection")
    pid, uid, gid = _PEERCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = ""
    return Actor(kind="user", uid=uid, gid=gid, pid=pid, name=name,
                 groups=_group_names(_peer_gids(pid, uid, gid, name)))


def _peer_gids(pid: int, uid: int, gid: int, name: str) -> list[int]:
    """The peer's groups as the kernel holds them for its process, else from the user database."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Groups:"):
                return sorted({gid, *(int(g) for g in line.split()[1:])})
    if name:
        return sorted(set(os.getgrouplist(name, gid)))
    return [gid]


def _group_names(gids: list[int]) -> list[str]:
    names = []
    for gid in gids:
        try:
            names.append(grp.getgrgid(gid).gr_name)
        except KeyError:
            names.append(str(gid))
    return names


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def permission(name: str) -> Callable[[Handler], Handler]:
    """Declare what a route needs; the middleware checks it against the peer's roles."""

    def mark(handler: Handler) -> Handler:
        handler.permission = name  # type: ignore[attr-defined]
        return handler

    return mark


def _required(request: web.Request, handler: Handler) -> str:
    needed: str = getattr(handler, "permission", "read")
    if needed == "action":
        verb = request.match_info.get("verb", "")
        return verb if verb in PERMISSIONS else "read"
    return needed


def _authorize(request: web.Request, handler: Handler, actor: Actor) -> None:
    roles = roles_of(actor, request.app[ROLES])
    request[PEER_ROLES] = roles
    needed = _required(request, handler)
    try:
        check(actor, roles, needed)
    except Forbidden as refusal:
        request.app[ARBITER].audit.append(
            actor=actor.label(), verb=needed, scope="api", target=request.path,
            outcome="refused:forbidden",
            detail={"actor": actor.model_dump(exclude_defaults=True), "method": request.method,
                    "path": request.path, "needed_role": refusal.detail["needed_role"],
                    "roles": refusal.detail["roles"]},
        )
        raise


async def _body(request: web.Request, model: type[BaseModel]) -> Any:
    try:
        raw = await request.json(loads=json.loads)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidJson(f"the request body is not valid JSON: {exc}") from None
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "body"
        raise InvalidRequest(f"{field}: {first['msg']}", field=field, reason=first["msg"],
                             errors=[{"field": ".".join(str(p) for p in e["loc"]),
                                      "reason": e["msg"]} for e in exc.errors()]) from None


def _json(model: BaseModel | dict[str, Any], status: int = 200) -> web.Response:
    body = model if isinstance(model, dict) else model.model_dump(mode="json", by_alias=True)
    return web.json_response(body, status=status)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    request[ARRIVED] = time.perf_counter()
    try:
        actor = peer_actor(request)
        request[ACTOR] = actor
        _authorize(request, handler, actor)
        return await handler(request)
    except SupervisorError as exc:
        return web.json_response(exc.to_body(), status=exc.http_status)
    except web.HTTPNotFound:
        missing = RouteNotFound(f"no route {request.method} {request.path}", path=request.path)
        return web.json_response(missing.to_body(), status=404)
    except web.HTTPMethodNotAllowed as exc:
        body = {"error": {"code": "method_not_allowed",
                          "message": f"{request.method} is not allowed on {request.path}",
                          "detail": {"allowed": sorted(exc.allowed_methods)}}}
        return web.json_response(body, status=405)
    except web.HTTPException:
        raise
    except Exception as exc:
        log.exception("internal error on %s %s", request.method, request.path)
        err = SupervisorError(f"internal error: {exc}")
        return web.json_response(err.to_body(), status=500)


async def health(request: web.Request) -> web.Response:
    arbiter = request.app[ARBITER]
    return _json(Health(
        status="shutting_down" if arbiter.shutting_down else "ok", version=__version__,
        global_halt=arbiter.global_halt, agents=len(arbiter.agents),
        active_runs=arbiter.active_runs(),
        cgroup_mode=str(arbiter.runtime_info().get("cgroup_mode", "")),
    ))


async def list_agents(request: web.Request) -> web.Response:
    arbiter = request.app[ARBITER]
    agents = [a.model_dump(mode="json", by_alias=True) for a in arbiter.list_agents()]
    return web.json_response({"agents": agents, "global_halt": arbiter.global_halt})


async def get_agent(request: web.Request) -> web.Response:
    view = request.app[ARBITER].agent_view(request.match_info["name"])
    if view.run is not None and TELEMETRY in request.app:  # telemetry: the run's summary
        view.telemetry = request.app[TELEMETRY].summary(view.run.id)
    return _json(view)


@permission("launch")
async def create_run(request: web.Request) -> web.Response:
    run_request: RunRequest = await _body(request, RunRequest)
    view = await request.app[ARBITER].launch(run_request, request[ACTOR])
    return _json(view, status=201)


async def get_run(request: web.Request) -> web.Response:
    arbiter = request.app[ARBITER]
    record, _live = arbiter.resolve_run(request.match_info["ref"])
    return _json(arbiter.run_view(record))


async def run_logs(request: web.Request) -> web.StreamResponse:
    """The run's output; with follow=1, streamed until the run has ended."""
    arbiter = request.app[ARBITER]
    record, live = arbiter.resolve_run(request.match_info["ref"])
    follow = request.query.get("follow", "0") in ("1", "true", "yes")
    if (live is None and record.ended_at is not None and record.state != "failed"
            and not Path(record.log_path).exists()):
        raise LogsExpired(f"the output of run {record.id} was deleted after the retention "
                          f"period ([daemon] log_retention)", run=record.id,
                          ended_at=record.ended_at)
    response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8",
                                           "X-Run-Id": record.id})
    await response.prepare(request)
    path = Path(record.log_path)
    offset = 0
    while True:
        ended = live is None or live.done.is_set()
        try:
            with open(path, "rb") as handle:
                handle.seek(offset)
                while chunk := handle.read(_LOG_CHUNK):
                    offset += len(chunk)
                    await response.write(chunk)
        except FileNotFoundError:
            pass
        if not follow or ended:
            break
        assert live is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(live.done.wait(), _LOG_POLL)
    await response.write_eof()
    return response


async def run_telemetry(request: web.Request) -> web.Response:
    """A run's most recent samples and its summary (live, or stored once the run ended)."""
    arbiter = request.app[ARBITER]
    record, _live = arbiter.resolve_run(request.match_info["ref"])
    try:
        limit = int(request.query.get("limit", "20"))
    except ValueError:
        raise InvalidRequest("limit must be an integer", field="limit") from None
    if not 0 <= limit <= 10_000:
        raise InvalidRequest("limit must be between 0 and 10000", field="limit")
    if TELEMETRY not in request.app:
        raise RouteNotFound("telemetry is not available on this daemon", path=request.path)
    source = request.app[TELEMETRY]
    return _json(TelemetryView(
        run=record.id, agent=record.agent, state=record.state, live=source.tracking(record.id),
        samples=source.samples(record.id, limit),
        summary=source.summary(record.id),
    ))


@permission("action")
async def action(request: web.Request) -> web.Response:
    verb = request.match_info["verb"]
    if verb not in SCOPED_VERBS:
        raise RouteNotFound(f"unknown action {verb!r}", verb=verb, known=list(SCOPED_VERBS))
    action_request: ActionRequest = await _body(request, ActionRequest)
    result = await request.app[ARBITER].act(verb, action_request, request[ACTOR],
                                            arrived=request[ARRIVED])
    return _json(result)


@permission("audit")
async def audit_list(request: web.Request) -> web.Response:
    try:
        limit = int(request.query.get("limit", "100"))
        after = int(request.query.get("after", "0"))
    except ValueError:
        raise InvalidRequest("limit and after must be integers", field="limit") from None
    if not 1 <= limit <= 10_000:
        raise InvalidRequest("limit must be between 1 and 10000", field="limit")
    entries = request.app[ARBITER].audit.list(limit=limit, after_seq=after)
    return _json(AuditList(entries=entries))


@permission("audit")
async def audit_verify(request: web.Request) -> web.Response:
    return _json(request.app[ARBITER].audit.verify())


def _drills(request: web.Request) -> DrillRunner:
    if DRILLS not in request.app:
        raise RouteNotFound("drills are not available on this daemon", path=request.path)
    return request.app[DRILLS]


@permission("drill")
async def run_drill(request: web.Request) -> web.Response:
    drill_request: DrillRequest = await _body(request, DrillRequest)
    result = await _drills(request).run(request[ACTOR], drill_request.processes,
                                        drill_request.slo)
    return _json(result)


async def drill_history(request: web.Request) -> web.Response:
    try:
        limit = int(request.query.get("limit", "50"))
    except ValueError:
        raise InvalidRequest("limit must be an integer", field="limit") from None
    if not 1 <= limit <= 1000:
        raise InvalidRequest("limit must be between 1 and 1000", field="limit")
    return _json(DrillList(drills=_drills(request).history(limit)))


def _egress(request: web.Request) -> EgressSource:
    if EGRESS not in request.app:
        raise RouteNotFound("the egress gateway is not available on this daemon",
                            path=request.path)
    return request.app[EGRESS]


async def list_approvals(request: web.Request) -> web.Response:
    return _json(ApprovalList.model_validate({"approvals": _egress(request).list_approvals()}))


async def _decide(request: web.Request, approved: bool) -> web.Response:
    body: ReasonRequest = await _body(request, ReasonRequest)
    decided = _egress(request).decide(request.match_info["id"], approved, request[ACTOR],
                                      body.reason)
    return _json(Approval.model_validate(decided))


@permission("approve")
async def approve(request: web.Request) -> web.Response:
    return await _decide(request, True)


@permission("approve")
async def deny(request: web.Request) -> web.Response:
    return await _decide(request, False)


@permission("breaker_reset")
async def reset_breaker(request: web.Request) -> web.Response:
    body: ReasonRequest = await _body(request, ReasonRequest)
    name = request.match_info["name"]
    request.app[ARBITER].agent_view(name)  # 404 for an unknown agent
    return _json(_egress(request).reset_breaker(name, request[ACTOR], body.reason))


async def run_egress(request: web.Request) -> web.Response:
    record, _live = request.app[ARBITER].resolve_run(request.match_info["ref"])
    view = _egress(request).usage(record.id)
    if view is None:
        raise RouteNotFound(f"run {record.id} is not running behind the egress gateway",
                            run=record.id)
    return _json(EgressView.model_validate(view))


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


def build_app(arbiter: Controller, roles: RolesSection, drills: DrillRunner | None = None,
              telemetry: TelemetrySource | None = None,
              egress: EgressSource | None = None) -> web.Application:
    app = web.Application(middlewares=[errors_middleware], client_max_size=1024**2)
    app[ARBITER] = arbiter
    app[ROLES] = roles
    if drills is not None:
        app[DRILLS] = drills
    if telemetry is not None:
        app[TELEMETRY] = telemetry
    if egress is not None:
        app[EGRESS] = egress
    app.router.add_get("/v1/health", health)
    app.router.add_get("/v1/agents", list_agents)
    app.router.add_get("/v1/agents/{name}", get_agent)
    app.router.add_post("/v1/runs", create_run)
    app.router.add_get("/v1/runs/{ref}", get_run)
    app.router.add_get("/v1/runs/{ref}/logs", run_logs)
    app.router.add_get("/v1/runs/{ref}/telemetry", run_telemetry)
    app.router.add_post("/v1/actions/{verb}", action)
    app.router.add_get("/v1/audit", audit_list)
    app.router.add_get("/v1/audit/verify", audit_verify)
    app.router.add_post("/v1/drills", run_drill)
    app.router.add_get("/v1/drills", drill_history)
    app.router.add_get("/v1/runs/{ref}/egress", run_egress)
    app.router.add_get("/v1/approvals", list_approvals)
    app.router.add_post("/v1/approvals/{id}/approve", approve)
    app.router.add_post("/v1/approvals/{id}/deny", deny)
    app.router.add_post("/v1/agents/{name}/breaker/reset", reset_breaker)
    app.router.add_get("/v1/openapi.json", openapi)
    return app


def bind_control_socket(path: Path, gid: int) -> socket.socket:
    """Bind under a temporary name, set owner and mode, then rename into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(tmp))
    finally:
        os.umask(old_umask)
    os.chown(tmp, 0, gid if gid >= 0 else 0)
    os.chmod(tmp, 0o660)
    os.rename(tmp, path)
    sock.listen(128)
    sock.setblocking(False)
    return sock


def operators_gid(group: str) -> int:
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        log.warning("group %r does not exist: only root can use the control socket", group)
        return -1
