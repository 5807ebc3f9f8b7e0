"""The example configuration the install puts in place (systemd/daemon.toml.example) and
`--check-config`'s every-error report. No privilege."""

from __future__ import annotations

import grp
import re
import socket
import ssl
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydantic import BaseModel

from supervisor.api.server import operators_gid
from supervisor.config import Config, load_config
from supervisor.daemon import configcheck
from supervisor.daemon.configcheck import check_config
from supervisor.daemon.main import main as daemon_main
from supervisor.errors import ConfigInvalid

EXAMPLE = Path(__file__).resolve().parents[2] / "systemd" / "daemon.toml.example"
# A socket group every host has: these tests are about other errors.
HOST_GROUP = '[daemon]\nsocket_group = "root"\n'
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"  # Debian's, when Python names none


def test_the_example_as_installed_is_the_defaults() -> None:
    assert load_config(EXAMPLE) == Config()


def test_every_key_in_the_example_is_real_and_shows_its_default(tmp_path: Path) -> None:
    """Uncomment every key line (not the webhook's or the fleet's, samples of sections that are
    absent by default): the file must still load, to exactly the defaults, so the example
    never drifts from the code."""
    lines, in_webhook = [], False
    for line in EXAMPLE.read_text().splitlines():
        body = line[2:] if line.startswith("# ") else ""
        if re.match(r"^\[\[?[a-z_]+\]\]?\s*(#.*)?$", body):
            in_webhook = body.startswith(("[[webhooks]]", "[fleet]"))
            if not in_webhook:
                lines.append(body)
        elif re.match(r"^[a-z_]+ = ", body) and not in_webhook:
            lines.append(body)
    uncommented = tmp_path / "daemon.toml"
    uncommented.write_text("\n".join(lines) + "\n")
    assert len(lines) > 60
    assert load_config(uncommented) == Config()


def example_keys() -> dict[str, set[str]]:
    """Section -> the keys the example shows (set, commented out, or as `# # key = ...` for
    a key whose default is computed)."""
    found: dict[str, set[str]] = {}
    section = ""
    for line in EXAMPLE.read_text().splitlines():
        if header := re.match(r"^#\s*\[\[?([a-z_]+)\]\]?", line):
            section = header.group(1)
            found.setdefault(section, set())
        elif key := re.match(r"^#\s*(?:#\s*|\(unset\)\s*)?([a-z_]+)(?: = |:)", line):
            found.setdefault(section, set()).add(key.group(1))
    return found


def _section_fields(annotation: object) -> set[str] | None:
    """The keys of a section model (through list[...] and ... | None), or None for a value."""
    for candidate in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return set(candidate.model_fields)
    return None


def test_every_key_of_the_configuration_appears_in_the_example() -> None:
    shown = example_keys()
    missing = []
    for section, info in Config.model_fields.items():
        fields = _section_fields(info.annotation)
        assert fields is not None, section
        missing += [f"{section}.{key}" for key in sorted(fields - shown.get(section, set()))]
    assert missing == []
    assert set(shown) - {""} == set(Config.model_fields)


def test_check_config_reports_every_error_with_file_and_key(tmp_path: Path) -> None:
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "broken.toml").write_text("[limits]\npids = -5\n")
    (profiles / "typo.toml").write_text("[limits]\nmemroy = '1G'\n")
    config = tmp_path / "daemon.toml"
    # Schema errors, and behind them what a start meets next (each valid to the schema): a
    # webhook secret file that is missing, a metrics address beyond loopback without a web
    # config, no init, no runc, and the Docker runtime with no engine socket.
    config.write_text(f'[daemon]\nprofile_dirs = ["{profiles}"]\nlog_level = "loud"\n'
                      '[drill]\nprocesses = 0\n[roles]\nowner = ["bogus"]\n[nonsense]\n'
                      '[metrics]\nlisten = "0.0.0.0:9"\n'
                      f'[sandbox]\ninit = "{tmp_path}/no-tini"\n'
                      f'runc_path = "{tmp_path}/no-runc"\n'
                      f'[docker]\nenabled = true\nsocket = "unix://{tmp_path}/docker.sock"\n'
                      f'[[webhooks]]\nurl = "https://hooks.example/a"\n'
                      f'secret_file = "{tmp_path}/no-secret"\n')
    checked = check_config(config)
    assert not checked.ok
    where = {(Path(e["path"]).name, e["key"]) for e in checked.all_errors}
    schema = {("daemon.toml", "daemon.log_level"), ("daemon.toml", "drill.processes"),
              ("daemon.toml", "roles.owner.0"), ("daemon.toml", "nonsense")}
    start = {("daemon.toml", "metrics.listen"), ("daemon.toml", "sandbox.init"),
             ("daemon.toml", "sandbox.runc_path"), ("daemon.toml", "docker.socket")}
    assert schema | start <= where
    assert any(name == "daemon.toml" and key.startswith("webhooks.0")
               for name, key in where), where
    assert {name for name, _key in where} >= {"broken.toml", "typo.toml"}
    reasons = {e["key"]: e["reason"] for e in checked.all_errors}
    assert "tini" in reasons["sandbox.init"] and "no-runc" in reasons["sandbox.runc_path"]
    assert "docker.sock" in reasons["docker.socket"]
    with pytest.raises(ConfigInvalid) as raised:
        load_config(config)
    assert len(raised.value.detail["errors"]) == 4
    assert "(and 3 more)" in raised.value.message
    # The same start checks when the schema holds: each is reported, all at once.
    config.write_text(f'{HOST_GROUP}[metrics]\nlisten = "0.0.0.0:9"\n'
                      f'[sandbox]\ninit = "{tmp_path}/no-tini"\nruntime = "docker"\n'
                      f'[docker]\nsocket = "unix://{tmp_path}/docker.sock"\n')
    (tmp_path / "docker.sock").write_text("not a socket")
    valid = check_config(config)
    assert valid.config is not None and not valid.ok
    assert [e["key"] for e in valid.all_errors] == ["metrics.listen", "sandbox.init",
                                                    "sandbox.runtime"]
    assert "is not a socket" in valid.all_errors[2]["reason"]
    # The engine's socket stops a start, not a reload (nothing a reload applies needs it).
    assert [e["key"] for e in valid.engine_errors] == ["sandbox.runtime"]
    assert [e["key"] for e in valid.reload_errors] == ["metrics.listen", "sandbox.init"]


