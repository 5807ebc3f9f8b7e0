"""The console's web server: loopback only, every request checked by the Gate (Host, Origin,
token/session), every action forwarded to the control socket through Upstream, live state
streamed from Live as server-sent events. Runs as the operator who started it; no privilege of
its own."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import os
import pwd
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any, TextIO

from aiohttp import web

from supervisor.console.guard import Gate
from supervisor.console.live import Live
from supervisor.console.upstream import Reply, Upstream
from supervisor.errors import ConsoleRefused, InvalidRequest, SupervisorError
from supervisor.limits import REASON_MAX
from supervisor.models import SCOPED_VERBS

LOOPBACK = "127.0.0.1"
BODY_MAX = 64 * 1024
STATIC = {"console.js": "text/javascript", "console.css": "text/css"}
# A closed tab is noticed on the next write: the heartbeat bounds how long it holds a slot.
HEARTBEAT = 5.0
# Verbs whose target the operator must type back, and that need a reason.
CONFIRMED = frozenset({"kill"})
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self'; connect-src 'self'; form-action 'none'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

GATE = web.AppKey("gate", Gate)
UPSTREAM = web.AppKey("upstream", Upstream)
LIVE = web.AppKey("live", Live)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class ConsoleConfig:
    socket_path: str
    port: int = 0
    max_streams: int = 8
    poll_period: float = 1.0
    upstream_limit: int = 8
    # Read the fleet store with the operator's AGENT_SUPERVISOR_FLEET_* credentials.
    fleet: bool = False


def _error(exc: SupervisorError) -> web.Response:
    return web.json_response(exc.to_body(), status=exc.http_status)


def _reply(reply: Reply) -> web.Response:
    return web.json_response(reply.body, status=reply.status)


@web.middleware
async def headers_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        response = web.json_response(
            {"error": {"code": "route_not_found" if exc.status == 404 else "invalid_request",
                       "message": exc.reason, "detail": {"path": request.path}}},
            status=exc.status)
    except SupervisorError as exc:
        response = _error(exc)
    response.headers.update(SECURITY_HEADERS)
    return response


@web.middleware
async def gate_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    gate = request.app[GATE]
    if not gate.host_ok(request.headers.get("Host")):
        raise ConsoleRefused(
            "this console answers only to its own loopback address", check="host",
            hint=f"open the URL agentctl console printed (http://{LOOPBACK}:{gate.port}/...)")
    if not gate.origin_ok(request.method, request.headers):
        raise ConsoleRefused("the request did not come from the console's own page",
                             check="origin",
                             hint="use the console's page; other sites may not drive it")
    if request.path == "/" and "token" in request.query:
        session = gate.exchange(request.query["token"])
        if session is None:
            raise ConsoleRefused(
                "that token is wrong or already used", check="token",
                hint="the token opens one browser once; restart agentctl console for a "
                     "new URL")
        # Redirect so the token leaves the address bar and the history.
        response = web.Response(status=303, headers={"Location": "/"})
        response.set_cookie(gate.cookie, session, httponly=True, samesite="Strict", path="/")
        return response
    if not gate.has_session(request.cookies.get(gate.cookie)):
        raise ConsoleRefused("no console session",
                             check="session",
                             hint="open the URL with the token that agentctl console printed")
    return await handler(request)


async def index(request: web.Request) -> web.Response:
    html = resources.files("supervisor.console").joinpath("static/index.html").read_text()
    return web.Response(text=html, content_type="text/html")


async def static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in STATIC:
        raise web.HTTPNotFound()
    text = resources.files("supervisor.console").joinpath(f"static/{name}").read_text()
    return web.Response(text=text, content_type=STATIC[name])


async def session_info(request: web.Request) -> web.Response:
    uid = os.getuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    groups = []
    for gid in os.getgroups():
        try:
            groups.append(grp.getgrgid(gid).gr_name)
        except KeyError:
            groups.append(str(gid))
    health = await request.app[UPSTREAM].call("GET", "/v1/health")
    return web.json_response({"operator": {"uid": uid, "user": user, "groups": groups},
                              "socket": request.app[UPSTREAM].socket_path,
                              "daemon": health.body,
                              "fleet": request.app[LIVE].fleet_view is not None})


async def _json_body(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise InvalidRequest("send JSON (Content-Type: application/json)", field="body",
                             hint="use the console's page, or POST a JSON object")
    try:
        body = json.loads(await request.read() or b"{}")
    except ValueError:
        raise InvalidRequest("the body is not JSON", field="body",
                             hint="POST a JSON object") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object", field="body",
                             hint="POST a JSON object")
    return body


def _reason(body: dict[str, Any], required: bool) -> str:
    reason = body.get("reason", "")
    if not isinstance(reason, str):
        raise InvalidRequest("reason must be a string", field="reason",
                             hint="give the reason as text")
    if required and not reason.strip():
        raise InvalidRequest("a reason is required", field="reason",
                             hint="say why: it is written to the audit log with your name")
    if len(reason) > REASON_MAX:
        raise InvalidRequest(f"reason is longer than {REASON_MAX} characters", field="reason",
                             hint="shorten it; link a ticket for the long story")
    return reason


async def action(request: web.Request) -> web.Response:
    verb = request.match_info["verb"]
    if verb not in SCOPED_VERBS:
        raise InvalidRequest(f"unknown verb {verb!r}", field="verb",
                             hint=f"one of {', '.join(SCOPED_VERBS)}")
    body = await _json_body(request)
    scope = body.get("scope")
    if not isinstance(scope, dict) or len(scope) != 1 or not (
            isinstance(scope.get("agent"), str) or isinstance(scope.get("class"), str)):
        raise InvalidRequest("scope must be {\"agent\": NAME} or {\"class\": CLASS}",
                             field="scope",
                             hint="a global halt is agentctl's: agentctl kill --all --reason ...")
    kind, target = next(iter(scope.items()))
    wide = kind == "class"
    reason = _reason(body, required=verb in CONFIRMED or wide)
    if (verb in CONFIRMED or wide) and body.get("confirm") != target:
        raise InvalidRequest(f"confirm by typing the {kind} name {target!r}",
                             field="confirm", expected=target,
                             hint="the confirmation must name what you act on")
    forwarded: dict[str, Any] = {"scope": {kind: target}, "reason": reason}
    if verb == "stop" and isinstance(body.get("grace"), str):
        forwarded["grace"] = body["grace"]
    reply = await request.app[UPSTREAM].call("POST", f"/v1/actions/{verb}", forwarded,
                                             slow=True)
    request.app[LIVE].poke()
    return _reply(reply)


async def decide(request: web.Request) -> web.Response:
    decision = request.match_info["decision"]
    if decision not in ("approve", "deny"):
        raise web.HTTPNotFound()
    body = await _json_body(request)
    reason = _reason(body, required=decision == "deny")
    approval = request.match_info["id"]
    from urllib.parse import quote

    reply = await request.app[UPSTREAM].call(
        "POST", f"/v1/approvals/{quote(approval, safe='')}/{decision}", {"reason": reason})
    request.app[LIVE].poke()
    return _reply(reply)


async def audit_verify(request: web.Request) -> web.Response:
    return _reply(await request.app[UPSTREAM].call("GET", "/v1/audit/verify", slow=True))


async def run_drill(request: web.Request) -> web.Response:
    body = await _json_body(request)
    forwarded = {k: body[k] for k in ("processes", "slo") if k in body}
    reply = await request.app[UPSTREAM].call("POST", "/v1/drills", forwarded, slow=True)
    request.app[LIVE].poke()
    return _reply(reply)


async def drill_history(request: web.Request) -> web.Response:
    return _reply(await request.app[UPSTREAM].call("GET", "/v1/drills?limit=20"))


async def events(request: web.Request) -> web.StreamResponse:
    live = request.app[LIVE]
    stream = live.subscribe()
    if stream is None:
        return web.json_response(
            {"error": {"code": "too_many_requests",
                       "message": f"the console serves at most {live.max_streams} live pages",
                       "detail": {"hint": "close another console tab"}}}, status=429)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           **SECURITY_HEADERS})
    try:
        await response.prepare(request)
        while True:
            try:
                item = await asyncio.wait_for(stream.queue.get(), HEARTBEAT)
            except TimeoutError:
                await response.write(b": keepalive\n\n")
                continue
            if item is None:
                break  # fell behind: the browser reconnects and starts from a snapshot
            event, data = item
            await response.write(f"event: {event}\ndata: {data}\n\n".encode())
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        live.unsubscribe(stream)
    return response


def build_app(config: ConsoleConfig, gate: Gate) -> web.Application:
    app = web.Application(middlewares=[headers_middleware, gate_middleware],
                          client_max_size=BODY_MAX)
    upstream = Upstream(config.socket_path, config.upstream_limit)
    fleet = None
    if config.fleet:
        from supervisor.console.fleet_view import FleetView

        fleet = FleetView.from_env()
    live = Live(upstream, config.poll_period, config.max_streams, fleet=fleet)
    app[GATE] = gate
    app[UPSTREAM] = upstream
    app[LIVE] = live

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await upstream.start()
        poller = asyncio.create_task(live.run())
        yield
        poller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poller
        await upstream.close()

    async def end_streams(app: web.Application) -> None:
        live.close()

    app.cleanup_ctx.append(lifecycle)
    # Shutdown waits for open handlers: the event streams must end first, or it waits out
    # their heartbeat.
    app.on_shutdown.append(end_streams)
    app.router.add_get("/", index)
    app.router.add_get("/static/{name}", static)
    app.router.add_get("/api/session", session_info)
    app.router.add_get("/api/events", events)
    app.router.add_post("/api/actions/{verb}", action)
    app.router.add_post("/api/approvals/{id}/{decision}", decide)
    app.router.add_get("/api/audit/verify", audit_verify)
    app.router.add_post("/api/drills", run_drill)
    app.router.add_get("/api/drills", drill_history)
    return app


async def _serve(config: ConsoleConfig, out: TextIO) -> None:
    gate = Gate(LOOPBACK)
    app = build_app(config, gate)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, LOOPBACK, config.port, backlog=16)
        await site.start()
        port: int = runner.addresses[0][1]
        gate.bind(port)
    except BaseException:
        await runner.cleanup()
        raise
    # The token is shown once, here; it is spent by the first browser that opens it.
    print(f"http://{LOOPBACK}:{port}/?token={gate.token}", file=out, flush=True)
    print(f"agentctl console: serving on {LOOPBACK}:{port} as uid {os.getuid()} for "
          f"{config.socket_path}; Ctrl-C stops it", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def serve(config: ConsoleConfig, out: TextIO = sys.stdout) -> None:
    asyncio.run(_serve(config, out))
