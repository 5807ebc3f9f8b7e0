"""Fleet halts on five real daemons in their own network namespaces, through a real etcd with
TLS and roles: membership, halt of a class, a host and all, holds that outlast a host that was
down, an etcd restart in the middle of a halt, and the store's roles refusing a host that
tries to issue, forge or rewrite what is not its own."""

from __future__ import annotations

import json
import secrets
import threading
import time
from typing import Any

import pytest

from supervisor.cli.fleet import FleetContext, lift_holds
from supervisor.errors import FleetPermissionDenied, SupervisorError
from supervisor.fleet.model import Ack, FleetAction, Selector, dumps, new_action_id
from tests.fleet.support import PREFIX, Fleet, Host
from tests.support.daemon import wait_for

pytestmark = [pytest.mark.privileged, pytest.mark.e2e]


def _launch(host: Host, name: str, agent_class: str) -> Any:
    return host.daemon.client.run({"name": name, "class": agent_class,
                                   "command": ["sleep", "600"]})


def _registered(fleet: Fleet, *names: str) -> None:
    """Until every named agent is in its host's registration: agentctl fleet checks that a
    --class or --agent reaches a registered agent before it writes (a registration follows
    a launch by a moment)."""
    def listed() -> bool:
        with fleet.operator_client() as operator:
            kvs, _ = operator.get_prefix(fleet.keys.members)
        seen = {a["name"] for kv in kvs for a in kv.json().get("agents", [])}
        return set(names) <= seen

    wait_for(listed, timeout=30, what=f"{', '.join(names)} in the registrations")


def _state(host: Host, name: str) -> str:
    return str(host.daemon.client.agent(name)["state"])


def _refusal(host: Host, name: str, agent_class: str) -> str | None:
    try:
        _launch(host, name, agent_class)
    except SupervisorError as exc:
        return exc.code
    return None


def _lift_all(fleet: Fleet) -> None:
    """Every hold lifted and confirmed: the same code as `agentctl fleet lift --all-holds`
    (test_every_host_registers_with_its_agents runs the command itself), in this process,
    since a Python start per cleanup costs seconds on a loaded machine."""
    ctx = FleetContext(fleet.credentials("operator", fleet.operator_password,
                                         fleet.operator_cert), PREFIX)
    try:
        kvs, _ = ctx.etcd.get_prefix(ctx.keys.holds)
        if kvs:
            # A generous deadline: the machine is shared and timings are never what is tested.
            lifted = lift_holds(ctx, None, "test cleanup", deadline=60)
            assert not lifted["unconfirmed"], lifted
    finally:
        ctx.etcd.close()


# The most rows one read of the audit API returns (it answers the newest rows first).
AUDIT_PAGE = 10_000


def audit_window(host: Host, after: int = 0) -> list[dict[str, Any]]:
    """Every audit row of `host` after seq `after`. The API answers the newest `limit` rows, so
    a read that comes back full may have left older ones out: that fails here, never a
    missing row later (a shared fleet's hosts gather rows from every test, and a test that
    hammers refusals adds one per try)."""
    entries = host.daemon.client.audit(limit=AUDIT_PAGE, after=after)["entries"]
    assert len(entries) < AUDIT_PAGE, (
        f"{host.host_id}: more than {AUDIT_PAGE} audit rows after seq {after}; read a narrower "
        "window")
    return entries


def _audit_rows(host: Host, verb: str) -> list[dict[str, Any]]:
    return [row for row in audit_window(host) if row["verb"] == verb]


