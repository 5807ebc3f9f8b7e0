"""The runner-side script of the GitHub Action (supervisor/ci/action.py) and action.yml itself:
annotations escaped so a file name cannot forge a workflow command, one-line outputs, agentctl's
argv from the step's inputs, and every input the action passes reaching the script. No root."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from supervisor.ci.action import annotation_lines, command_from_inputs, outputs, write_outputs

ROOT = Path(__file__).resolve().parents[2]


def report(**extra: Any) -> dict[str, Any]:
    return {"ending": "exited", "end_reason": None, "exit_status": 83,
            "scope": {"violations": [
                {"path": "docs/a,b:c.md", "rule": "scope",
                 "why": "created outside --allow-changes"},
                {"path": "evil\n::warning::x", "rule": "link", "why": "symlink_out_of_workspace"},
            ]},
            "manifest": {"changes": [{"path": "src/a.py"}, {"path": "docs/a,b:c.md"},
                                     {"path": "evil\n::warning::x"}]},
            "provenance": {"commits": [{"hash": "a" * 40}]},
            "teardown": {"clean": True, "residue": {}},
            "signature": {"key_id": "0123456789abcdef"}, **extra}


def test_each_violation_is_an_error_annotation_on_its_file() -> None:
    lines = annotation_lines(report())
    assert lines[0] == ("::error file=docs/a%2Cb%3Ac.md,title=agent-supervisor%3A scope "
                        "violation (scope)::created outside --allow-changes")
    # A newline in a file name cannot start a workflow command of its own.
    assert lines[1].startswith("::error file=evil%0A%3A%3Awarning%3A%3Ax,")
    assert all("\n" not in line for line in lines) and len(lines) == 2


def test_files_are_named_from_the_repository_root_github_resolves_them_against(
        tmp_path: Path) -> None:
    root = tmp_path / "repo"
    (root / "service").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(root / "service")

    def files(workspace: Path | None, repository: Path | None) -> list[str]:
        run = {"workspace": str(workspace)} if workspace else {}
        lines = annotation_lines(report(run=run), str(repository) if repository else None)
        return [line.split(",title=")[0] for line in lines]

    # A monorepo's service/ as the workspace: its paths are the repository's service/...
    assert files(root / "service", root)[0] == "::error file=service/docs/a%2Cb%3Ac.md"
    assert files(tmp_path / "link", root)[0] == "::error file=service/docs/a%2Cb%3Ac.md"
    # The root itself, a workspace outside it, no root known: the paths as the report has them.
    for workspace, repository in ((root, root), (tmp_path / "elsewhere", root),
                                  (root / "service", None), (None, root)):
        assert files(workspace, repository)[0] == "::error file=docs/a%2Cb%3Ac.md"
    assert files(tmp_path, root)[0] == "::error file=docs/a%2Cb%3Ac.md"  # above the root


def test_a_run_that_did_not_end_well_is_annotated_too() -> None:
    lines = annotation_lines(report(ending="timeout", end_reason="window of 30m ran out",
                               scope={"violations": []},
                               teardown={"clean": False, "residue": {"mounts": ["/x"]}}))
    assert lines == ["::error title=agent-supervisor%3A run timeout::window of 30m ran out",
                     '::error title=agent-supervisor::teardown left {"mounts": ["/x"]}']
    many = report(scope={"violations": [{"path": f"f{i}", "why": "w"} for i in range(60)]})
    assert len(annotation_lines(many)) == 51


def test_outputs_are_one_line_each(tmp_path: Path) -> None:
    values = outputs(report(), 83, "/tmp/r.json")
    assert values == {"exit-status": "83", "ending": "exited", "verdict": "failed",
                      "report": "/tmp/r.json", "violations": "2", "changed-files": "3",
                      "commits": "1", "signature-key-id": "0123456789abcdef"}
    assert outputs(None, 6, "/tmp/r.json")["ending"] == "not_started"
    target = tmp_path / "out"
    target.write_text("earlier=1\n")
    write_outputs(str(target), values)
    assert target.read_text().splitlines()[:3] == ["earlier=1", "exit-status=83",
                                                   "ending=exited"]
    with pytest.raises(ValueError):
        write_outputs(str(target), {"x": "two\nlines"})


def test_agentctl_argv_from_the_inputs() -> None:
    argv, report_path = command_from_inputs({
        "INPUT_COMMAND": "claude -p 'fix it'", "INPUT_PROFILE": "claude-code",
        "INPUT_ALLOW_CHANGES": "src/**\n\n  tests/**  \n", "INPUT_TIMEOUT": "20m",
        "INPUT_ARGS": "--env A=1", "INPUT_SIGNING_KEY_FILE": "/run/k",
        "GITHUB_WORKSPACE": "/home/runner/work/r/r", "RUNNER_TEMP": "/home/runner/tmp",
        "GITHUB_STEP_SUMMARY": "/home/runner/summary.md"})
    assert report_path == "/home/runner/tmp/agent-report.json"
    assert argv == ["agentctl", "run", "--embedded", "--profile", "claude-code",
                    "--workspace", "/home/runner/work/r/r", "--report", report_path,
                    "--allow-changes", "src/**", "--allow-changes", "tests/**",
                    "--timeout", "20m", "--signing-key", "/run/k",
                    "--summary", "/home/runner/summary.md", "--env", "A=1",
                    "--", "sh", "-c", "claude -p 'fix it'"]
    with pytest.raises(SystemExit):
        command_from_inputs({})


def test_action_yml_passes_every_input_through_sudo_to_the_script() -> None:
    action = yaml.safe_load((ROOT / "action.yml").read_text())
    assert action["runs"]["using"] == "composite"
    install, run = action["runs"]["steps"]
    # Installed from the action's own checkout, never the PyPI name another project owns.
    assert '"$GITHUB_ACTION_PATH/scripts/install-ci.sh"' in install["run"]
    assert "pip install agent-supervisor" not in install["run"]
    preserved = run["run"].split("--preserve-env=")[1].split()[0].split(",")
    for name in run["env"]:
        if name.startswith("INPUT_") or name == "MODEL_API_KEY":
            assert name in preserved, name
    for name in ("GITHUB_OUTPUT", "GITHUB_STEP_SUMMARY", "INPUT_SIGNING_KEY_FILE"):
        assert name in preserved
    for name in action["outputs"]:
        assert f"steps.run.outputs.{name}" in action["outputs"][name]["value"]
        assert name in outputs(report(), 0, "r")
    for name in action["inputs"]:
        assert f"inputs.{name}" in str(run["env"]), name
