"""What --check-config, the start and a reload judge on the host beyond the file
(daemon/configcheck.py host_errors): the [resources] reserves against this host's pids, RAM
and host root's inotify limits (each used only when the start applies the runs' budget, where
it raised EnforcementError, exit 10, a restart loop); an encrypted [fleet] key (a passphrase
prompt on a terminal, never answered); the runs' parent against a handed-over one. No
privilege."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from supervisor.daemon.configcheck import check_config
from supervisor.daemon.main import main as daemon_main
from supervisor.sandbox import budget, runs_parent, userns

HOST_GROUP = '[daemon]\nsocket_group = "root"\n'
REPO = Path(__file__).resolve().parents[2]


def _refused(tmp_path: Path, text: str, key: str) -> str:
    """The key is reported by --check-config, refused by a start with 78 (no traceback) and
    refuses a reload; its reason."""
    config = tmp_path / "daemon.toml"
    config.write_text(HOST_GROUP + text)
    checked = check_config(config)
    reasons = {e["key"]: e["reason"] for e in checked.errors}
    assert key in reasons, checked.all_errors
    assert checked.config is not None and not checked.reloadable
    for args in (["--config", str(config)], ["--config", str(config), "--check-config"]):
        result = CliRunner().invoke(daemon_main, args)
        assert result.exit_code == 78, result.output
        assert key in result.output and "Traceback" not in result.output
    return reasons[key]


def test_a_pids_reserve_above_the_hosts_pids_is_refused_by_key(tmp_path: Path) -> None:
    limit = budget.host_pid_limit()
    reason = _refused(tmp_path, f"[resources]\nhost_pids_reserve = {limit}\n",
                      "resources.host_pids_reserve")
    assert f"{limit} pids" in reason and "runs_pids_max" in reason


def test_a_memory_reserve_above_the_hosts_ram_is_refused_by_key(tmp_path: Path) -> None:
    reason = _refused(tmp_path, '[resources]\nhost_memory_reserve = "100TiB"\n',
                      "resources.host_memory_reserve")
    assert f"{budget.mem_total()} bytes of RAM" in reason


def test_a_runs_pids_max_the_kernel_refuses_is_refused_by_key(tmp_path: Path) -> None:
    reason = _refused(tmp_path, f"[resources]\nruns_pids_max = {budget.PIDS_MAX_LIMIT + 1}\n",
                      "resources.runs_pids_max")
    assert str(budget.PIDS_MAX_LIMIT) in reason


def test_a_set_budget_needs_no_reserve_and_the_defaults_pass(tmp_path: Path) -> None:
    """A reserve is moot when the budget is set; the defaults fit this host."""
    config = tmp_path / "daemon.toml"
    config.write_text(HOST_GROUP + '[resources]\nruns_pids_max = 1000\nhost_pids_reserve = '
                      '99999999\nruns_memory_max = "1GiB"\nhost_memory_reserve = "100TiB"\n')
    assert not [e for e in check_config(config).errors if e["key"].startswith("resources")]
    config.write_text(HOST_GROUP)
    assert not [e for e in check_config(config).errors if e["key"].startswith("resources")]


@pytest.mark.parametrize("kind", ["instances", "watches"])
def test_inotify_reserves_past_what_the_host_takes_are_refused_by_key(
        tmp_path: Path, kind: str) -> None:
    reason = _refused(tmp_path, f"[resources]\nhost_inotify_{kind}_reserve = {userns.INT_MAX}\n",
                      f"resources.host_inotify_{kind}_reserve")
    assert str(userns.INT_MAX) in reason and "max_runs" in reason
    limits = userns.UsernsLimits.for_runs(1, 1)
    with pytest.raises(Exception, match="cannot make host root's limits hold"):
        userns.raise_host_limits(limits, 8, {"max_inotify_instances": userns.INT_MAX,
                                             "max_inotify_watches": 1},
                                 {"max_inotify_instances": tmp_path / "never-written"})
    assert not (tmp_path / "never-written").exists()


def _encrypted_key(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-keyout", str(key), "-out", str(cert),
                    "-passout", "pass:secret", "-subj", "/CN=as-test", "-days", "1"],
                   check=True, capture_output=True, stdin=subprocess.DEVNULL)
    assert b"ENCRYPTED" in key.read_bytes()
    return cert, key


def test_an_encrypted_fleet_key_is_reported_on_a_terminal_without_a_prompt(
        tmp_path: Path) -> None:
    """On a terminal OpenSSL asked for the key's passphrase and --check-config waited for
    it: the check runs here with a pty as its controlling terminal and answers by key."""
    cert, key = _encrypted_key(tmp_path)
    password = tmp_path / "password"
    password.write_text("pw\n")
    config = tmp_path / "daemon.toml"
    config.write_text(HOST_GROUP + f'[fleet]\nhost_id = "h1"\nendpoints = ["etcd:2379"]\n'
                      f'ca_file = "{cert}"\ncert_file = "{cert}"\nkey_file = "{key}"\n'
                      f'user = "u"\npassword_file = "{password}"\n')
    primary, secondary = os.openpty()
    try:
        result = subprocess.run(
            ["setsid", "--ctty", "--wait", sys.executable, "-m", "supervisor.daemon",
             "--config", str(config), "--check-config"],
            stdin=secondary, capture_output=True, text=True,
            cwd=REPO, timeout=120)
    finally:
        os.close(secondary)
        os.close(primary)
    assert result.returncode == 78, result.stdout + result.stderr
    assert "fleet.key_file" in result.stderr + result.stdout
    assert "the key" in result.stderr + result.stdout
    reasons = {e["key"]: e["reason"] for e in check_config(config).errors}
    assert "is encrypted; the etcd client cannot use it" in reasons["fleet.key_file"]
    assert "fleet.cert_file" not in reasons


def _tree(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cgroup.controllers").write_text("")


def test_a_parent_inside_or_above_the_handed_over_one_is_refused(tmp_path: Path) -> None:
    """The handover's record names the parent whose runs wait for this start: a parent
    inside it, or above it, would die by that parent's watchdog or kill its runs."""
    _tree(tmp_path)
    for parent in ("/as/old/sub", "/as"):
        why = runs_parent.why_foreign(parent, tmp_path, handed="/as/old")
        assert why is not None and "lie one inside the other" in why, parent
    for parent in ("/as/old", "/as/old-moved", "/as/other"):
        assert runs_parent.why_foreign(parent, tmp_path, handed="/as/old") is None


@pytest.mark.parametrize(("one", "other", "nested"), [
    ("/a", "/a/b", True), ("/a/b/c", "/a", True), ("/a", "/a", False), ("/a", "/ab", False),
    ("/a-watchdog", "/a", False), ("/a/b", "/a/c", False)])
def test_nested_is_by_component(one: str, other: str, nested: bool) -> None:
    assert runs_parent.nested(one, other) is nested
    assert runs_parent.nested(other, one) is nested


def test_the_start_reads_the_handed_over_parent_from_the_record(tmp_path: Path) -> None:
    from supervisor.config import Config
    from supervisor.daemon.handover import handed_parent, record_path
    config = Config.model_validate({"daemon": {"state_dir": str(tmp_path)}})
    assert handed_parent(config) is None
    record_path(config).write_text(json.dumps({"cgroup_parent": "//as/old/"}))
    assert handed_parent(config) == "/as/old"
    record_path(config).write_text("{not json")
    assert handed_parent(config) is None
