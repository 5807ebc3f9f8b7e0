"""GET /v1/agents pages and filters on a real daemon, agentctl ls reads every page, and live
numbers come from the telemetry sampler (issue 12). Needs root."""

from __future__ import annotations

from tests.e2e.test_api_input import json_error, request
from tests.support.daemon import Daemon, wait_for


def test_agents_page_and_filter(daemon: Daemon) -> None:
    for name, agent_class in (("a-idle", "batch"), ("b-idle", "web"), ("c-idle", "batch")):
        daemon.agentctl("run", "--name", name, "--class", agent_class, "--", "true",
                        check=True)
    for name in ("d-live", "e-live"):
        daemon.agentctl("run", "--detach", "--name", name, "--class", "web", "--", "sleep",
                        "600", check=True)
    client = daemon.client
    names = ["a-idle", "b-idle", "c-idle", "d-live", "e-live"]

    seen, cursor, pages = [], None, 0
    while True:
        page = client.agents_page(limit=2, cursor=cursor)
        assert page["total"] == 5 and len(page["agents"]) <= 2
        seen += [a["name"] for a in page["agents"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert (seen, pages) == (names, 3)
    assert [a["name"] for a in client.agents(page_size=2)["agents"]] == names

    web = client.agents_page(agent_class="web")
    assert ([a["name"] for a in web["agents"]], web["total"]) == (
        ["b-idle", "d-live", "e-live"], 3)
    live_web = client.agents(agent_class="web", state="active", page_size=1)
    assert [a["name"] for a in live_web["agents"]] == ["d-live", "e-live"]
    assert client.agents_page(state="killed")["agents"] == []

    listed = daemon.agentctl("ls", "--class", "web", check=True).stdout
    assert "b-idle" in listed and "d-live" in listed and "a-idle" not in listed
    assert [a["name"] for a in daemon.agentctl_json("ls", "--state", "idle")["agents"]] == [
        "a-idle", "b-idle", "c-idle"]

    for query in ("limit=0", "limit=1001", "limit=x", "limit=-1", "limit=" + "9" * 50):
        json_error(request(daemon.socket, "GET", f"/v1/agents?{query}"), 422,
                   "invalid_request")

    # Live numbers of a running agent come from the sampler's latest sample.
    stats = wait_for(lambda: client.agent("d-live").get("stats"), timeout=30,
                     what="the sampler's numbers for d-live")
    assert stats["processes"] >= 1 and stats["memory_bytes"]
    listed_stats = {a["name"]: a["stats"] for a in client.agents()["agents"]}
    assert listed_stats["d-live"] and listed_stats["a-idle"] is None
