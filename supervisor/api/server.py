"""The control API: HTTP/JSON on a Unix socket, the peer's identity from SO_PEERCRED.
Runs in the daemon (root); the socket is created 0660 root:<socket_group> and then moved into
place, so there is no moment at which it is reachable with looser permissions."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from pydantic import BaseModel

from supervisor import __version__
from supervisor.api.bodies import decode_body
from supervisor.api.client import AUDIT_PENDING_HEADER, LOG_OFFSET_HEADER, STREAM_END_HEADER
from supervisor.api.listener import ADMISSION, PRESIGNER, VERBS_FIRST, VerbsFirst, verb_first
from supervisor.api.peers import peer_actor_of
from supervisor.audit import AuditLog
from supervisor.authz import PERMISSIONS, check, roles_of
from supervisor.config import ControlSection, RolesSection
from supervisor.errors import (
    AgentBusy,
    AgentKilled,
    BadHttpRequest,
    BodyTooLarge,
    Forbidden,
    InvalidRequest,
    LogsExpired,
    MethodNotAllowed,
    ReasonRequired,
    RequestTimeout,
    RouteNotFound,
    ScopeEmpty,
    SupervisorError,
    TooManyRequests,
    UriTooLong,
    class_not_found,
)
from supervisor.models import (
    SCOPED_VERBS,
    ActionRequest,
    ActionResult,
    Actor,
    AgentList,
    AgentView,
    Approval,
    ApprovalList,
    AuditList,
    BreakerReset,
    DenyRequest,
    DrillList,
    DrillRequest,
    DrillResult,
    EgressView,
    ForgetResult,
    Health,
    ReasonRequest,
    ReloadResult,
    RunRequest,
    RunView,
    TelemetrySummary,
    TelemetryView,
)
from supervisor.openapi import AGENT_PAGE_MAX, openapi_document
from supervisor.runtime.output_index import since_offset
from supervisor.sandbox.killindex import PreSignal
from supervisor.states import AgentState, RunState
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


class AgentRecordView(Protocol):
    """What the API filters agents by, without building their views."""

    name: str
    agent_class: str
    state: str
    updated_at: float
    current_run: str | None
    last_run: str | None


class Controller(Protocol):
    """What the API needs of the daemon's arbiter (the daemon layer sits above this one)."""

    audit: AuditLog
    global_halt: bool
    shutting_down: bool

    @property
    def agents(self) -> Mapping[str, AgentRecordView]: ...
    @property
    def live(self) -> Mapping[str, Any]: ...  # run id -> its LiveRun (.record: state, pid)

    def agent_view(self, name: str) -> AgentView: ...
    def list_agents(self) -> list[AgentView]: ...
    def resolve_run(self, ref: str) -> tuple[Any, Any]: ...
    def run_view(self, run: Any) -> RunView: ...
    async def settled(self, run_id: str, timeout: float | None = None) -> None: ...
    def active_runs(self) -> int: ...
    def runtime_info(self) -> dict[str, Any]: ...
    async def launch(self, request: RunRequest, actor: Actor) -> RunView: ...
    async def act(self, verb: str, request: ActionRequest, actor: Actor, *,
                  arrived: float | None = None,
                  presignal: PreSignal | None = None,
                  after_answer: Callable[[Callable[[], None]], None] | None = None
                  ) -> ActionResult: ...
    def forget_agent(self, name: str, actor: Actor, reason: str) -> None: ...


class EgressSource(Protocol):
    """What the API needs of the egress gateway's daemon side (supervisor/daemon/egress.py)."""

    def list_approvals(self) -> list[dict[str, Any]]: ...
    def decide(self, approval_id: str, approved: bool, actor: Actor, reason: str
               ) -> dict[str, Any]: ...
    async def reset_breaker(self, agent: str, actor: Actor, reason: str
                            ) -> dict[str, Any]: ...
    async def usage(self, run_id: str) -> dict[str, Any] | None: ...


class TelemetrySource(Protocol):
    """What the API reads of the daemon's telemetry (supervisor/telemetry/sampler.py)."""

    def tracking(self, run_id: str) -> bool: ...
    def samples(self, run_id: str, limit: int) -> list[Sample]: ...
    def latest(self, run_id: str) -> Sample | None: ...
    def summary(self, run_id: str) -> TelemetrySummary | None: ...


