"""The fleet's pure parts: which hosts and agents a selector reaches, the key layout the roles
are written against, how control/ is read (malformed entries ignored, holds told apart from
actions), and that [fleet] is optional. No I/O, no privilege."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from supervisor.config import load_config
from supervisor.errors import ConfigInvalid
from supervisor.fleet.etcd import KeyValue, prefix_end
from supervisor.fleet.link import parse_control
from supervisor.fleet.model import FleetAction, Keys, Selector, dumps, new_action_id


def test_selectors_reach_what_they_name() -> None:
    everything = Selector(all=True)
    assert everything.reaches_host("h1", {}) and everything.reaches_agent("a", "web")
    assert everything.whole_host
    by_class = Selector(agent_class="web")
    assert by_class.reaches_agent("a", "web") and not by_class.reaches_agent("a", "db")
    assert not by_class.whole_host
    by_host = Selector(host="h2")
    assert by_host.reaches_host("h2", {}) and not by_host.reaches_host("h1", {})
    by_label = Selector(labels={"zone": "a", "tier": "x"})
    assert by_label.reaches_host("h1", {"zone": "a", "tier": "x", "more": "y"})
    assert not by_label.reaches_host("h1", {"zone": "a"})
    by_agent = Selector(agent="bot", agent_class="web")
    assert by_agent.reaches_agent("bot", "web") and not by_agent.reaches_agent("bot", "db")
    assert not by_agent.reaches_agent("other", "web")
    assert by_label.describe() == "label:tier=x label:zone=a"


def test_a_host_prefix_never_covers_another_host() -> None:
    keys = Keys("/p")
    assert keys.prefix == "/p/"
    # "h1/" must not be a prefix of "h10/...": the role of h1 would reach h10's keys.
    assert not keys.ack("h10", "x").startswith(keys.host("h1"))
    assert keys.ack("h1", "x").startswith(keys.host("h1"))
    assert keys.actions.startswith(keys.control) and keys.holds.startswith(keys.control)
    assert not keys.host("h1").startswith(keys.control)
    assert keys.host_of(keys.ack("h7", "x")) == "h7"
    assert keys.registration("h7") == "/p/members/h7"
    assert not keys.registration("h7").startswith(keys.hosts)
    assert keys.host_of(keys.action("x")) is None
    assert prefix_end("/p/") == "/p0"
    assert keys.anchor("h1", 12) < keys.anchor("h1", 100)  # anchors sort by sequence


def _kv(key: str, value: str, revision: int) -> KeyValue:
    return KeyValue(key=key, value=value, mod_revision=revision, create_revision=revision,
                    lease=0)


def test_control_is_read_into_actions_and_holds() -> None:
    keys = Keys("/f/")
    first = FleetAction(id=new_action_id(), verb="kill", selector=Selector(all=True),
                        reason="r", operator="alice", issued_at=1.0)
    second = FleetAction(id=new_action_id(), verb="pause", selector=Selector(host="h1"),
                         reason="r", operator="alice", issued_at=2.0)
    snapshot = parse_control(keys, [
        _kv(keys.action(second.id), dumps(second), 9),
        _kv(keys.action(first.id), dumps(first), 5),
        _kv(keys.hold(first.id), dumps(first), 5),
        _kv(keys.action("bad"), "{not json", 6),
        _kv(keys.action("wrong"), json.dumps({"id": "x", "verb": "explode"}), 7),
    ], 10)
    assert snapshot.revision == 10
    assert [a.id for _, a in snapshot.actions] == [first.id, second.id]  # by revision
    assert list(snapshot.holds) == [first.id]


def test_fleet_is_optional_and_checked(tmp_path: Path) -> None:
    plain = tmp_path / "plain.toml"
    plain.write_text("[daemon]\nlog_level = 'info'\n")
    assert load_config(plain).fleet is None
    fleet = tmp_path / "fleet.toml"
    fleet.write_text("\n".join([
        "[fleet]", "host_id = 'h1'", "endpoints = ['10.0.0.2:2379']", "ca_file = '/ca'",
        "cert_file = '/c'", "key_file = '/k'", "user = 'h1'", "password_file = '/p'",
        "lease_ttl = '5s'", "partition_policy_by_class = { risky = 'halt' }"]))
    section = load_config(fleet).fleet
    assert section is not None and section.lease_ttl == 5.0
    assert section.partition_policy == "hold-launches"
    assert section.partition_policy_by_class == {"risky": "halt"}
    bad = tmp_path / "bad.toml"
    bad.write_text(fleet.read_text().replace("'halt'", "'explode'"))
    with pytest.raises(ConfigInvalid):
        load_config(bad)


def test_a_watch_streams_error_code_is_read_like_a_unary_one() -> None:
    """etcd restarted: its simple tokens are gone, and a watch says so inside the stream with
    grpc_code, not code. Read as 0, the client never re-authenticated (agentctl looped on the
    stale token until its deadline)."""
    from supervisor.fleet.etcd import _code
    stream_error = {"grpc_code": 16, "http_code": 401,
                    "message": "etcdserver: invalid auth token", "http_status": "Unauthorized"}
    assert _code(stream_error) == 16
    assert _code({"code": 7, "message": "etcdserver: permission denied"}) == 7
    assert _code({"message": "no code"}) == 0


def _live(**hosts: tuple[dict[str, str], list[tuple[str, str]]]) -> dict[str, Any]:
    """Registrations as agentctl fleet reads them: host -> (labels, [(agent, class)])."""
    return {h: {"host": h, "alive": True, "registration": {
        "labels": labels, "agents": [{"name": n, "agent_class": c, "state": "active"}
                                     for n, c in agents]}}
        for h, (labels, agents) in hosts.items()}


FLEET = _live(h1=({"zone": "a"}, [("bot", "coders"), ("web1", "web")]),
              h2=({"zone": "b"}, [("crawler", "batch")]))


@pytest.mark.parametrize(("selector", "code", "suggested"), [
    (Selector(agent_class="coderz"), "scope_empty", ["coders"]),
    (Selector(agent_class="coders", host="h2"), "scope_empty", []),
    (Selector(agent="bott"), "scope_empty", ["bot"]),
    (Selector(host="h3"), "scope_empty", []),
    (Selector(host="h11"), "scope_empty", ["h1"]),
    (Selector(labels={"zone": "c"}), "scope_empty", []),
])
def test_a_fleet_scope_that_reaches_nothing_is_an_error(selector: Selector, code: str,
                                                        suggested: list[str]) -> None:
    from supervisor.cli.fleet import scope_error
    error = scope_error(selector, FLEET)
    assert error is not None and error.code == code and error.exit_status == 3
    assert error.detail["did_you_mean"] == suggested
    assert "--allow-empty" in (error.hint or "")


@pytest.mark.parametrize("selector", [
    Selector(all=True), Selector(agent_class="coders"), Selector(agent="crawler"),
    Selector(host="h2"), Selector(labels={"zone": "a"}),
    Selector(agent_class="batch", labels={"zone": "b"}),
])
def test_a_fleet_scope_that_reaches_something_passes(selector: Selector) -> None:
    from supervisor.cli.fleet import scope_error
    assert scope_error(selector, FLEET) is None


def test_a_down_host_does_not_count_as_reached() -> None:
    from supervisor.cli.fleet import scope_error
    down = {**FLEET, "h1": {**FLEET["h1"], "alive": False}}
    error = scope_error(Selector(agent_class="coders"), down)
    assert error is not None and error.detail["classes"] == ["batch"]


def test_agentctl_fleet_kill_of_an_unknown_class_writes_nothing_and_exits_3(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The command's path: the registrations read (seam: _hosts_at), the error printed with
    its hint, no action written (seam: issue, never called) unless --allow-empty."""
    from click.testing import CliRunner

    from supervisor.cli import fleet as cli
    written: list[list[FleetAction]] = []
    monkeypatch.setattr(cli, "_hosts_at", lambda *_a, **_k: (FLEET, 7))
    monkeypatch.setattr(cli, "issue", lambda _ctx, actions, *_a, **_k: written.append(actions)
                        or {"actions": [a.id for a in actions], "hosts": [], "elapsed_ms": 1.0,
                            "unconfirmed": []})
    password = tmp_path / "password"
    password.write_text("x")
    base = ["--endpoints", "127.0.0.1:1", "--ca", "ca", "--cert", "c", "--key", "k", "--user",
            "operator", "--password-file", str(password)]
    runner = CliRunner()
    typo = runner.invoke(cli.fleet, [*base, "kill", "--class", "coderz", "--reason", "incident"])
    assert typo.exit_code == 3, typo.output
    assert "scope_empty" in typo.output and "did you mean coders" in typo.output
    assert "--allow-empty" in typo.output and written == []
    as_json = runner.invoke(cli.fleet, [*base, "pause", "--class", "coderz", "--reason", "i",
                                        "--json"])
    assert as_json.exit_code == 3
    assert json.loads(as_json.output)["error"]["detail"]["did_you_mean"] == ["coders"]
    held = runner.invoke(cli.fleet, [*base, "kill", "--class", "coderz", "--reason", "hold",
                                     "--allow-empty"])
    assert held.exit_code == 0, held.output
    assert [a.selector.agent_class for a in written[0]] == ["coderz"]
    right = runner.invoke(cli.fleet, [*base, "kill", "--class", "coders", "--reason", "i"])
    assert right.exit_code == 0 and len(written) == 2


