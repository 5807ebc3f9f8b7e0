"""agentctl's side of CI mode, without root: options that only embedded runs take, the refusal
of an unprivileged embedded run, `report verify`/`keygen`, and the coding-agent profile with
its read-only workspace paths in the rendered bundle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from supervisor.ci import report
from supervisor.cli.main import cli
from supervisor.errors import ProfileInvalid
from supervisor.profiles import load_profile, validate_profile
from supervisor.sandbox.bundle import render_config
from supervisor.sandbox.workspace_binds import Bind
from tests.unit.test_bundle import make_spec

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("option", [("--allow-changes", "src/**"), ("--report", "/tmp/r.json"),
                                    ("--self-test",)])
def test_ci_options_without_embedded_mode_are_refused(tmp_path: Path,
                                                      option: tuple[str, ...]) -> None:
    socket = tmp_path / "control.sock"
    socket.touch()  # a daemon's socket exists: the run would go to it
    result = CliRunner().invoke(cli, ["--socket", str(socket), "run", *option, "--", "true"])
    assert result.exit_code == 6, result.output
    assert "invalid_request" in result.stderr and "embedded" in result.stderr


def test_detach_is_refused_for_embedded_runs(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["--socket", str(tmp_path / "none"), "run", "--embedded",
                                      "--detach", "--", "true"])
    assert result.exit_code == 6 and "--detach needs a daemon" in result.stderr


def test_an_unprivileged_embedded_run_is_refused_before_anything_runs(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    env = {**os.environ, "AGENT_SUPERVISOR_CI_ROOT": str(tmp_path / "state")}
    user = 65534 if os.geteuid() == 0 else None  # nobody, whoever runs the unit tier
    if user is not None:
        tmp_path.chmod(0o777)
    result = subprocess.run(
        [sys.executable, "-m", "supervisor.cli", "--socket", str(tmp_path / "none"), "run",
         "--embedded", "--", "touch", str(marker)],
        env=env, capture_output=True, text=True, user=user, cwd="/", timeout=60, check=False)
    assert result.returncode == 5, result.stderr
    assert "embedded_needs_root" in result.stderr
    assert not marker.exists() and not (tmp_path / "state").exists()


def test_report_keygen_and_verify(tmp_path: Path) -> None:
    runner = CliRunner()
    prefix = tmp_path / "ci"
    assert runner.invoke(cli, ["report", "keygen", str(prefix)]).exit_code == 0
    again = runner.invoke(cli, ["report", "keygen", str(prefix)])
    assert again.exit_code == 6 and "not overwriting" in again.stderr
    document = {"schema": report.SCHEMA, "ending": "exited", "exit_status": 0,
                "run": {"id": "r1"}}
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report.sign(document, report.load_private_key(prefix),
                                           ephemeral=False)))
    ok = runner.invoke(cli, ["report", "verify", str(path), "--key", f"{prefix}.pub", "--json"])
    assert ok.exit_code == 0 and json.loads(ok.stdout)["ok"] is True
    path.write_text(path.read_text().replace('"exited"', '"killed"'))
    bad = runner.invoke(cli, ["report", "verify", str(path), "--key", f"{prefix}.pub"])
    assert bad.exit_code == 1 and "INVALID" in bad.stderr
    path.write_text("{}")
    invalid = runner.invoke(cli, ["report", "verify", str(path), "--key", f"{prefix}.pub"])
    assert invalid.exit_code == 6 and "report_invalid" in invalid.stderr


def test_agentctl_loads_no_cryptography_until_a_report_is_verified() -> None:
    code = "import supervisor.cli.main, sys; print('cryptography' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=60, check=True)
    assert result.stdout.strip() == "False"


def test_the_coding_agent_profile_protects_hooks_config_and_ci_files(tmp_path: Path) -> None:
    profile = load_profile("coding-agent", [])
    assert {".git/hooks/", ".git/config", ".git/info/", ".git/modules/", ".git/commondir",
            ".git/objects/info/alternates", ".gitattributes", ".gitmodules",
            ".github/workflows/", ".gitlab-ci.yml"} <= set(profile.workspace.readonly)
    assert profile.limits.wall_clock == 3600 and profile.limits.memory >= 2 * 1024**3
    assert profile.network.mode == "gateway"
    assert profile.network.gateway.route_for("model.gateway") is not None
    assert profile.network.gateway.allowed("pypi.org", 443) is not None
    host = tmp_path / "host"
    (host / "usr").mkdir(parents=True)
    spec = make_spec(host, workspace="/run/ws/as-1/0", profile=profile)
    binds = (Bind(".git", "/run/ws/as-1/1", False), Bind(".git/hooks", "/run/ws/as-1/2", True))
    config = render_config(type(spec)(**{**spec.__dict__, "workspace_binds": binds}))
    destinations = [m["destination"] for m in config["mounts"]]
    workspace_at = destinations.index("/workspace")
    git = config["mounts"][destinations.index("/workspace/.git")]
    hooks = config["mounts"][destinations.index("/workspace/.git/hooks")]
    # Mounted over the workspace, parents first; each from its staging mount, never a path
    # inside the workspace that runc would resolve later.
    assert workspace_at < destinations.index("/workspace/.git") < destinations.index(
        "/workspace/.git/hooks")
    assert git["source"] == "/run/ws/as-1/1" and "rw" in git["options"]
    assert hooks["source"] == "/run/ws/as-1/2" and "ro" in hooks["options"]


def test_protected_paths_nest_and_keep_their_kind() -> None:
    from supervisor.sandbox.workspace_binds import _protected_paths

    assert _protected_paths([".git/info/attributes", ".git/hooks/", ".git/info/", "a"]) == [
        (["a"], False), ([".git", "hooks"], True), ([".git", "info"], True)]


@pytest.mark.parametrize("path", ["/etc", "../up", ".git/../x", "", "a//b", "./x"])
def test_readonly_workspace_paths_must_stay_inside(path: str) -> None:
    with pytest.raises(ProfileInvalid) as caught:
        validate_profile("p", {"workspace": {"readonly": [path]}}, "test")
    assert caught.value.detail["field"] == "workspace.readonly"
