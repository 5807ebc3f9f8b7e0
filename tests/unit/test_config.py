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
