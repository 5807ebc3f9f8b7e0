"""The web console end to end: a real daemon (with the egress gateway and a viewer-role user),
`agentctl console` as a real process, and a real headless Chromium clicking through it. What
the console lets through is what the daemon's roles allow, and nothing from another origin or
without the token gets in. The runbook's screenshots come from here
(AGENT_SUPERVISOR_SCREENSHOTS=docs/img). Needs root, chromium, chromedriver."""

from __future__ import annotations

import http.client
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By

from tests.support.browser import chromium
from tests.support.console import REPO, Console, console, shot
from tests.support.daemon import Daemon, wait_for
from tests.support.egress import LLM_ROUTE, GatewayRig, gateway_rig, host_request


@pytest.fixture(scope="module")
def viewer() -> Iterator[pwd.struct_passwd]:
    tag = os.urandom(2).hex()
    group, name = f"asc-sock-{tag}", f"asc-view-{tag}"
    subprocess.run(["groupadd", group], check=True)
    try:
        subprocess.run(["useradd", "-M", "-N", "-s", "/usr/sbin/nologin", "-G", group, name],
                       check=True)
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)
        subprocess.run(["groupdel", group], check=False, capture_output=True)


@pytest.fixture(scope="module")
def rig(viewer: pwd.struct_passwd) -> Iterator[GatewayRig]:
    from tests.conftest import require_root_and_runc

    require_root_and_runc()
    # Not under pytest's 0700 tmp: the sandboxes must traverse it.
    root = Path(tempfile.mkdtemp(prefix="as-console-", dir="/tmp"))
    root.chmod(0o755)
    group = os.getgrouplist(viewer.pw_name, viewer.pw_gid)
    import grp

    sock_group = next(grp.getgrgid(g).gr_name for g in group
                      if grp.getgrgid(g).gr_name.startswith("asc-sock-"))
    with gateway_rig(root, daemon_config={"daemon": {"socket_group": sock_group},
                                          "roles": {"viewer": [f"user:{viewer.pw_name}"]}}
                     ) as running:
        yield running
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def owner_console(rig: GatewayRig) -> Iterator[Console]:
    with console(rig.daemon) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    with chromium() as driver:
        yield driver


@pytest.fixture(scope="module")
def opened(browser: WebDriver, owner_console: Console) -> WebDriver:
    """The owner's console in the browser: with the session the first test bought with the
    token, or (that test deselected) with the token now."""
    browser.get(owner_console.base + "/")
    if "console_refused" in browser.page_source:
        browser.get(owner_console.url)
    return browser


@pytest.fixture
def page(opened: WebDriver, owner_console: Console) -> WebDriver:
    """The owner's console page, live (reloaded if a test went elsewhere)."""
    if not opened.current_url.startswith(owner_console.base + "/") or not opened.find_elements(
            By.ID, "link"):
        opened.get(owner_console.base + "/")
    wait_for(lambda: opened.find_element(By.ID, "link").text == "live", 30,
             what="the live stream")
    return opened


def state_of(daemon: Daemon, name: str) -> str:
    return str(daemon.client.agent(name)["state"])


def badge(page: WebDriver, name: str) -> str:
    found = page.find_elements(By.CSS_SELECTOR, f"#agent-{name} .badge")
    try:
        return found[0].text.lower() if found else ""
    except StaleElementReferenceException:
        return ""


def click(page: WebDriver, element_id: str, timeout: float = 20) -> None:
    def clicked() -> bool:
        found = page.find_elements(By.ID, element_id)
        try:
            if found and found[0].is_displayed() and found[0].is_enabled():
                found[0].click()
                return True
        except StaleElementReferenceException:
            pass
        return False

    wait_for(clicked, timeout, what=f"#{element_id}")


def tab(page: WebDriver, name: str) -> None:
    click(page, f"tab-{name}")


def run_agent(daemon: Daemon, name: str, agent_class: str, *more: str) -> None:
    daemon.agentctl("run", "--detach", "--name", name, "--class", agent_class, *more, "--",
                    "sh", "-c", "while :; do :; done & sleep 600", check=True)


def audit(daemon: Daemon, verb: str) -> list[dict[str, Any]]:
    return [e for e in daemon.client.audit(limit=10_000)["entries"] if e["verb"] == verb]