def test_every_host_registers_with_its_agents(fleet: Fleet) -> None:
    tag = secrets.token_hex(2)
    for host in fleet.hosts:
        _launch(host, f"reg-{tag}-{host.host_id}", "web")

    def listed() -> dict[str, Any] | None:
        code, result = fleet.agentctl_json("ls")
        assert code == 0
        rows = {r["host"]: r for r in result["hosts"] if r["alive"]}
        names = {a["name"] for r in rows.values() for a in r["agents"]}
        wanted = {f"reg-{tag}-{h.host_id}" for h in fleet.hosts}
        return rows if len(rows) == 5 and wanted <= names else None

    rows = wait_for(listed, timeout=15, what="every host and agent in fleet ls")
    assert rows["h1"]["labels"] == {"zone": "a"}
    assert rows["h1"]["version"]
    # Each live host's lease as etcd has it (LeaseTimeToLive, read with the operator's
    # credentials): granted lease_ttl (4 s here), with what is left of it.
    for row in rows.values():
        assert "lease_error" not in row, row
        assert row["lease_ttl_granted_s"] == 4 and 0 <= row["lease_ttl_left_s"] <= 4, row
        assert row["agents_truncated"] is False and row["agents_total"] == len(row["agents"])
    text = fleet.agentctl("ls")
    assert text.returncode == 0 and "h5" in text.stdout and f"reg-{tag}-h3" in text.stdout
    assert "LEASE LEFT" in text.stdout and "/4s" in text.stdout
    code, killed = fleet.agentctl_json("kill", "--agent", f"reg-{tag}-h3", "--reason", "one",
                                       "--deadline", "60", timeout=120)
    assert code == 0, killed
    affected = {r["host"]: r for r in killed["hosts"]}
    assert affected["h3"]["agents_affected"] == 1
    assert _state(fleet.hosts[2], f"reg-{tag}-h3") == "killed"
    assert _state(fleet.hosts[0], f"reg-{tag}-h1") == "active"
    code, lifted = fleet.agentctl_json("lift", "--all-holds", "--reason", "test cleanup",
                                       "--deadline", "60", timeout=120)
    assert code == 0 and not lifted["unconfirmed"], lifted
    assert fleet.agentctl_json("ls")[1]["holds"] == []
    # Lifted: the agent is reactivated (killed -> idle), free to be launched again.
    assert _state(fleet.hosts[2], f"reg-{tag}-h3") == "idle"


def test_halt_of_a_class_kills_it_everywhere_and_holds_its_launches(fleet: Fleet) -> None:
    tag = secrets.token_hex(2)
    for host in fleet.hosts:
        _launch(host, f"w-{tag}", f"web{tag}")
        _launch(host, f"o-{tag}", "other")
    _registered(fleet, f"w-{tag}")
    # A typo of the class in an incident: an error naming the class meant, and nothing
    # written (no action, no hold, no host touched).
    typo = fleet.agentctl("kill", "--class", f"wbe{tag}", "--reason", "class halt")
    assert typo.returncode == 3, typo.stdout + typo.stderr
    assert "scope_empty" in typo.stderr and f"did you mean web{tag}" in typo.stderr
    assert "--allow-empty" in typo.stderr
    with fleet.operator_client() as operator:
        assert not [kv for kv in operator.get_prefix(fleet.keys.control)[0]
                    if f"wbe{tag}" in kv.value]
    code, result = fleet.agentctl_json("kill", "--class", f"web{tag}", "--reason",
                                       "class halt", "--deadline", "60", timeout=120)
    assert code == 0, result
    assert sorted(r["host"] for r in result["hosts"]) == ["h1", "h2", "h3", "h4", "h5"]
    for row in result["hosts"]:
        assert row["status"] == "confirmed" and row["agents_affected"] == 1, row
        assert row["slowest_time_to_halt_ms"] is not None and not row["survivors"]
        # Each host's stages in the order they happen (bench/fleet_halt.py times them): the
        # watch delivered it, the loop began it, the kill returned, the ack left, it arrived.
        t = row["timings"]
        assert result["started_at"] <= t["seen"] <= t["applying"] <= t["done"] <= t["sent"] \
            <= t["arrived"], row
    for host in fleet.hosts:
        assert _state(host, f"w-{tag}") == "killed"
        assert _state(host, f"o-{tag}") == "active"
        assert host.daemon.agentctl("ls").returncode == 0

    def registered_killed() -> bool:
        # The registrations held back while the kill was applied are published once the
        # acks are in the store.
        _code, listed = fleet.agentctl_json("ls")
        states = [a["state"] for r in listed["hosts"] if r["alive"] for a in r["agents"]
                  if a["name"] == f"w-{tag}"]
        return len(states) == 5 and set(states) == {"killed"}

    wait_for(registered_killed, timeout=15, what="every host's registration after the halt")
    # The hold: no new agent of that class on any host, until lifted.
    assert _refusal(fleet.hosts[1], f"new-{tag}", f"web{tag}") == "fleet_hold"
    assert _refusal(fleet.hosts[1], f"ok-{tag}", "other") is None
    # Every affected host's audit names the operator and the fleet action.
    action_id = result["actions"][0]
    for host in fleet.hosts:
        rows = [r for r in _audit_rows(host, "fleet_action")
                if r["detail"]["action"] == action_id]
        assert rows and rows[0]["detail"]["operator"] == "operator"
        kills = [r for r in _audit_rows(host, "kill") if r["target"] == f"w-{tag}"]
        assert kills and action_id in kills[-1]["actor"] and "operator" in kills[-1]["actor"]
    _lift_all(fleet)
    wait_for(lambda: _refusal(fleet.hosts[1], f"new-{tag}", f"web{tag}") is None,
             timeout=15, what="launches of the class after the lift")