def test_an_engine_that_is_down_stops_a_start_but_not_a_reload(tmp_path: Path) -> None:
    config = tmp_path / "daemon.toml"
    config.write_text(f'{HOST_GROUP}[docker]\nenabled = true\n'
                      f'socket = "unix://{tmp_path}/gone.sock"\n'
                      f'[sandbox]\ninit = "{tmp_path}/tini"\nrunc_path = "/bin/true"\n')
    (tmp_path / "tini").write_bytes(b"\x7fELF")
    (tmp_path / "tini").chmod(0o755)
    checked = check_config(config)
    assert [e["key"] for e in checked.engine_errors] == ["docker.socket"]
    assert "gone.sock" in checked.engine_errors[0]["reason"]
    assert not checked.ok and checked.reloadable and checked.reload_errors == []
    assert checked.all_errors == checked.engine_errors  # --check-config still reports it
    # With the engine's socket there, nothing is left.
    with socket.socket(socket.AF_UNIX) as engine:
        engine.bind(str(tmp_path / "gone.sock"))
        again = check_config(config)
    assert again.ok and again.engine_errors == []


def test_no_file_means_every_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import supervisor.config

    monkeypatch.setattr(supervisor.config, "DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    # The default socket group is the install's (sysusers.d); this host need not have it.
    real = grp.getgrnam
    monkeypatch.setattr(configcheck.grp, "getgrnam", lambda name: real(
        "root" if name == Config().daemon.socket_group else name))
    checked = check_config(None)
    assert checked.source.startswith("(defaults")
    assert checked.config == Config()
    assert [e for e in checked.errors] == []


def test_a_socket_group_missing_on_the_host_is_reported_with_every_other_error(
        tmp_path: Path) -> None:
    config = tmp_path / "daemon.toml"
    config.write_text('[daemon]\nsocket_group = "as-no-such-group"\nlog_level = "loud"\n'
                      '[control]\nowner_socket_group = "as-no-such-owners"\n'
                      f'[sandbox]\ninit = "{tmp_path}/no-tini"\n')
    checked = check_config(config)
    reasons = {e["key"]: e["reason"] for e in checked.all_errors}
    # Behind a schema error, the groups are still judged (on the file's valid parts).
    assert {"daemon.log_level", "daemon.socket_group", "control.owner_socket_group",
            "sandbox.init"} <= set(reasons), reasons
    assert "'as-no-such-group' does not exist" in reasons["daemon.socket_group"]
    assert "as-no-such-owners" in reasons["control.owner_socket_group"]
    # Valid to the schema: the groups are the errors, and a reload is refused on them too.
    config.write_text('[daemon]\nsocket_group = "as-no-such-group"\n')
    valid = check_config(config)
    assert valid.config is not None
    assert [e["key"] for e in valid.errors if "group" in e["key"]] == ["daemon.socket_group"]
    assert not valid.ok and not valid.reloadable
    # The start refuses it as --check-config does: exit 78, the key named, nothing started.
    started = CliRunner().invoke(daemon_main, ["--config", str(config)])
    assert started.exit_code == ConfigInvalid.exit_status == 78, started.output
    assert "daemon.socket_group" in started.output and "as-no-such-group" in started.output
    checked_cli = CliRunner().invoke(daemon_main, ["--config", str(config), "--check-config"])
    assert checked_cli.exit_code == 78
    assert "daemon.socket_group: group 'as-no-such-group' does not exist" in checked_cli.output


def test_every_name_the_host_must_hold_is_reported_with_the_others(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """[egress] pool, worker_user and ca_file, [control] owner_socket_group and a runs'
    parent that is not the supervisor's were each met only when used (a traceback and exit 1
    at the start, a gateway "restarting" forever, a foreign cgroup limited and killed): now
    --check-config lists every one at once, the start refuses them with 78 before touching
    anything, and a reload is refused on them."""
    foreign = "/as-test-foreign"
    monkeypatch.setattr(configcheck.runs_parent, "why_foreign", lambda parent, **_: (
        "holds 1 process(es) that are not the supervisor's" if parent == foreign else None))
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate\n")
    config = tmp_path / "daemon.toml"
    config.write_text(f'{HOST_GROUP}[control]\nowner_socket_group = "as-no-such-owners"\n'
                      f'[sandbox]\ncgroup_parent = "{foreign}"\n'
                      '[egress]\npool = "10.0.0.0/33"\nworker_user = "as-no-such-user"\n'
                      f'ca_file = "{tmp_path}/no-ca.pem"\n')
    checked = check_config(config)
    reasons = {e["key"]: e["reason"] for e in checked.all_errors}
    # The pool fails the schema; everything else is judged on the file's valid parts.
    assert {"egress.pool", "egress.worker_user", "egress.ca_file",
            "control.owner_socket_group", "sandbox.cgroup_parent"} <= set(reasons), reasons
    assert "is not a network" in reasons["egress.pool"]
    assert "'as-no-such-user' does not exist" in reasons["egress.worker_user"]
    assert "no-ca.pem" in reasons["egress.ca_file"]
    assert "supervisor's own" in reasons["sandbox.cgroup_parent"]
    # Valid to the schema: the same host checks, a reload refused on them too.
    config.write_text(f'{HOST_GROUP}[egress]\nworker_user = "as-no-such-user"\n'
                      f'ca_file = "{not_pem}"\n[sandbox]\ncgroup_parent = "{foreign}"\n')
    valid = check_config(config)
    assert valid.config is not None and not valid.reloadable
    keys = [e["key"] for e in valid.reload_errors]
    assert {"egress.worker_user", "egress.ca_file", "sandbox.cgroup_parent"} <= set(keys)
    assert "no usable PEM certificate" in {e["key"]: e["reason"]
                                           for e in valid.errors}["egress.ca_file"]
    # The start: exit 78 with the first error and the count, no traceback, for each kind.
    for text in ('[egress]\npool = "10.0.0.0/33"\n', '[egress]\nworker_user = "as-no-such-user"\n',
                 f'[egress]\nca_file = "{not_pem}"\n', f'[sandbox]\ncgroup_parent = "{foreign}"\n',
                 '[control]\nowner_socket_group = "as-no-such-owners"\n'):
        config.write_text(HOST_GROUP + text)
        started = CliRunner().invoke(daemon_main, ["--config", str(config)])
        assert started.exit_code == 78, (text, started.output)
        assert started.exception is None or isinstance(started.exception, SystemExit)
        assert "Traceback" not in started.output
        key = text.split("]")[0].strip("[") + "." + text.split("\n")[1].split(" ")[0]
        assert key in started.output, (key, started.output)
        checked_cli = CliRunner().invoke(daemon_main, ["--config", str(config),
                                                       "--check-config"])
        assert checked_cli.exit_code == 78 and key in checked_cli.output


def test_a_group_gone_after_the_check_names_the_socket_it_leaves_to_root(
        caplog: pytest.LogCaptureFixture) -> None:
    """The owners' socket's group gone between the start's check and the bind: the warning
    names that socket, not the control socket (which keeps its own group)."""
    owner = Path("/run/agent-supervisor/control-owner.sock")
    with caplog.at_level("WARNING"):
        assert operators_gid("as-no-such-owners", owner) == -1
    assert f"only root can use {owner}" in caplog.text
    assert "control socket" not in caplog.text


def test_a_ca_file_that_is_a_certificate_passes(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text(Path(ssl.get_default_verify_paths().cafile or CA_BUNDLE).read_text())
    config = tmp_path / "daemon.toml"
    config.write_text(f'{HOST_GROUP}[egress]\nca_file = "{ca}"\nworker_user = "root"\n')
    assert [e for e in check_config(config).errors if e["key"].startswith("egress")] == []


def test_the_readmes_defaults_are_the_codes() -> None:
    """README's "The main defaults" block: every key it sets (and every one it shows commented
    out) is real and has the value config.py gives it; its [[webhooks]] is a sample."""
    readme = (EXAMPLE.parents[1] / "README.md").read_text()
    block = readme.split("The main defaults", 1)[1].split("```toml\n", 1)[1].split("```", 1)[0]
    data = tomllib.loads(block)
    assert isinstance(data.pop("webhooks"), list)
    assert len(data) >= 10 and sum(len(v) for v in data.values()) > 40
    assert Config.model_validate(data) == Config()
    commented = {}
    section = ""
    for line in block.splitlines():
        if header := re.match(r"^\[([a-z_]+)\]", line):
            section = header.group(1)
        elif key := re.match(r"^# ([a-z_]+) = (\S+)", line):
            commented.setdefault(section, {})[key.group(1)] = tomllib.loads(
                f"v = {key.group(2)}")["v"]
    assert commented
    for section, keys in commented.items():
        for key in keys:
            assert key in type(getattr(Config(), section)).model_fields, (section, key)
