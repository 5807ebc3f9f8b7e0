"""Daemon configuration (supervisor/config.py): defaults, unknown keys and bad values rejected
by name, unreadable or invalid files. Reads files in tmp only."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor import config as config_module
from supervisor.config import Config, load_config
from supervisor.errors import ConfigInvalid


def write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "daemon.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_defaults_when_the_default_file_is_missing(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", tmp_path / "missing.toml")
    config = load_config(None)
    assert config == Config()
    assert config.daemon.state_dir == Path("/var/lib/agent-supervisor")
    assert config.daemon.runtime_dir == Path("/run/agent-supervisor")
    assert config.socket_path == Path("/run/agent-supervisor/control.sock")
    assert config.daemon.default_profile == "default"
    assert config.kill.confirm_timeout == 5.0
    assert config.kill.default_grace == 10.0
    assert config.sandbox.uid_base >= 65536


def test_the_default_file_is_read_when_present(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, '[kill]\nconfirm_timeout = "250ms"\n')
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", path)
    assert load_config(None).kill.confirm_timeout == pytest.approx(0.25)


def test_an_empty_file_is_all_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == Config()


def test_values_are_read(tmp_path: Path) -> None:
    path = write(tmp_path, "\n".join([
        "[daemon]",
        f'state_dir = "{tmp_path / "state"}"',
        f'runtime_dir = "{tmp_path / "run"}"',
        'log_level = "debug"',
        "self_test = false",
        "[sandbox]",
        'name_prefix = "ut"',
        'cgroup_parent = "/agent-supervisor-test"',
        "[kill]",
        'confirm_timeout = "1m30s"',
        "default_grace = 3",
    ]))
    config = load_config(path)
    assert config.daemon.state_dir == tmp_path / "state"
    assert config.socket_path == tmp_path / "run" / "control.sock"
    assert config.daemon.log_level == "debug"
    assert config.daemon.self_test is False
    assert config.sandbox.name_prefix == "ut"
    assert config.sandbox.cgroup_parent == "/agent-supervisor-test"
    assert config.kill.confirm_timeout == 90.0
    assert config.kill.default_grace == 3.0


def test_explicit_socket_path_wins(tmp_path: Path) -> None:
    path = write(tmp_path, f'[daemon]\nsocket_path = "{tmp_path / "c.sock"}"\n')
    assert load_config(path).socket_path == tmp_path / "c.sock"


def test_an_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigInvalid) as info:
        load_config(missing)
    assert info.value.code == "config_invalid"
    assert info.value.exit_status == 78
    assert info.value.detail["path"] == str(missing)
    assert str(missing) in info.value.message


@pytest.mark.parametrize(("text", "key"), [
    ("bogus = 1\n", "bogus"),
    ("[daemon]\nbogus = 1\n", "daemon.bogus"),
    ("[sandbox]\nrunc = 'runc'\n", "sandbox.runc"),
    ("[kill]\nconfirm = '5s'\n", "kill.confirm"),
    ("[nosuch]\nx = 1\n", "nosuch"),
])
def test_unknown_key_is_rejected_by_name(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigInvalid) as info:
        load_config(write(tmp_path, text))
    assert info.value.detail["key"] == key
    assert repr(key) in info.value.message
    assert "unknown key" in info.value.message


@pytest.mark.parametrize(("text", "key"), [
    ("[sandbox]\nuid_base = 0\n", "sandbox.uid_base"),
    ("[sandbox]\nagent_uid = 0\n", "sandbox.agent_uid"),
    ("[sandbox]\nmax_runs = 0\n", "sandbox.max_runs"),
    ("[sandbox]\nname_prefix = 'UPPER'\n", "sandbox.name_prefix"),
    ("[sandbox]\ncgroup_parent = 'relative'\n", "sandbox.cgroup_parent"),
    ("[daemon]\nlog_level = 'loud'\n", "daemon.log_level"),
    ("[daemon]\nself_test = 'maybe'\n", "daemon.self_test"),
    ("[daemon]\nprofile_dirs = '/etc'\n", "daemon.profile_dirs"),
    ("[kill]\nconfirm_timeout = '10'\n", "kill.confirm_timeout"),
    ("[kill]\nconfirm_timeout = 0\n", "kill.confirm_timeout"),
    ("[kill]\ndefault_grace = '-1s'\n", "kill.default_grace"),
    ("daemon = 5\n", "daemon"),
])
def test_bad_value_names_the_field(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigInvalid) as info:
        load_config(write(tmp_path, text))
    assert info.value.detail["key"] == key
    assert f"{key}:" in info.value.message
    assert info.value.detail["reason"]


@pytest.mark.parametrize(("text", "key", "reason"), [
    ("[egress]\npool = '10.0.0.0/33'\n", "egress.pool", "is not a network"),
    ("[egress]\npool = '10.213.0.1/16'\n", "egress.pool", "is not a network"),
    ("[egress]\npool = '8.8.8.0/24'\n", "egress.pool", "private (RFC 1918)"),
    ("[egress]\npool = '10.0.0.0/8'\n", "egress.pool", "/16 to /29"),
    ("[egress]\npool = 'fd00::/64'\n", "egress.pool", "must be IPv4"),
    ("[egress]\nhosts = {'api.example' = 'not-an-ip'}\n", "egress.hosts",
     "is not an IP address"),
    ("[sandbox]\ncgroup_parent = '/system.slice'\n", "sandbox.cgroup_parent", "systemd"),
    ("[sandbox]\ncgroup_parent = '/a/ssh.service/x'\n", "sandbox.cgroup_parent", "systemd"),
    ("[sandbox]\ncgroup_parent = '/user.slice/user-0.slice/session-1.scope'\n",
     "sandbox.cgroup_parent", "systemd"),
    ("[sandbox]\ncgroup_parent = '/agents/../system.slice'\n", "sandbox.cgroup_parent",
     "'..'"),
    ("[sandbox]\ncgroup_parent = '//'\n", "sandbox.cgroup_parent", "is the root"),
    ("[sandbox]\nuid_base = 4294000000\n", "sandbox", "past the highest uid"),
    ("[telemetry]\nseccomp_listener = 'seccomp.sock'\n", "telemetry.seccomp_listener",
     "not an absolute path"),
    ("[[webhooks]]\nurl = 'https://'\n", "webhooks.0.url", "with a host"),
    ("[docker]\nsocket = '/var/run/docker.sock'\n", "docker.socket", "not an engine URL"),
    ("[docker]\nsocket = 'unix://docker.sock'\n", "docker.socket", "absolute path"),
    ("[docker]\nsocket = 'tcp://10.0.0.1'\n", "docker.socket", "needs a port"),
    ("[[webhooks]]\nurl = 'https://hooks.example:99999/x'\n", "webhooks.0.url",
     "is not a URL"),
])
def test_values_used_only_later_are_judged_at_load(tmp_path: Path, text: str, key: str,
                                                   reason: str) -> None:
    """Settings parsed or used only when a feature first runs (the gateway's pool and pinned
    hosts, the runs' parent, the uid range, the seccomp socket, a webhook's URL) are refused
    by name at load: a start, a reload and --check-config all see them."""
    with pytest.raises(ConfigInvalid) as info:
        load_config(write(tmp_path, text))
    assert info.value.detail["key"] == key
    assert reason in info.value.detail["reason"], info.value.detail


def test_good_values_of_those_settings_load(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "\n".join([
        "[egress]", "pool = '192.168.64.0/20'", "hosts = {'db.internal' = '10.1.2.3',"
        " 'v6.internal' = 'fd00::1'}",
        "[sandbox]", "cgroup_parent = '/agents/runs'", "uid_base = 100000", "max_runs = 4096",
        "[telemetry]", "seccomp_listener = ''",
        "[docker]", "socket = 'tcp://10.0.0.1:2376'",
        "[[webhooks]]", "url = 'http://127.0.0.1:8080/hook'", ""])))
    assert config.egress.pool == "192.168.64.0/20"
    assert config.sandbox.cgroup_parent == "/agents/runs"
    assert config.seccomp_listener is None


def test_fleet_endpoints_must_be_host_and_port(tmp_path: Path) -> None:
    fleet = ("[fleet]\nhost_id = 'h1'\nca_file = '/ca'\ncert_file = '/c'\nkey_file = '/k'\n"
             "user = 'u'\npassword_file = '/p'\n")
    with pytest.raises(ConfigInvalid) as info:
        load_config(write(tmp_path, fleet + "endpoints = ['etcd1.example:2379', 'etcd2']\n"))
    assert info.value.detail["key"] == "fleet.endpoints"
    assert "'etcd2' is not HOST:PORT" in info.value.detail["reason"]
    ok = load_config(write(tmp_path, fleet + "endpoints = ['etcd1.example:2379']\n"))
    assert ok.fleet is not None and ok.fleet.endpoints == ["etcd1.example:2379"]


@pytest.mark.parametrize("spelling", ["/agents/runs", "/agents/runs/", "//agents/runs",
                                      "/agents//runs", "///agents/runs//"])
def test_a_cgroup_parent_has_one_spelling(tmp_path: Path, spelling: str) -> None:
    """A cosmetic change of the parent is no change: the restart compares it with the
    handed-over parent, and a different string would drop every agent."""
    config = load_config(write(tmp_path, f"[sandbox]\ncgroup_parent = '{spelling}'\n"))
    assert config.sandbox.cgroup_parent == "/agents/runs"


FLEET = ("[fleet]\nhost_id = 'h1'\nca_file = '/ca'\ncert_file = '/c'\nkey_file = '/k'\n"
         "user = 'u'\npassword_file = '/p'\n")


@pytest.mark.parametrize(("endpoint", "why"), [
    ("https://etcd:2379", "no scheme"),
    ("etcd:2379/v3", "no path"),
    ("etcd:2379?x=1", "no path, query"),
    ("user@etcd:2379", "no user"),
    ("[::1:2379", "IPv6"),
    ("[etcd.example]:2379", "IPv6"),
    ("::1:2379", "is not HOST:PORT"),
    ("etcd:0", "1 to 65535"),
    ("etcd:99999", "is not HOST:PORT"),
    (":2379", "no host"),
    ("etcd", "is not HOST:PORT"),
])
def test_fleet_endpoints_are_refused_in_every_other_form(tmp_path: Path, endpoint: str,
                                                         why: str) -> None:
    with pytest.raises(ConfigInvalid) as info:
        load_config(write(tmp_path, FLEET + f"endpoints = ['{endpoint}']\n"))
    assert info.value.detail["key"] == "fleet.endpoints"
    reason = info.value.detail["reason"]
    assert why in reason and "e.g. etcd1.example:2379" in reason, reason


def test_fleet_endpoints_take_names_and_addresses(tmp_path: Path) -> None:
    good = ["etcd1.example:2379", "10.0.0.5:2379", "[2001:db8::5]:2379"]
    config = load_config(write(tmp_path, FLEET + f"endpoints = {good!r}\n"))
    assert config.fleet is not None and config.fleet.endpoints == good


@pytest.mark.parametrize(("text", "example"), [
    ("[egress]\npool = 'not-a-net'\n", "e.g. 10.200.0.0/16"),
    ("[egress]\npool = 'fd00::/64'\n", "e.g. 10.200.0.0/16"),
    ("[egress]\npool = '10.0.0.0/8'\n", "e.g. 10.200.0.0/16"),
    ("[egress]\nhosts = {'api.example' = 'api'}\n", "'api.example' = \"203.0.113.10\""),
])
def test_pool_and_hosts_errors_show_a_valid_value(tmp_path: Path, text: str,
                                                  example: str) -> None:
    with pytest.raises(ConfigInvalid) as info:
        load_config(write(tmp_path, text))
    assert example in info.value.detail["reason"], info.value.detail


def test_nan_duration_is_rejected(tmp_path: Path) -> None:
    """TOML has nan; a NaN confirm timeout would never expire, so a kill never escalates."""
    with pytest.raises(ConfigInvalid) as info:
        load_config(write(tmp_path, "[kill]\nconfirm_timeout = nan\n"))
    assert info.value.detail["key"] == "kill.confirm_timeout"


@pytest.mark.parametrize("text", ["[daemon\n", "a = \n", "[daemon]\nstate_dir = /var\n",
                                  "[kill]\n[kill]\n"])
def test_invalid_toml(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigInvalid) as info:
        load_config(path)
    assert "not valid TOML" in info.value.message
    assert info.value.detail["path"] == str(path)


def test_invalid_utf8_is_a_config_error(tmp_path: Path) -> None:
    """TOML is UTF-8; a file that is not must be a ConfigInvalid (exit 78), not a traceback."""
    path = write(tmp_path, b"[daemon]\nsocket_group = '\xff\xfe'\n")
    with pytest.raises(ConfigInvalid) as info:
        load_config(path)
    assert info.value.detail["path"] == str(path)


def test_config_is_frozen() -> None:
    config = Config()
    with pytest.raises(ValueError):
        config.kill.confirm_timeout = 1.0


def test_workspace_roots_are_granted_per_role(tmp_path: Path) -> None:
    path = tmp_path / "daemon.toml"
    path.write_text('[workspaces]\nroots = {admin = ["/srv/agents", "/data/ci"]}\n')
    assert load_config(path).workspaces.roots == {"admin": ["/srv/agents", "/data/ci"]}
    assert Config().workspaces.roots == {}


@pytest.mark.parametrize("bad", ['roots = {wizard = ["/srv"]}', 'roots = {admin = ["srv"]}',
                                 'roots = {admin = "/srv"}', 'root = {admin = ["/srv"]}'])
def test_bad_workspace_roots_are_refused_by_name(tmp_path: Path, bad: str) -> None:
    path = tmp_path / "daemon.toml"
    path.write_text(f"[workspaces]\n{bad}\n")
    with pytest.raises(ConfigInvalid):
        load_config(path)