def test_halt_of_one_host_and_of_all(fleet: Fleet) -> None:
    tag = secrets.token_hex(2)
    for host in fleet.hosts:
        _launch(host, f"a-{tag}", "web")
    code, result = fleet.agentctl_json("kill", "--host", "h2", "--reason", "host halt",
                                       "--deadline", "60", timeout=120)
    assert code == 0, result
    assert [r["host"] for r in result["hosts"]] == ["h2"]
    assert _state(fleet.hosts[1], f"a-{tag}") == "killed"
    assert _state(fleet.hosts[0], f"a-{tag}") == "active"
    assert _refusal(fleet.hosts[1], f"b-{tag}", "web") in ("fleet_hold", "global_halt")
    code, result = fleet.agentctl_json("kill", "--label", "zone=b", "--reason", "zone b",
                                       "--deadline", "60", timeout=120)
    assert code == 0, result
    assert [r["host"] for r in result["hosts"]] == ["h3", "h4", "h5"]
    code, result = fleet.agentctl_json("kill", "--all", "--reason", "everything",
                                       "--deadline", "60", timeout=120)
    assert code == 0, result
    assert len(result["hosts"]) == 5
    for host in fleet.hosts:
        assert _state(host, f"a-{tag}") == "killed"
        assert host.daemon.client.health().get("global_halt") in (True, None)
    text = fleet.agentctl("kill", "--all", "--reason", "again", "--deadline", "60",
                          timeout=120)
    assert text.returncode == 0 and "confirmed" in text.stdout
    _lift_all(fleet)
    for host in fleet.hosts:
        wait_for(lambda h=host: _refusal(h, f"c-{tag}", "web") is None, timeout=15,
                 what=f"launches on {host.host_id} after the lift")


def _running_again(fleet: Fleet, host: Host) -> None:
    """A finaliser for a test that stops a host: the tests after it find it running, held by
    nothing, whatever this one did."""
    if host.daemon.proc is None or host.daemon.proc.poll() is not None:
        host.start()
    _lift_all(fleet)


def test_a_host_down_during_the_halt_applies_it_before_any_launch(
        fleet: Fleet, request: pytest.FixtureRequest) -> None:
    tag = secrets.token_hex(2)
    host = fleet.hosts[0]
    _launch(host, f"d-{tag}", f"down{tag}")
    request.addfinalizer(lambda: _running_again(fleet, host))
    host.daemon.stop()
    # No live host runs the class now: a typo as far as agentctl can tell, refused with
    # nothing written; the operator who means it says so (--allow-empty).
    code, refused = fleet.agentctl_json("kill", "--class", f"down{tag}", "--reason",
                                        "while h1 is down", "--deadline", "60", timeout=120)
    assert code == 3 and refused["error"]["code"] == "scope_empty", refused
    with fleet.operator_client() as operator:
        assert not [kv for kv in operator.get_prefix(fleet.keys.holds)[0]
                    if f"down{tag}" in kv.value]
    code, result = fleet.agentctl_json("kill", "--class", f"down{tag}", "--reason",
                                       "while h1 is down", "--allow-empty", "--deadline", "60",
                                       timeout=120)
    assert code == 0, result
    assert "h1" not in [r["host"] for r in result["hosts"]]
    host.start()
    # The control socket answers only once the holds were read: the first launch is refused.
    assert _refusal(host, f"d2-{tag}", f"down{tag}") == "fleet_hold"
    joins = _audit_rows(host, "fleet_join")
    assert joins[-1]["detail"]["synced"] and result["actions"][0] in joins[-1]["detail"]["holds"]
    with fleet.operator_client() as operator:
        acks = wait_for(lambda: operator.get(fleet.keys.ack("h1", result["actions"][0])),
                        timeout=15, what="h1's ack")
    assert acks is not None and Ack.model_validate(acks.json()).host == "h1"
    _lift_all(fleet)


# Seconds, for the kill issued before etcd's restart and for its status asked after it.
DEADLINE = 40