class Reloader(Protocol):
    """Applies a changed configuration (the daemon's daemon/reload.py)."""

    async def reload(self, actor: Actor, reason: str) -> dict[str, Any]: ...


@dataclass
class RoleTable:
    """The roles in force. A reload replaces `current`: a served application is frozen."""

    current: RolesSection


ARBITER = web.AppKey("arbiter", Controller)
TELEMETRY = web.AppKey("telemetry", TelemetrySource)
ROLES = web.AppKey("roles", RoleTable)
RELOADER = web.AppKey("reloader", Reloader)
DRILLS = web.AppKey("drills", DrillRunner)
EGRESS = web.AppKey("egress", EgressSource)
CONTROL = web.AppKey("control", ControlSection)
ACTOR = web.RequestKey("actor", Actor)
# perf_counter() when the request was read off the socket: a kill's time_to_halt_ms starts here,
# so time spent queued in the daemon is in the figure.
ARRIVED = web.RequestKey("arrived", float)
# What the owners' acceptor SIGKILLed for this request before the loop saw it (api/presignal.py).
PRESIGNALLED = web.RequestKey("presignalled", PreSignal)
# When the action handler wrote its answer itself, before the work the verb left for after it.
ANSWERED = web.RequestKey("answered", float)
PEER_ROLES = web.RequestKey("roles", frozenset)
_LOG_CHUNK = 65536
LOG_OFFSET_MAX = 2**53
_LOG_POLL = 0.05


class Load:
    """Requests in flight, per peer uid and for reads overall (the app's own, per loop)."""

    def __init__(self, config: ControlSection) -> None:
        self.config = config
        self.per_uid: dict[int, int] = {}
        self.reads = asyncio.Semaphore(config.max_concurrent_reads)

    @contextlib.asynccontextmanager
    async def request(self, uid: int, action: bool, read: bool) -> AsyncIterator[None]:
        """Admit one request: a uid over its in-flight limit is refused 429, unless the request
        is an action; reads wait for a read slot, actions never do."""
        held = self.per_uid.get(uid, 0)
        if held >= self.config.max_requests_per_uid and not action:
            raise TooManyRequests(
                f"uid {uid} already has {held} requests in flight on the control socket",
                uid=uid, limit=self.config.max_requests_per_uid)
        self.per_uid[uid] = held + 1
        try:
            if read:
                async with self.reads:
                    yield
            else:
                yield
        finally:
            left = self.per_uid.get(uid, 1) - 1
            if left > 0:
                self.per_uid[uid] = left
            else:
                self.per_uid.pop(uid, None)


LOAD = web.AppKey("load", Load)

# A follow stream's end mark (STREAM_END_HEADER): a token only the stream's reader sees, so no
# agent output can pass for the daemon's end notice.
_STREAM_ENDINGS = {
    "restarting": "the daemon is restarting; run {run} keeps running: follow it again from "
                  "offset {offset} ('agentctl logs -f {run}') once the daemon is back",
    "stopping": "the daemon is stopping and kills every agent, run {run} among them; "
                "'agentctl logs {run}' shows its output once the daemon is back",
}


class FollowStreams:
    """The follow streams open on the control socket (GET /v1/runs/{ref}/logs?follow=1: a
    foreground `agentctl run`, `agentctl logs -f`). A stopping or restarting daemon ends them
    all at once (`end`): each stream's last chunk is then one line saying why, ending with
    the stream's end mark (STREAM_END_HEADER), which the client reads as StreamEnded. A
    stream held open must never delay a kill or a handover (docs/runbook.md)."""

    def __init__(self) -> None:
        self.ending: str | None = None  # "restarting" or "stopping" once `end` was called
        self.open = 0

    def end(self, why: str) -> int:
        """End every follow stream within one poll (_LOG_POLL); how many are open."""
        assert why in _STREAM_ENDINGS, why
        self.ending = why
        return self.open

    @staticmethod
    def notice(why: str, run: str, mark: str, offset: int) -> bytes:
        """The last line: why, the run, where its output stopped (`offset`: the byte to go
        on from, GET .../logs?follow=1&offset=N), then `[why mark]`."""
        text = _STREAM_ENDINGS[why].format(run=run, offset=offset)
        return f"agent-supervisor: {text} [{why} {mark}]\n".encode()