def raw(console: Console, method: str, path: str, headers: dict[str, str],
        body: Any = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", console.port, timeout=30)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=payload, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, json.loads(data) if data else None
    finally:
        conn.close()


def session_cookie(page: WebDriver, console: Console) -> str:
    name = f"agent_supervisor_console_{console.port}"
    cookie = page.get_cookie(name)
    assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    return f"{name}={cookie['value']}"


def test_the_page_opens_only_with_its_token_once(rig: GatewayRig, owner_console: Console,
                                                 browser: WebDriver) -> None:
    browser.get(owner_console.base + "/")
    assert "console_refused" in browser.page_source
    assert not browser.find_elements(By.ID, "agents")
    browser.get(owner_console.base + "/?token=not-the-token")
    assert "console_refused" in browser.page_source
    browser.get(owner_console.url)
    wait_for(lambda: browser.find_element(By.ID, "link").text == "live", 30,
             what="the live stream")
    assert urlsplit(browser.current_url).query == "", "the token leaves the address bar"
    assert browser.find_element(By.ID, "operator").text == "acting as root (uid 0)"
    cookie = session_cookie(browser, owner_console)
    # The token is spent: without the cookie, the same URL is refused.
    name, value = cookie.split("=", 1)
    browser.delete_cookie(name)
    browser.get(owner_console.url)
    assert "console_refused" in browser.page_source
    assert not browser.find_elements(By.ID, "agents")
    browser.add_cookie({"name": name, "value": value, "path": "/", "httpOnly": True,
                        "sameSite": "Strict"})
    # The session cookie, not the token, opens the API; and only under the console's own Host.
    status, body = raw(owner_console, "GET", "/api/session", {})
    assert status == 403 and body["error"]["detail"]["check"] == "session"
    status, body = raw(owner_console, "GET", "/api/session", {"Cookie": cookie})
    assert status == 200 and body["operator"]["uid"] == 0
    for host in (f"rebind.example:{owner_console.port}", "127.0.0.1:1", "localhost"):
        status, body = raw(owner_console, "GET", "/api/session",
                           {"Cookie": cookie, "Host": host})
        assert status == 403 and body["error"]["detail"]["check"] == "host", host


def test_foreign_origins_cannot_act(rig: GatewayRig, owner_console: Console,
                                    page: WebDriver) -> None:
    run_agent(rig.daemon, "target", "victims")
    cookie = session_cookie(page, owner_console)
    kill = {"scope": {"agent": "target"}, "reason": "csrf", "confirm": "target"}
    json_type = {"Content-Type": "application/json", "Cookie": cookie}
    for origin in ("http://evil.example", f"http://127.0.0.1:{owner_console.port + 1}",
                   f"https://127.0.0.1:{owner_console.port}", "null", None):
        headers = dict(json_type, **({"Origin": origin} if origin else {}))
        status, body = raw(owner_console, "POST", "/api/actions/kill", headers, kill)
        assert status == 403 and body["error"]["detail"]["check"] == "origin", origin
    status, body = raw(owner_console, "POST", "/api/actions/kill",
                       dict(json_type, Origin=owner_console.base, **{
                           "Sec-Fetch-Site": "cross-site"}), kill)
    assert status == 403 and body["error"]["detail"]["check"] == "origin"
    # The server asks for the confirmation too, not only the page.
    status, body = raw(owner_console, "POST", "/api/actions/kill",
                       dict(json_type, Origin=owner_console.base),
                       {"scope": {"agent": "target"}, "reason": "no confirm"})
    assert status == 422 and body["error"]["detail"]["field"] == "confirm"
    status, body = raw(owner_console, "POST", "/api/actions/kill",
                       dict(json_type, Origin=owner_console.base),
                       {"scope": {"agent": "target"}, "confirm": "target"})
    assert status == 422 and body["error"]["detail"]["field"] == "reason"
    # A real page on another loopback origin, opened in the operator's own browser (which
    # holds the session cookie), tries both a form post and a fetch.
    attack = f"""<!doctype html><body>
    <form id="f" method="post" enctype="text/plain"
          action="{owner_console.base}/api/actions/kill">
      <input name='{{"scope":{{"agent":"target"}},"reason":"x","confirm":"target","a":"'
             value='"}}'>
    </form>
    <script>
      fetch("{owner_console.base}/api/actions/pause", {{method: "POST", credentials: "include",
        mode: "no-cors", headers: {{"Content-Type": "text/plain"}},
        body: JSON.stringify({{scope: {{agent: "target"}}, reason: "x"}})}})
        .finally(() => document.getElementById("f").submit());
    </script></body>"""

    class Attacker(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(attack.encode())

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.2", 0), Attacker)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        page.get(f"http://127.0.0.2:{server.server_address[1]}/")
        wait_for(lambda: "console_refused" in page.page_source, 20,
                 what="the console's refusal of the cross-site form")
    finally:
        server.shutdown()
        server.server_close()
    assert state_of(rig.daemon, "target") == "active"
    assert not [e for e in audit(rig.daemon, "kill") + audit(rig.daemon, "pause")
                if e["target"] == "target"]
    rig.daemon.agentctl("kill", "target", "--reason", "test done", check=True)


def test_incident_find_pause_kill_by_class_verify_reactivate(rig: GatewayRig,
                                                            page: WebDriver) -> None:
    daemon = rig.daemon
    for name, agent_class in (("scraper-1", "scrapers"), ("scraper-2", "scrapers"),
                              ("summariser", "writers")):
        run_agent(daemon, name, agent_class)
    tab(page, "agents")
    wait_for(lambda: all(badge(page, n) == "active"
                         for n in ("scraper-1", "scraper-2", "summariser")), 30,
             what="three active badges")
    badge_colour = page.find_element(By.CSS_SELECTOR, "#agent-scraper-1 .badge"
                                     ).value_of_css_property("background-color")
    assert badge_colour == "rgba(23, 122, 60, 1)"  # --green
    # Live numbers: the busy loop shows CPU, the run has memory.
    wait_for(lambda: page.find_element(By.CSS_SELECTOR, "#agent-scraper-1 .cpu").text.endswith(
        "%"), 30, what="a CPU figure")
    assert page.find_element(By.CSS_SELECTOR, "#agent-scraper-1 .mem").text.endswith("iB")
    shot(page, "agents")

    # Pause and resume: one click each, and the daemon's state follows.
    click(page, "pause-scraper-1")
    wait_for(lambda: state_of(daemon, "scraper-1") == "paused", 20, what="paused in the daemon")
    wait_for(lambda: badge(page, "scraper-1") == "paused", 20, what="the paused badge")
    assert page.find_element(By.CSS_SELECTOR, "#agent-scraper-1 .badge").value_of_css_property(
        "background-color") == "rgba(180, 95, 6, 1)"  # --amber
    shot(page, "paused")
    click(page, "resume-scraper-1")
    wait_for(lambda: state_of(daemon, "scraper-1") == "active", 20, what="resumed")

    # Kill one agent: the dialog names it, and goes only with its name typed and a reason.
    click(page, "kill-summariser")
    dialog = page.find_element(By.ID, "confirm")
    assert dialog.is_displayed()
    assert page.find_element(By.ID, "confirm-title").text == "Kill agent summariser"
    go = page.find_element(By.ID, "confirm-go")
    assert go.text == "Kill summariser" and not go.is_enabled()
    page.find_element(By.ID, "confirm-input").send_keys("summarizer")
    page.find_element(By.ID, "confirm-reason").send_keys("leaking customer data to a paste site")
    assert not go.is_enabled(), "a misspelt name does not arm the button"
    page.find_element(By.ID, "confirm-input").clear()
    page.find_element(By.ID, "confirm-input").send_keys("summariser")
    assert go.is_enabled()
    shot(page, "kill-dialog")
    go.click()
    wait_for(lambda: state_of(daemon, "summariser") == "killed", 20, what="killed")
    wait_for(lambda: not dialog.is_displayed(), 10, what="the dialog to close")
    wait_for(lambda: badge(page, "summariser") == "killed", 20, what="the killed badge")
    row = wait_for(lambda: [e for e in audit(daemon, "kill") if e["target"] == "summariser"],
                   20, what="the kill's audit row")[-1]
    assert row["reason"] == "leaking customer data to a paste site"
    assert row["detail"]["actor"]["uid"] == 0 and row["outcome"] == "ok"

    # Kill by class: pick the class, type it, give a reason.
    from selenium.webdriver.support.ui import Select

    Select(page.find_element(By.ID, "class-filter")).select_by_value("scrapers")
    click(page, "class-kill")
    assert page.find_element(By.ID, "confirm-title").text == "Kill class scrapers"
    page.find_element(By.ID, "confirm-input").send_keys("scrapers")
    page.find_element(By.ID, "confirm-reason").send_keys("INC-2231: runaway crawl")
    click(page, "confirm-go")
    wait_for(lambda: {state_of(daemon, n) for n in ("scraper-1", "scraper-2")} == {"killed"},
             20, what="the class killed")
    # The state flips first (step 1 of the kill path); the audit rows follow the kill.
    wait_for(lambda: {e["target"] for e in audit(daemon, "kill")
                      if e["reason"] == "INC-2231: runaway crawl"} >= {"scraper-1", "scraper-2"},
             20, what="the class kill's audit rows")
    wait_for(lambda: badge(page, "scraper-2") == "killed", 20, what="class badges")
    Select(page.find_element(By.ID, "class-filter")).select_by_value("")
    shot(page, "killed")

    # Verify the audit chain from the audit view.
    tab(page, "audit")
    click(page, "verify")
    wait_for(lambda: page.find_element(By.ID, "verify-result").text.startswith("✓"), 60,
             what="the verify result")
    assert "chain intact" in page.find_element(By.ID, "verify-result").text
    shot(page, "audit")

    # Reactivate: the hold is lifted and the agent is idle.
    tab(page, "agents")
    click(page, "reactivate-summariser")
    page.find_element(By.ID, "confirm-reason").send_keys("INC-2231 closed")
    click(page, "confirm-go")
    wait_for(lambda: state_of(daemon, "summariser") == "idle", 20, what="reactivated")
    wait_for(lambda: badge(page, "summariser") == "idle", 20, what="the idle badge")


def test_the_audit_view_is_live(rig: GatewayRig, page: WebDriver) -> None:
    tab(page, "audit")
    run_agent(rig.daemon, "streamer", "live")
    rig.daemon.agentctl("pause", "streamer", "--reason", "seen live", check=True)
    entry = [e for e in audit(rig.daemon, "pause") if e["target"] == "streamer"][-1]

    def shown() -> Any:
        rows = page.find_elements(By.ID, f"audit-{entry['seq']}")
        return rows[0] if rows else None

    row = wait_for(shown, 20, what="the pause row to appear without a reload")
    assert "seen live" in row.text and "streamer" in row.text
    assert entry["actor"] in row.find_element(By.CSS_SELECTOR, ".actor").text
    # ISO 8601 with its zone.
    assert row.find_elements(By.TAG_NAME, "td")[1].text.endswith("Z")
    rig.daemon.agentctl("kill", "streamer", "--reason", "done", check=True)


def test_an_approval_granted_in_the_ui_reaches_the_gateway(rig: GatewayRig,
                                                          page: WebDriver) -> None:
    profile = rig.profile("held", """
        [network.gateway]
        approvals = ["DELETE *"]
        approval_timeout = "2m"
    """.replace("        ", "") + LLM_ROUTE)
    # The gateway worker may be restarting (it is restarted when it exits): wait for it.
    wait_for(lambda: rig.daemon.agentctl("run", "--detach", "--name", "refunder", "--profile",
                                         profile, "--", "sleep", "600").returncode == 0, 90,
             interval=2, what="a launch with the egress gateway")
    env = rig.proxy_env("refunder")
    replies: list[bytes] = []
    sender = threading.Thread(target=lambda: replies.append(host_request(
        env, b"DELETE http://llm.gateway/v1/items/7 HTTP/1.1\r\nHost: llm.gateway\r\n"
             b"Connection: close\r\n\r\n", timeout=120)), daemon=True)
    sender.start()
    held = wait_for(lambda: rig.daemon.client.approvals()["approvals"], 30,
                    what="the held request")[0]
    tab(page, "approvals")
    wait_for(lambda: page.find_elements(By.ID, f"approval-{held['id']}"), 20,
             what="the request in the queue")
    assert page.find_element(By.ID, "approvals-count").text == "1"
    assert not [s for s in rig.upstream.seen if s["method"] == "DELETE"], "held, not sent"
    page.find_element(By.ID, f"approval-reason-{held['id']}").send_keys("ticket 42")
    shot(page, "approvals")
    click(page, f"approve-{held['id']}")
    sender.join(60)
    assert replies and replies[0].startswith(b"HTTP/1.1 200"), replies
    assert [s["path"] for s in rig.upstream.seen if s["method"] == "DELETE"] == ["/v1/items/7"]
    granted = audit(rig.daemon, "approval_granted")[-1]
    assert granted["reason"] == "ticket 42" and granted["outcome"] == "approved"
    wait_for(lambda: not page.find_elements(By.ID, f"approval-{held['id']}"), 20,
             what="the queue to empty")
    rig.daemon.agentctl("kill", "refunder", "--reason", "test done", check=True)


def test_a_drill_runs_from_the_ui(rig: GatewayRig, page: WebDriver) -> None:
    tab(page, "drills")
    page.find_element(By.ID, "drill-processes").clear()
    page.find_element(By.ID, "drill-processes").send_keys("3")
    click(page, "drill-run")
    wait_for(lambda: page.find_element(By.ID, "drill-status").text.split(":")[0]
             in ("passed", "FAILED"), 120, what="the drill's result")
    newest = rig.daemon.client.drills(limit=1)["drills"][0]
    row = wait_for(lambda: page.find_elements(By.ID, f"drill-{newest['id']}"), 20,
                   what="the drill row")[0]
    assert ("OK" if newest["passed"] else "FAILED") in row.text
    assert newest["processes"] == 3 and newest["actor"] == "root(uid=0)"
    shot(page, "drills")


def test_a_viewers_console_cannot_kill(rig: GatewayRig, viewer: pwd.struct_passwd,
                                       browser: WebDriver) -> None:
    run_agent(rig.daemon, "guarded", "keep")
    refused = subprocess.run(
        [sys.executable, "-m", "supervisor.cli", "kill", "guarded", "--reason", "x", "--json"],
        env={"AGENT_SUPERVISOR_SOCKET": str(rig.daemon.socket), "PYTHONPATH": str(REPO),
             "PATH": "/usr/bin:/bin", "HOME": "/"}, capture_output=True, text=True, cwd="/",
        user=viewer.pw_uid, group=viewer.pw_gid,
        extra_groups=os.getgrouplist(viewer.pw_name, viewer.pw_gid), timeout=60)
    cli_error = json.loads(refused.stdout)["error"]
    assert cli_error["code"] == "forbidden"
    with console(rig.daemon, viewer) as viewers:
        browser.get(viewers.url)
        wait_for(lambda: badge(browser, "guarded") == "active", 30, what="the viewer's view")
        assert browser.find_element(By.ID, "operator").text == (
            f"acting as {viewer.pw_name} (uid {viewer.pw_uid})")
        before = len(audit(rig.daemon, "kill"))
        click(browser, "kill-guarded")
        browser.find_element(By.ID, "confirm-input").send_keys("guarded")
        browser.find_element(By.ID, "confirm-reason").send_keys("trying my luck")
        click(browser, "confirm-go")
        error = wait_for(lambda: [e for e in browser.find_elements(By.ID, "confirm-error")
                                  if e.is_displayed()], 20, what="the refusal")[0]
        assert error.text.startswith("forbidden")
        assert "needs owner" in error.text
        hint = cli_error["detail"].get("hint")
        if hint is not None:
            assert f"hint: {hint}" in error.text
        shot(browser, "viewer-refused")
        assert state_of(rig.daemon, "guarded") == "active"
        refusals = [e for e in audit(rig.daemon, "kill")[before:]
                    if e["outcome"] == "refused:forbidden"]
        assert refusals and refusals[-1]["detail"]["actor"]["uid"] == viewer.pw_uid
    rig.daemon.agentctl("kill", "guarded", "--reason", "test done", check=True)


def test_live_streams_are_capped(rig: GatewayRig) -> None:
    with console(rig.daemon, None, "--max-clients", "2") as capped:
        import http.cookiejar
        import urllib.request

        jar = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        opener.open(capped.url, timeout=30).read()
        cookie = next(iter(jar))
        headers = {"Cookie": f"{cookie.name}={cookie.value}"}
        streams = []
        for _ in range(2):
            conn = http.client.HTTPConnection("127.0.0.1", capped.port, timeout=30)
            conn.request("GET", "/api/events", headers=headers)
            resp = conn.getresponse()
            assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
            assert resp.readline().startswith(b"event: ")
            streams.append(conn)
        status, body = raw(capped, "GET", "/api/events", headers)
        assert status == 429 and body["error"]["code"] == "too_many_requests"
        streams.pop().close()
        # A closed stream frees its slot.
        def reopened() -> bool:
            return raw_status(capped, headers) == 200

        wait_for(reopened, 40, what="a freed slot")
        for conn in streams:
            conn.close()


def raw_status(console: Console, headers: dict[str, str]) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", console.port, timeout=30)
    try:
        conn.request("GET", "/api/events", headers=headers)
        return conn.getresponse().status
    finally:
        conn.close()