def test_etcd_restarted_mid_halt(fleet: Fleet) -> None:
    tag = secrets.token_hex(2)
    for host in fleet.hosts:
        _launch(host, f"e-{tag}", f"etcd{tag}")
    _registered(fleet, f"e-{tag}")
    outcome: dict[str, Any] = {}

    def halt() -> None:
        ran = fleet.agentctl("kill", "--class", f"etcd{tag}", "--reason", "etcd restart",
                             "--deadline", str(DEADLINE), "--json", timeout=DEADLINE + 60)
        outcome["stderr"] = ran.stderr
        try:
            outcome["result"] = (ran.returncode, json.loads(ran.stdout))
        except ValueError:
            outcome["result"] = (ran.returncode, {"stdout": ran.stdout})

    def written() -> bool:
        with fleet.operator_client() as operator:
            kvs, _ = operator.get_prefix(fleet.keys.holds)
        return any(json.loads(kv.value)["selector"]["agent_class"] == f"etcd{tag}"
                   for kv in kvs)

    thread = threading.Thread(target=halt)
    thread.start()
    wait_for(written, timeout=30, interval=0.005, what="the action in the store")
    restart = time.monotonic()
    fleet.stop_etcd()
    fleet.start_etcd()
    restarted_in = time.monotonic() - restart
    thread.join(DEADLINE + 90)
    code, result = outcome["result"]

    def stored_acks(body: Any) -> list[str]:
        # Whether the hosts' acks are in the store: a host that wrote one and a command that
        # did not see it are different failures.
        ids = body.get("actions") or body.get("error", {}).get("detail", {}).get("actions") or []
        try:
            with fleet.operator_client() as operator:
                return [f"{h.host_id} {i}: "
                        + ("in the store" if operator.get(fleet.keys.ack(h.host_id, i))
                           else "absent") for h in fleet.hosts for i in ids]
        except Exception as exc:  # the message must still be built
            return [f"the store could not be read: {exc!r}"]

    def why(what: str, code: int, body: Any) -> str:
        # A string, whole: pytest cuts the repr of anything else it is given as the message
        # (a host's failure once read "...", with no way to tell what it was).
        return "\n".join([
            f"etcd was back after {restarted_in:.1f} s; {what} exited {code}:",
            json.dumps(body, indent=1, sort_keys=True),
            "the kill's stderr:", outcome.get("stderr", ""), "the acks:", *stored_acks(body),
            "the hosts' fleet log lines:",
            *(f"{h.host_id}: {line}" for h in fleet.hosts
              for line in [line for line in h.daemon.logs().splitlines()
                           if "fleet" in line and "seccomp" not in line][-12:])])

    # The command's deadline runs while etcd stops and starts, which on a machine at load 80
    # took over 40 s by itself: only then may it run out (exit 13, hosts "no answer", the
    # action durable). A host that failed is a failure whatever the timing.
    assert code == 0 or (code == 13 and restarted_in > DEADLINE / 2), why("kill", code, result)
    assert all(r["status"] in ("confirmed", "no answer") for r in result.get("hosts", [])), \
        why("kill", code, result)
    action_id = (result.get("actions") or result["error"]["detail"]["actions"])[0]
    # From the moment etcd answers again: every host has confirmed within the same tight
    # deadline, asked the way an operator follows up a kill that ran out of time.
    code, status = fleet.agentctl_json("status", action_id, "--deadline",
                                       str(DEADLINE), timeout=DEADLINE + 60)
    assert code == 0, why("status", code, status)
    assert sorted(r["host"] for r in status["hosts"]) == [h.host_id for h in fleet.hosts]
    assert all(r["status"] == "confirmed" and r["agents_affected"] == 1
               for r in status["hosts"]), why("status", code, status)
    for host in fleet.hosts:
        wait_for(lambda h=host: _state(h, f"e-{tag}") == "killed", timeout=30,
                 what=f"the kill on {host.host_id}")
    _lift_all(fleet)