FOLLOW_STREAMS = web.AppKey("follow_streams", FollowStreams)


def peer_actor(request: web.Request) -> Actor:
    """The request's peer: read once per connection by the listener, else from the socket."""
    if ADMISSION in request.app:
        peer = request.app[ADMISSION].peer(request.protocol)
        if peer is not None:
            return peer.actor
    sock: socket.socket | None = request.transport.get_extra_info("socket") if request.transport \
        else None
    if sock is None:
        raise Forbidden("no peer credentials on this connection")
    return peer_actor_of(sock)


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
    roles = roles_of(actor, request.app[ROLES].current)
    request[PEER_ROLES] = roles
    needed = _required(request, handler)
    try:
        check(actor, roles, needed)
    except Forbidden as refusal:
        request.app[ARBITER].audit.append(
            actor=actor.label(), verb=needed, scope="api", target=request.path[:256],
            outcome="refused:forbidden",
            detail={"actor": actor.model_dump(exclude_defaults=True), "method": request.method,
                    "path": request.path[:256], "needed_role": refusal.detail["needed_role"],
                    "roles": refusal.detail["roles"]},
        )
        raise


async def _body(request: web.Request, model: type[BaseModel]) -> Any:
    config = request.app[CONTROL]
    if request.content_length is not None and request.content_length > config.max_body:
        raise BodyTooLarge(f"the request body is {request.content_length} bytes; the limit is "
                           f"{config.max_body}", limit=config.max_body)
    try:
        async with asyncio.timeout(config.body_timeout):
            raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BodyTooLarge(f"the request body is larger than {config.max_body} bytes",
                           limit=config.max_body) from None
    except TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within "
                             f"{config.body_timeout:g}s") from None
    except RequestPayloadError as exc:  # e.g. a Content-Encoding its bytes are not in
        raise BadHttpRequest(f"the request body could not be read: {str(exc)[:200]}"
                             ) from None
    return decode_body(raw, model)


def _json(model: BaseModel | dict[str, Any], status: int = 200) -> web.Response:
    if isinstance(model, dict):
        return web.json_response(model, status=status)
    # Serialized by pydantic-core in one step (a third of dump-then-json.dumps on a page of
    # agents), and a float that is not finite becomes null instead of invalid JSON.
    return web.Response(body=model.model_dump_json(by_alias=True).encode(), status=status,
                        content_type="application/json")