def test_a_host_that_did_not_confirm_is_reported_with_its_words_whole(
        capsys: pytest.CaptureFixture[str]) -> None:
    """agentctl fleet's report of a failed host: the host's error and each agent's, uncut,
    on stderr and in the error's detail (the table has no room for them)."""
    from supervisor.cli.fleet import _report
    long = "kill_unconfirmed: " + "survivor 4242 " * 60
    result = {"actions": ["a1"], "elapsed_ms": 5.0, "unconfirmed": ["h2", "h3"], "hosts": [
        {"host": "h1", "status": "confirmed", "agents_affected": 1},
        {"host": "h2", "status": "failed", "agents_affected": 1, "error": long,
         "agent_errors": {"bot": long}},
        {"host": "h3", "status": "no answer"}]}
    with pytest.raises(SystemExit) as exited:
        _report(result, False, "kill")
    assert exited.value.code == 13
    err = capsys.readouterr().err
    assert f"h2: failed: {long}\n" in err and f"  bot: {long}\n" in err
    assert "h3: no answer\n" in err and "h1:" not in err


def test_an_acks_error_is_whole_or_says_it_was_cut() -> None:
    from supervisor.daemon.fleet import ERROR_MAX, _agent_error, _bounded
    assert _bounded("short") == "short"
    cut = _bounded("x" * (ERROR_MAX + 10))
    assert cut.startswith("x" * ERROR_MAX) and "[cut: 10 more characters" in cut
    assert _agent_error({"code": "kill_unconfirmed", "message": "3 left"}) == \
        "kill_unconfirmed: 3 left"
    assert _agent_error(None) is None


