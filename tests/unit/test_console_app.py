"""The console's HTTP surface against a stand-in daemon on a real Unix socket: what it forwards
(exactly the scope and the reason, never the confirmation), what it refuses before the daemon
sees anything, and that the daemon's own errors reach the page unchanged. No privilege."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from supervisor.console.app import ConsoleConfig, build_app
from supervisor.console.guard import Gate

FORBIDDEN = {"error": {"code": "forbidden", "message": "uid 1001 holds viewer; 'kill' needs owner",
                       "detail": {"needed_role": "owner", "hint": "ask an owner"}}}


def fake_daemon(seen: list[tuple[str, str, Any]]) -> web.Application:
    async def record(request: web.Request) -> web.Response:
        body = await request.json() if request.can_read_body else None
        seen.append((request.method, request.path_qs, body))
        if request.path == "/v1/actions/kill" and body["scope"] == {"agent": "guarded"}:
            return web.json_response(FORBIDDEN, status=403)
        if request.path == "/v1/agents":
            return web.json_response({"agents": [], "next_cursor": None})
        if request.path == "/v1/approvals":
            return web.json_response({"approvals": []})
        if request.path.startswith("/v1/audit"):
            return web.json_response({"entries": []})
        return web.json_response({"ok": True, "path": request.path})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    return app


def with_console(tmp_path: Path,
                 scenario: Callable[[aiohttp.ClientSession, str, list[Any]], Awaitable[None]],
                 owner_seen: list[Any] | None = None) -> None:
    """`owner_seen`: also serve the owners' socket beside the control socket, recording there."""

    async def main() -> None:
        seen: list[tuple[str, str, Any]] = []
        sock = str(tmp_path / "control.sock")
        daemon = web.AppRunner(fake_daemon(seen))
        await daemon.setup()
        await web.UnixSite(daemon, sock).start()
        owners = web.AppRunner(fake_daemon(owner_seen if owner_seen is not None else []))
        await owners.setup()
        if owner_seen is not None:
            await web.UnixSite(owners, str(tmp_path / "control-owner.sock")).start()
        gate = Gate("127.0.0.1", token="tok")
        runner = web.AppRunner(build_app(ConsoleConfig(socket_path=sock, poll_period=60), gate))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        gate.bind(port)
        base = f"http://127.0.0.1:{port}"
        try:
            # unsafe=True: aiohttp keeps no cookies from IP-address hosts otherwise.
            jar = aiohttp.CookieJar(unsafe=True)
            async with aiohttp.ClientSession(headers={"Origin": base}, cookie_jar=jar) as client:
                async with client.get(f"{base}/?token=tok") as opened:
                    assert opened.status == 200 and "agent-supervisor" in await opened.text()
                    assert opened.history[0].status == 303
                await scenario(client, base, seen)
        finally:
            await runner.cleanup()
            await daemon.cleanup()
            await owners.cleanup()

    asyncio.run(main())


async def post(client: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any]:
    async with client.post(url, data=json.dumps(body),
                           headers={"Content-Type": "application/json"}) as resp:
        return resp.status, await resp.json()


def test_an_action_forwards_only_scope_and_reason(tmp_path: Path) -> None:
    async def scenario(client: aiohttp.ClientSession, base: str, seen: list[Any]) -> None:
        status, _ = await post(client, f"{base}/api/actions/kill",
                               {"scope": {"agent": "a1"}, "reason": "INC-1", "confirm": "a1",
                                "extra": "dropped"})
        assert status == 200
        assert seen[-1] == ("POST", "/v1/actions/kill",
                            {"scope": {"agent": "a1"}, "reason": "INC-1"})
        status, _ = await post(client, f"{base}/api/actions/pause", {"scope": {"agent": "a1"}})
        assert status == 200 and seen[-1][2] == {"scope": {"agent": "a1"}, "reason": ""}
        status, _ = await post(client, f"{base}/api/actions/stop",
                               {"scope": {"agent": "a1"}, "grace": "5s"})
        assert seen[-1][2] == {"scope": {"agent": "a1"}, "reason": "", "grace": "5s"}
        status, _ = await post(client, f"{base}/api/actions/kill",
                               {"scope": {"class": "c"}, "reason": "r", "confirm": "c"})
        assert status == 200 and seen[-1][2] == {"scope": {"class": "c"}, "reason": "r"}

    with_console(tmp_path, scenario)