def _error(exc: SupervisorError, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(exc.to_body(), status=exc.http_status, headers=headers)


def _http_error(request: web.Request, exc: web.HTTPException) -> web.Response:
    """aiohttp's own refusals (no route, wrong method, body too large) as our JSON errors."""
    path = request.path[:256]
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = sorted(exc.allowed_methods)
        return _error(MethodNotAllowed(f"{request.method} is not allowed on {path}",
                                       allowed=allowed),
                      headers={"Allow": ", ".join(allowed)})
    if isinstance(exc, web.HTTPNotFound):
        return _error(RouteNotFound(f"no route {request.method} {path}", path=path))
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return _error(BodyTooLarge("the request body is too large"))
    if isinstance(exc, web.HTTPRequestURITooLong):
        return _error(UriTooLong("the request path is too long"))
    if exc.status >= 500:
        log.error("internal HTTP error %d on %s %s", exc.status, request.method, path)
        return _error(SupervisorError("internal error"))
    return _error(InvalidRequest(f"{exc.reason}", status=exc.status))


def _is_action(request: web.Request) -> bool:
    return request.method == "POST" and request.path.startswith("/v1/actions/")


def _is_stream(request: web.Request) -> bool:
    return request.path.endswith("/logs") and request.query.get("follow", "0") != "0"


# A verb answers once its audit rows are durable; bounded, so a disk that is full beyond the
# reserve delays an answer by this much at most (the rows stay queued and are written later).
AUDIT_FLUSH_TIMEOUT = 5.0


@web.middleware
async def audit_durable_middleware(request: web.Request, handler: Handler
                                   ) -> web.StreamResponse:
    """State-changing requests return only after the rows they appended are committed, for
    at most AUDIT_FLUSH_TIMEOUT; an answer that goes out with its rows still queued says so
    (AUDIT_PENDING_HEADER), so the caller is told, not only the health alarm."""
    response: web.StreamResponse | None = None
    try:
        response = await handler(request)
        return response
    finally:
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            handled = time.perf_counter()
            durable = await request.app[ARBITER].audit.flushed(AUDIT_FLUSH_TIMEOUT)
            if not durable:
                log.warning("%s %s: answered with its audit rows not yet durable after %.0f s "
                            "(they stay queued; see the audit alarms)", request.method,
                            request.path[:64], AUDIT_FLUSH_TIMEOUT)
                if response is not None and not response.prepared:
                    response.headers[AUDIT_PENDING_HEADER] = "true"
            if _is_action(request):  # where a verb's answer time went (docs/benchmarks.md)
                arrived = request.get(ARRIVED, handled)
                answered = request.get(ANSWERED)
                log.info("%s %s: handled %.1f ms after it arrived, its audit rows durable "
                         "%.1f ms later%s", request.method, request.path[:64],
                         (handled - arrived) * 1000, (time.perf_counter() - handled) * 1000,
                         "" if answered is None else f" (answered {(answered - arrived) * 1000:.1f}"
                         " ms after it arrived, before the work it left for after the answer)")


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    # When the request began to arrive (its connection's accept, or its first byte on a kept
    # connection), so the time it waited for the loop is in a kill's time_to_halt_ms.
    arrived = getattr(request.protocol, "arrived", None)
    request[ARRIVED] = (arrived() if arrived is not None else None) or time.perf_counter()
    verbs_first = request.app.get(VERBS_FIRST)
    take = getattr(request.protocol, "take_presignal", None)
    presignal = take() if take is not None else None
    if presignal is not None:
        request[PRESIGNALLED] = presignal
    try:
        actor = peer_actor(request)
        request[ACTOR] = actor
        _authorize(request, handler, actor)
        if _is_stream(request):
            # A follow stream is mostly idle; it is bounded by the connection caps instead.
            return await handler(request)
        uid = actor.uid if actor.uid is not None else -1
        read = request.method in ("GET", "HEAD")
        if read and verbs_first is not None:
            await verbs_first.reads_may_go(request.protocol)
        async with request.app[LOAD].request(uid, action=_is_action(request), read=read):
            return await handler(request)
    except SupervisorError as exc:
        return _error(exc)
    except web.HTTPException as exc:
        return _http_error(request, exc)
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path[:256])
        # The exception's text stays in the daemon's log: it may hold paths or state.
        return _error(SupervisorError("internal error; the daemon's log has the details"))
    finally:
        # The listener held the reads from the moment this verb's request was complete,
        # judged on the same raw path (VerbsFirst.verb_arrived).
        if verbs_first is not None and verb_first(request.method, request.raw_path):
            verbs_first.answered(request.protocol)
        if presignal is not None:  # what its kill path did not take is killed and audited
            request.app[PRESIGNER].finish(presignal, "its request ended without its kill "
                                                     "path taking the run")


async def health(request: web.Request) -> web.Response:
    arbiter = request.app[ARBITER]
    alarms = arbiter.audit.alarms.as_dict()
    return _json(Health(
        status="shutting_down" if arbiter.shutting_down else "degraded" if alarms else "ok",
        version=__version__,
        global_halt=arbiter.global_halt, agents=len(arbiter.agents),
        active_runs=arbiter.active_runs(),
        cgroup_mode=str(arbiter.runtime_info().get("cgroup_mode", "")),
        audit_alarms=alarms,
    ))


def _query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    if not text.isascii() or not text.isdigit() or len(text) > 9:
        raise InvalidRequest(f"{name} must be an integer between {low} and {high}",
                             field=name)
    value = int(text)
    if not low <= value <= high:
        raise InvalidRequest(f"{name} must be between {low} and {high}", field=name)
    return value


def _query_time(request: web.Request, name: str) -> float:
    """A Unix time in seconds (fractions allowed) from the query."""
    text = request.query.get(name, "")
    try:
        value = float(text) if text.isascii() and len(text) <= 32 else math.nan
    except ValueError:
        value = math.nan
    if not 0 <= value <= 1e11:  # also refuses nan and inf
        raise InvalidRequest(f"{name} must be a Unix time in seconds", field=name,
                             hint="agentctl logs --since takes 10m, 1h or an ISO 8601 time")
    return value