def test_a_store_that_failed_while_waiting_is_named_with_the_unconfirmed_hosts(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Every host "no answer" after an etcd restart: the report says the store failed the
    command's requests meanwhile, and how, so it is not read as hosts that did not act."""
    from supervisor.cli.fleet import _report
    result = {"actions": ["a1"], "elapsed_ms": 5.0, "unconfirmed": ["h1"],
              "store_errors": 7, "last_store_error": "fleet_store_unavailable: refused",
              "hosts": [{"host": "h1", "status": "no answer"}]}
    with pytest.raises(SystemExit) as exited:
        _report(result, False, "kill")
    assert exited.value.code == 13
    err = capsys.readouterr().err
    assert "failed 7 requests while waiting; the last: fleet_store_unavailable: refused" in err
    quiet = {**result, "store_errors": 0, "last_store_error": None}
    with pytest.raises(SystemExit):
        _report(quiet, False, "kill")
    assert "fleet store failed" not in capsys.readouterr().err


class _Stream:
    """An HTTP answer of etcd's gateway to a watch: its lines, then the end."""

    status = 200

    def __init__(self, lines: list[bytes]) -> None:
        self.lines = lines

    def readline(self) -> bytes:
        return self.lines.pop(0) if self.lines else b""


class _Conn:
    sock = None

    def __init__(self, stream: _Stream, seen: list[str]) -> None:
        self.stream, self.seen = stream, seen

    def request(self, _method: str, _path: str, _body: bytes, headers: dict[str, str]) -> None:
        self.seen.append(headers["Authorization"])

    def getresponse(self) -> _Stream:
        return self.stream

    def close(self) -> None:
        pass


@pytest.mark.parametrize("reason", [
    "rpc error: code = Unauthenticated desc = etcdserver: invalid auth token",
    "rpc error: code = PermissionDenied desc = etcdserver: permission denied"])
def test_a_watch_cancelled_for_a_token_etcd_forgot_takes_a_fresh_one(reason: str) -> None:
    """etcd restarted under a watch (its simple tokens died with it) and cancels the next
    one with the stale token in the stream: the next watch goes with a fresh token. Seen in
    tests/fleet: with "invalid auth token" every watch was cancelled alike for 40 s, while
    every host's ack was in the store."""
    import json as json_module
    import threading

    from supervisor.errors import FleetStoreError
    from supervisor.fleet.etcd import Etcd, Token
    etcd: Any = object.__new__(Etcd)
    etcd.timeout, etcd._shared, etcd._lock = 1.0, Token(), threading.Lock()
    etcd._pool, etcd._endpoint, etcd._watch_refreshed = [], 0, None
    etcd._shared.value = "stale"
    fresh = iter(["fresh1", "fresh2"])

    def authenticate(stale: str | None = None) -> str:
        assert stale == etcd._shared.value
        etcd._shared.value = next(fresh)
        return str(etcd._shared.value)

    etcd._authenticate = authenticate
    seen: list[str] = []
    cancelled = json_module.dumps({"result": {"canceled": True, "cancel_reason": reason}})
    etcd._connect = lambda _timeout: _Conn(_Stream([cancelled.encode() + b"\n"]), seen)
    with pytest.raises(FleetStoreError):
        list(etcd.watch("/p/", 1, timeout=1.0))
    etcd._connect = lambda _timeout: _Conn(_Stream([]), seen)
    assert list(etcd.watch("/p/", 1, timeout=1.0)) == []
    assert seen == ["stale", "fresh1"]


def test_a_list_of_problems_or_a_table_cell_cut_says_it_was_cut() -> None:
    from supervisor.cli.fleet import _cell
    from supervisor.daemon.fleet import _listed
    assert _listed([], 20) is None
    assert _listed(["a", "b"], 20) == "a; b"
    assert _listed([f"p{i}" for i in range(23)], 20) == \
        "; ".join(f"p{i}" for i in range(20)) + "; ... and 3 more"
    assert _cell("short", 200) == "short"
    cut = _cell("y" * 210, 200)
    assert cut.startswith("y" * 200) and "[cut: 10 more characters; --json has all]" in cut