def test_a_reason_with_bytes_that_are_not_utf8_halts_as_any_other(fleet: Fleet) -> None:
    """`agentctl fleet kill --reason` with argv bytes that are not UTF-8 (a pasted Latin-1
    ticket title) kills as a local kill does, the reason stored with U+FFFD: the fleet
    action's model refused it, so the halt was never written. The variant: an action written
    by another client with JSON's "\\udce9" is applied by the host, not dropped unread."""
    tag = secrets.token_hex(2)
    host = fleet.hosts[0]
    _launch(host, f"u-{tag}", f"utf{tag}")
    _launch(host, f"v-{tag}", f"raw{tag}")
    _registered(fleet, f"u-{tag}", f"v-{tag}")
    code, result = fleet.agentctl_json("kill", "--class", f"utf{tag}", "--reason",
                                       "ticket caf\udce9", "--deadline", "60", timeout=120)
    assert code == 0, result
    assert result["hosts"] and all(r["status"] == "confirmed" for r in result["hosts"]), result
    assert _state(host, f"u-{tag}") == "killed"
    [row] = [r for r in _audit_rows(host, "kill") if r["target"] == f"u-{tag}"]
    assert row["reason"] == "ticket caf\ufffd", row

    action = FleetAction(id=new_action_id(), verb="kill",
                         selector=Selector(agent_class=f"raw{tag}"), reason="placeholder",
                         operator="operator", issued_at=time.time())
    raw = dumps(action).replace('"placeholder"', '"ticket caf\\udce9"')
    assert "\\udce9" in raw
    with fleet.operator_client() as operator:
        operator.txn({fleet.keys.action(action.id): raw, fleet.keys.hold(action.id): raw}, [])
    [row] = wait_for(lambda: [r for r in _audit_rows(host, "kill")
                              if r["target"] == f"v-{tag}"], timeout=60,
                     what="the host to apply the action another client wrote")
    assert row["reason"] == "ticket caf\ufffd", row
    assert _state(host, f"v-{tag}") == "killed"
    _lift_all(fleet)


def test_a_host_cannot_issue_forge_or_rewrite(fleet: Fleet,
                                              request: pytest.FixtureRequest) -> None:
    """etcd's roles, not trust in the network: a host's credentials read control/ and write
    only under hosts/<itself>/."""
    host = fleet.hosts[2]
    client = host.creds(fleet)
    from supervisor.fleet.etcd import Etcd
    etcd = Etcd(client)
    request.addfinalizer(etcd.close)
    forged = FleetAction(id=new_action_id(), verb="kill", selector=Selector(all=True),
                         reason="forged", operator="operator", issued_at=0.0)
    attempts = {
        "issue an action": lambda: etcd.put(fleet.keys.action(forged.id), dumps(forged)),
        "add a hold": lambda: etcd.put(fleet.keys.hold(forged.id), dumps(forged)),
        "lift a hold": lambda: etcd.delete_prefix(fleet.keys.holds),
        "rewrite an action": lambda: etcd.delete_prefix(fleet.keys.actions),
        "write another's ack": lambda: etcd.put(fleet.keys.ack("h1", "x"), "{}"),
        "write another's registration": lambda: etcd.put(fleet.keys.registration("h4"), "{}"),
        "write another's anchor": lambda: etcd.put(fleet.keys.anchor("h4", 1), "{}"),
        "in a transaction": lambda: etcd.txn({fleet.keys.action(forged.id): dumps(forged)}, []),
    }
    for what, attempt in attempts.items():
        with pytest.raises(FleetPermissionDenied):
            attempt()
            pytest.fail(f"a host could {what}")
    with fleet.operator_client() as operator:
        assert operator.get(fleet.keys.action(forged.id)) is None
    # Its own keys, and reading the actions, work: the refusals above are the roles.
    assert etcd.put(fleet.keys.host("h3") + "probe", "{}") > 0
    etcd.get_prefix(fleet.keys.control)
    for other in fleet.hosts:
        assert not [r for r in _audit_rows(other, "fleet_action")
                    if r["detail"]["action"] == forged.id]


def test_a_host_that_cannot_read_the_store_at_start_refuses_launches(fleet: Fleet) -> None:
    """Fail closed: no launch before the holds are known; launches open once they are."""
    tag = secrets.token_hex(2)
    host = fleet.hosts[0]
    host.daemon.stop()
    fleet.link(host.member, up=False)
    try:
        host.start()
        assert _refusal(host, f"u-{tag}", "web") == "fleet_hold"
        assert _audit_rows(host, "fleet_unsynced")
    finally:
        fleet.link(host.member, up=True)
    wait_for(lambda: _refusal(host, f"u-{tag}", "web") is None, timeout=60, interval=0.5,
             what="launches once the holds were read")
    assert _state(host, f"u-{tag}") == "active"