def _live_stats(telemetry: TelemetrySource | None, view: AgentView) -> None:
    """The run's latest numbers, from the telemetry sampler's last sample (never a cgroup walk
    per request: reads must cost the kill path nothing)."""
    if telemetry is None or view.run is None or view.run.ended_at is not None:
        return
    sample = telemetry.latest(view.run.id)
    if sample is None:
        return
    view.stats = {
        "cpu_usec": None if sample.cpu_seconds is None else int(sample.cpu_seconds * 1e6),
        "memory_bytes": sample.memory_bytes, "processes": sample.processes}


class RenderedPages:
    """`GET /v1/agents` pages as last rendered, each kept with the state it was rendered
    from: a flood of reads of an unchanged list costs one comparison each, not a page of
    views built and serialised (reads must cost the kill path next to nothing)."""

    MAX_PAGES = 64

    def __init__(self) -> None:
        self.pages: dict[str, tuple[tuple[Any, ...], bytes]] = {}

    @staticmethod
    def stamp(arbiter: Controller, telemetry: TelemetrySource | None) -> tuple[Any, ...]:
        """What a page is rendered from: each agent's state and its run's, and the time of
        its run's latest sample (the stats). O(agents), with no view built."""
        live = arbiter.live
        parts: list[tuple[Any, ...]] = []
        for name, agent in arbiter.agents.items():
            run_id = agent.current_run or agent.last_run
            running = live.get(run_id) if run_id else None
            if running is None:
                parts.append((name, agent.state, agent.updated_at, run_id))
                continue
            record = running.record
            sample = telemetry.latest(record.id) if telemetry is not None else None
            parts.append((name, agent.state, agent.updated_at, run_id, record.state,
                          record.pid, record.ended_at, sample.ts if sample else None))
        return (arbiter.global_halt, *parts)

    def get(self, query: str, stamp: tuple[Any, ...]) -> bytes | None:
        kept = self.pages.get(query)
        return kept[1] if kept is not None and kept[0] == stamp else None

    def put(self, query: str, stamp: tuple[Any, ...], body: bytes) -> None:
        if len(self.pages) >= self.MAX_PAGES and query not in self.pages:
            self.pages.clear()  # bounded whatever queries a caller invents
        self.pages[query] = (stamp, body)


RENDERED = web.AppKey("rendered_pages", RenderedPages)


async def list_agents(request: web.Request) -> web.Response:
    """One page of agents in name order, filtered by class and state; `cursor` is the name of
    the last agent of the previous page. Served from the page last rendered while nothing it
    shows has changed."""
    arbiter = request.app[ARBITER]
    telemetry = request.app.get(TELEMETRY)
    rendered = request.app[RENDERED]
    stamp = rendered.stamp(arbiter, telemetry)
    body = rendered.get(request.query_string, stamp)
    if body is None:
        body = _render_agents(request, arbiter, telemetry)
        rendered.put(request.query_string, stamp, body)
    return web.Response(body=body, content_type="application/json")


def _render_agents(request: web.Request, arbiter: Controller,
                   telemetry: TelemetrySource | None) -> bytes:
    limit = _query_int(request, "limit", AGENT_PAGE_MAX, 1, AGENT_PAGE_MAX)
    cursor = request.query.get("cursor", "")
    wanted_class = request.query.get("class")
    wanted_state = request.query.get("state")
    if wanted_class is None and wanted_state is None:
        names = list(arbiter.agents)
    else:
        names = [name for name, record in arbiter.agents.items()
                 if (wanted_class is None or record.agent_class == wanted_class)
                 and (wanted_state is None or record.state == wanted_state)]
    names.sort()
    after = [name for name in names if name > cursor] if cursor else names
    page = after[:limit]
    views = []
    for name in page:
        view = arbiter.agent_view(name)
        _live_stats(telemetry, view)
        views.append(view)
    more = len(after) > limit
    return AgentList(agents=views, global_halt=arbiter.global_halt, total=len(names),
                     next_cursor=page[-1] if more and page else None
                     ).model_dump_json(by_alias=True).encode()


async def get_agent(request: web.Request) -> web.Response:
    view = request.app[ARBITER].agent_view(request.match_info["name"])
    _live_stats(request.app.get(TELEMETRY), view)
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