def test_refusals_reach_no_daemon(tmp_path: Path) -> None:
    bad = [
        ("kill", {"scope": {"agent": "a1"}, "reason": "r"}, "confirm"),
        ("kill", {"scope": {"agent": "a1"}, "reason": "r", "confirm": "a2"}, "confirm"),
        ("kill", {"scope": {"agent": "a1"}, "reason": "  ", "confirm": "a1"}, "reason"),
        ("pause", {"scope": {"class": "c"}, "confirm": "c"}, "reason"),
        ("resume", {"scope": {"class": "c"}, "reason": "r"}, "confirm"),
        ("kill", {"scope": {"all": True}, "reason": "r", "confirm": "all"}, "scope"),
        ("kill", {"scope": {"agent": "a", "class": "c"}, "reason": "r"}, "scope"),
        ("kill", {"scope": {"agent": 7}, "reason": "r"}, "scope"),
        ("pause", {"scope": {"agent": "a"}, "reason": "x" * 501}, "reason"),
        ("explode", {"scope": {"agent": "a"}}, "verb"),
    ]

    async def scenario(client: aiohttp.ClientSession, base: str, seen: list[Any]) -> None:
        await asyncio.sleep(0)
        before = [s for s in seen if s[1].startswith("/v1/actions")]
        for verb, body, field in bad:
            status, answer = await post(client, f"{base}/api/actions/{verb}", body)
            assert status == 422, (verb, body)
            assert answer["error"]["detail"]["field"] == field, (verb, body, answer)
            assert answer["error"]["detail"]["hint"], "every refusal says what to do"
        async with client.post(f"{base}/api/actions/pause", data="scope=x",
                               headers={"Content-Type": "application/x-www-form-urlencoded"}
                               ) as resp:
            assert resp.status == 422
        assert [s for s in seen if s[1].startswith("/v1/actions")] == before

    with_console(tmp_path, scenario)


def test_the_daemons_errors_reach_the_page_unchanged(tmp_path: Path) -> None:
    async def scenario(client: aiohttp.ClientSession, base: str, seen: list[Any]) -> None:
        status, answer = await post(client, f"{base}/api/actions/kill",
                                    {"scope": {"agent": "guarded"}, "reason": "r",
                                     "confirm": "guarded"})
        assert (status, answer) == (403, FORBIDDEN)

    with_console(tmp_path, scenario)


def test_approvals_need_a_reason_to_deny(tmp_path: Path) -> None:
    async def scenario(client: aiohttp.ClientSession, base: str, seen: list[Any]) -> None:
        status, answer = await post(client, f"{base}/api/approvals/ab%2Fcd/deny", {})
        assert status == 422 and answer["error"]["detail"]["field"] == "reason"
        status, _ = await post(client, f"{base}/api/approvals/ab12/approve", {"reason": "ok"})
        assert status == 200 and seen[-1] == ("POST", "/v1/approvals/ab12/approve",
                                              {"reason": "ok"})
        status, _ = await post(client, f"{base}/api/approvals/ab12/deny", {"reason": "no"})
        assert seen[-1] == ("POST", "/v1/approvals/ab12/deny", {"reason": "no"})
        status, _ = await post(client, f"{base}/api/approvals/ab12/maybe", {"reason": "no"})
        assert status == 404

    with_console(tmp_path, scenario)


def test_actions_go_to_the_owners_socket_when_there_is_one(tmp_path: Path) -> None:
    owner_seen: list[Any] = []

    async def scenario(client: aiohttp.ClientSession, base: str, seen: list[Any]) -> None:
        status, _ = await post(client, f"{base}/api/actions/kill",
                               {"scope": {"agent": "a1"}, "reason": "r", "confirm": "a1"})
        assert status == 200
        assert owner_seen == [("POST", "/v1/actions/kill",
                               {"scope": {"agent": "a1"}, "reason": "r"})]
        assert not [s for s in seen if s[0] == "POST"], "not on the control socket"
        async with client.get(f"{base}/api/session") as resp:
            assert resp.status == 200
        assert ("GET", "/v1/health", None) in seen, "reads stay on the control socket"
        assert not [s for s in owner_seen if s[0] == "GET"]

    with_console(tmp_path, scenario, owner_seen)