def tail_offset(path: Path, lines: int) -> int:
    """Where the last `lines` lines of the file start (0 when it has fewer). Reads backwards
    a chunk at a time, so a large log costs only what the tail spans."""
    try:
        with open(path, "rb") as handle:
            end = handle.seek(0, os.SEEK_END)
            # A final newline ends the last line; it does not start an empty one.
            handle.seek(max(0, end - 1))
            wanted = lines + (1 if end and handle.read(1) == b"\n" else 0)
            if wanted == 0:
                return end
            position = end
            while position > 0:
                start = max(0, position - _LOG_CHUNK)
                handle.seek(start)
                chunk = handle.read(position - start)
                for index in range(len(chunk) - 1, -1, -1):
                    if chunk[index] == 0x0A:
                        wanted -= 1
                        if wanted == 0:
                            return start + index + 1
                position = start
    except FileNotFoundError:
        pass
    return 0


async def run_logs(request: web.Request) -> web.StreamResponse:
    """The run's output; with follow=1, streamed until the run has ended and its output is
    recorded to the end (its cleanup done)."""
    arbiter = request.app[ARBITER]
    record, live = arbiter.resolve_run(request.match_info["ref"])
    follow = request.query.get("follow", "0") in ("1", "true", "yes")
    if (live is None and record.ended_at is not None and record.state != RunState.FAILED
            and not Path(record.log_path).exists()):
        raise LogsExpired(f"the output of run {record.id} was deleted after the retention "
                          f"period ([daemon] log_retention)", run=record.id,
                          ended_at=record.ended_at)
    # The query is checked before the answer starts: an error after it would be read as output.
    tail = None if "tail" not in request.query else _query_int(request, "tail", 0, 0, 100_000)
    since = None if "since" not in request.query else _query_time(request, "since")
    start = (None if "offset" not in request.query
             else _query_int(request, "offset", 0, 0, LOG_OFFSET_MAX))
    path = Path(record.log_path)
    offset = 0 if tail is None else await asyncio.to_thread(tail_offset, path, tail)
    if since is not None:
        # --tail N --since T: the last N lines of what arrived since T.
        offset = max(offset, await asyncio.to_thread(since_offset, path, since))
    if start is not None:  # where an earlier stream of this run stopped (a restart)
        offset = start
    # Where this answer starts in the run's output, so a follower can go on from where it
    # stopped (offset=) after a restart ended its stream.
    headers = {"Content-Type": "text/plain; charset=utf-8", "X-Run-Id": record.id,
               LOG_OFFSET_HEADER: str(offset)}
    streams = request.app[FOLLOW_STREAMS]
    mark = secrets.token_hex(16)
    if follow:
        headers[STREAM_END_HEADER] = mark
    response = web.StreamResponse(headers=headers)
    await response.prepare(request)
    last = b"\n"
    streams.open += int(follow)
    # A run that has ended leaves the live table before its cleanup (step 6) has drained its
    # output to the end (the recorder holds a write end of the pipe until then): a stream
    # that starts in between waits for that cleanup too, or it would end on a log whose last
    # bytes are still in the pipe (`agentctl run` of a short command printing nothing).
    settling = (None if live is not None or not follow
                else asyncio.ensure_future(_settled(arbiter, record.id)))
    try:
        while True:
            ended = (live.done.is_set() if live is not None
                     else settling is None or settling.done())
            try:
                with open(path, "rb") as handle:
                    handle.seek(offset)
                    while chunk := handle.read(_LOG_CHUNK):
                        offset += len(chunk)
                        last = chunk[-1:]
                        await response.write(chunk)
            except FileNotFoundError:
                pass
            if follow and streams.ending is not None:
                # Before the run's end: the daemon's kill may have ended it meanwhile. One
                # chunk, so the client finds the mark whole; the line's own newline first
                # when the output stopped mid-line.
                await response.write((b"" if last == b"\n" else b"\n")
                                     + streams.notice(streams.ending, record.id, mark, offset))
                break
            if not follow or ended:
                break
            if settling is not None:
                await asyncio.wait({settling}, timeout=_LOG_POLL)
                continue
            assert live is not None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(live.done.wait(), _LOG_POLL)
    finally:
        streams.open -= int(follow)
        if settling is not None:
            settling.cancel()
    await response.write_eof()
    return response


async def _settled(arbiter: Controller, run_id: str) -> None:
    """Until the run's cleanup is done (its output recorded to the end); never raises: a
    failed cleanup is audited by the daemon, and the stream ends with what was recorded."""
    with contextlib.suppress(Exception):
        await arbiter.settled(run_id)


async def run_telemetry(request: web.Request) -> web.Response:
    """A run's most recent samples and its summary (live, or stored once the run ended)."""
    arbiter = request.app[ARBITER]
    record, _live = arbiter.resolve_run(request.match_info["ref"])
    limit = _query_int(request, "limit", 20, 0, 10_000)
    if TELEMETRY not in request.app:
        raise RouteNotFound("telemetry is not available on this daemon", path=request.path)
    source = request.app[TELEMETRY]
    return _json(TelemetryView(
        run=record.id, agent=record.agent, state=record.state, live=source.tracking(record.id),
        samples=source.samples(record.id, limit),
        summary=source.summary(record.id),
    ))


def _check_action(arbiter: Controller, verb: str, body: ActionRequest) -> None:
    """Refuse, before anything changes, an action an operator cannot have meant: a kill, or
    any verb over a class or every agent, without a reason; a class that matches no agent (a
    typo must not read as "done"); pause, resume or stop of every agent when there are none.
    A global kill or reactivate with no agents still sets or lifts the global halt."""
    scope = body.scope
    if not body.reason.strip() and (verb == "kill" or scope.kind != "agent"):
        what = "a kill" if verb == "kill" else f"{verb} over {scope.describe()}"
        raise ReasonRequired(f"{what} needs a reason", field="reason", verb=verb,
                             scope=scope.describe())
    if scope.agent_class is not None:
        classes = {agent.agent_class for agent in arbiter.agents.values()}
        if scope.agent_class not in classes:
            raise class_not_found(scope.agent_class, classes)
    elif scope.kind == "global" and verb not in ("kill", "reactivate") and not arbiter.agents:
        raise ScopeEmpty(f"no agents to {verb}", scope="global", did_you_mean=[])


class AfterAnswer:
    """What a verb leaves until its answer is written (`Controller.act`'s `after_answer`): a
    scoped halt whose audit rows are durable hands over its records, its log line and its
    cleanup's audit, and the action handler writes the answer first, then runs them, before
    the loop reads another request (0.5-0.8 ms of a class halt's answer, docs/benchmarks.md
    run 16). The loop runs them at its next turn in any case, so nothing is left behind by
    an answer that was not written first (an error, a row not yet durable)."""

    def __init__(self) -> None:
        self._calls: list[Callable[[], None]] = []

    def __call__(self, call: Callable[[], None]) -> None:
        if not self._calls:
            asyncio.get_running_loop().call_soon(self.run)
        self._calls.append(call)

    @property
    def pending(self) -> bool:
        return bool(self._calls)

    def run(self) -> None:
        """Everything handed over so far, in order, once."""
        while self._calls:
            call = self._calls.pop(0)
            try:
                call()
            except Exception:
                log.exception("work left for after an answer failed")


@permission("action")
async def action(request: web.Request) -> web.Response:
    verb = request.match_info["verb"]
    if verb not in SCOPED_VERBS:
        raise RouteNotFound(f"unknown action {verb!r}", verb=verb, known=list(SCOPED_VERBS))
    action_request: ActionRequest = await _body(request, ActionRequest)
    arbiter = request.app[ARBITER]
    _check_action(arbiter, verb, action_request)
    after = AfterAnswer()
    try:
        result = await arbiter.act(verb, action_request, request[ACTOR],
                                   arrived=request[ARRIVED],
                                   presignal=request.get(PRESIGNALLED),
                                   after_answer=after)
        response = _json(result)
        if after.pending and arbiter.audit.durable():
            # Every row this request appended is committed (what audit_durable_middleware
            # waits for): the answer goes now, what the verb left for after it follows.
            with contextlib.suppress(ConnectionError):  # a caller gone: as aiohttp would
                await response.prepare(request)
                await response.write_eof()
                request[ANSWERED] = time.perf_counter()
        return response
    finally:
        after.run()


@permission("audit")
async def audit_list(request: web.Request) -> web.Response:
    limit = _query_int(request, "limit", 100, 1, 10_000)
    after = _query_int(request, "after", 0, 0, 2**53)
    audit = request.app[ARBITER].audit
    await audit.flushed(AUDIT_FLUSH_TIMEOUT)
    entries = audit.list(limit=limit, after_seq=after)
    return _json(AuditList(entries=entries))


@permission("audit")
async def audit_verify(request: web.Request) -> web.Response:
    return _json(await request.app[ARBITER].audit.verify_async())


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
    limit = _query_int(request, "limit", 50, 1, 1000)
    return _json(DrillList(drills=_drills(request).history(limit)))


def _egress(request: web.Request) -> EgressSource:
    if EGRESS not in request.app:
        raise RouteNotFound("the egress gateway is not available on this daemon",
                            path=request.path)
    return request.app[EGRESS]


async def list_approvals(request: web.Request) -> web.Response:
    return _json(ApprovalList.model_validate({"approvals": _egress(request).list_approvals()}))


async def _decide(request: web.Request, approved: bool) -> web.Response:
    body: ReasonRequest | DenyRequest = await _body(
        request, ReasonRequest if approved else DenyRequest)
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
    return _json(BreakerReset.model_validate(
        await _egress(request).reset_breaker(name, request[ACTOR], body.reason)))


@permission("forget")
async def forget_agent(request: web.Request) -> web.Response:
    """Drop an idle agent from the registry (audited). A killed agent is a hold an owner lifts
    with reactivate first, so rm never doubles as an unaudited way around a kill."""
    body: ReasonRequest = await _body(request, ReasonRequest)
    name = request.match_info["name"]
    arbiter = request.app[ARBITER]
    arbiter.agent_view(name)  # 404, with suggestions, for an unknown agent
    state = arbiter.agents[name].state
    if state == AgentState.KILLED:
        raise AgentKilled(f"agent {name!r} is held killed; reactivate it before removing it",
                          agent=name, state=state)
    if state != AgentState.IDLE:
        raise AgentBusy(f"agent {name!r} is {state}: stop it before removing it", agent=name,
                        state=state)
    arbiter.forget_agent(name, request[ACTOR], body.reason)
    return _json(ForgetResult(agent=name, previous_state=state, reason=body.reason))


async def run_egress(request: web.Request) -> web.Response:
    record, _live = request.app[ARBITER].resolve_run(request.match_info["ref"])
    view = await _egress(request).usage(record.id)
    if view is None:
        raise RouteNotFound(f"run {record.id} is not running behind the egress gateway",
                            run=record.id)
    return _json(EgressView.model_validate(view))


@permission("reload")
async def reload_config(request: web.Request) -> web.Response:
    body: ReasonRequest = await _body(request, ReasonRequest)
    if RELOADER not in request.app:
        raise RouteNotFound("this daemon has no configuration to reload", path=request.path)
    result = await request.app[RELOADER].reload(request[ACTOR], body.reason)
    return _json(ReloadResult.model_validate(result))


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


def build_app(arbiter: Controller, roles: RolesSection | RoleTable,
              drills: DrillRunner | None = None, telemetry: TelemetrySource | None = None,
              egress: EgressSource | None = None, control: ControlSection | None = None,
              reloader: Reloader | None = None) -> web.Application:
    control = control or ControlSection()
    app = web.Application(middlewares=[errors_middleware, audit_durable_middleware],
                          client_max_size=control.max_body)
    app[ARBITER] = arbiter
    app[ROLES] = roles if isinstance(roles, RoleTable) else RoleTable(roles)
    if reloader is not None:
        app[RELOADER] = reloader
    app[CONTROL] = control
    app[LOAD] = Load(control)
    app[VERBS_FIRST] = VerbsFirst()
    app[RENDERED] = RenderedPages()
    app[FOLLOW_STREAMS] = FollowStreams()
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
    app.router.add_post("/v1/reload", reload_config)
    app.router.add_post("/v1/agents/{name}/forget", forget_agent)
    app.router.add_get("/v1/openapi.json", openapi)
    return app


def bind_control_socket(path: Path, gid: int, mode: int = 0o660) -> socket.socket:
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
    os.chmod(tmp, mode)
    os.rename(tmp, path)
    sock.listen(4096)
    sock.setblocking(False)
    return sock


def operators_gid(group: str, socket_path: Path) -> int:
    """The group's gid; -1 (the socket stays root's) for a group gone since the start's check
    (which refuses one missing)."""
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        log.warning("group %r does not exist: only root can use %s", group, socket_path)
        return -1
