"""The GitHub Action's script part for real: `python -m supervisor.ci.action` with the step's
inputs as the runner passes them and $GITHUB_OUTPUT set, around a real embedded run whose agent
makes one change in scope and two outside it. Outputs, annotations and the exit status are
what a workflow sees. Real runc, namespaces and files; needs root."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require, require_root_and_runc
from tests.support.embedded import WORKSPACE_UID, agentctl_env, chown_tree, host_residue

pytestmark = pytest.mark.e2e


def test_the_action_sets_outputs_annotates_offending_files_and_fails_the_step(
        tmp_root: Path) -> None:
    require_root_and_runc()
    require(shutil.which("git") is not None, "needs git")
    repo = tmp_root / "repo"
    (repo / "src").mkdir(parents=True)
    (repo / "src" / "app.py").write_text("x = 1\n")
    chown_tree(repo, WORKSPACE_UID)
    state_root = tmp_root / "ci-state"
    github_output = tmp_root / "github_output"
    github_output.write_text("earlier=kept\n")
    summary = tmp_root / "summary.md"
    env = agentctl_env(
        state_root, INPUT_COMMAND="echo y > src/app.py; mkdir -p docs; echo n > 'docs/a,b.md'; "
        "echo n > stray.txt; echo agent-done",
        INPUT_PROFILE="default", INPUT_ALLOW_CHANGES="src/**\n", INPUT_TIMEOUT="2m",
        INPUT_WORKSPACE=str(repo), INPUT_REPORT=str(tmp_root / "agent-report.json"),
        INPUT_AGENTCTL="agentctl", GITHUB_OUTPUT=str(github_output),
        GITHUB_STEP_SUMMARY=str(summary), RUNNER_TEMP=str(tmp_root),
        # The workspace is the repository's repo/ directory (a monorepo's service, say):
        # GitHub names annotated files from the repository's root.
        GITHUB_WORKSPACE=str(tmp_root))
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # this venv's agentctl
    result = subprocess.run([sys.executable, "-m", "supervisor.ci.action"], env=env,
                            capture_output=True, text=True, timeout=240, cwd="/")
    assert result.returncode == 83, result.stdout + result.stderr
    assert "agent-done" in result.stdout
    annotations = [line for line in result.stdout.splitlines() if line.startswith("::")]
    assert sorted(annotations) == sorted([
        "::error file=repo/docs,title=agent-supervisor%3A scope violation (scope)::"
        "created outside --allow-changes",
        "::error file=repo/docs/a%2Cb.md,title=agent-supervisor%3A scope violation (scope)::"
        "created outside --allow-changes",
        "::error file=repo/stray.txt,title=agent-supervisor%3A scope violation (scope)::"
        "created outside --allow-changes"])
    lines = github_output.read_text().splitlines()
    assert lines[0] == "earlier=kept"
    values = dict(line.split("=", 1) for line in lines[1:])
    assert values == {"exit-status": "83", "ending": "exited", "verdict": "failed",
                      "report": str(tmp_root / "agent-report.json"), "violations": "3",
                      "changed-files": "4", "commits": "0",
                      "signature-key-id": values["signature-key-id"]}
    report = json.loads((tmp_root / "agent-report.json").read_text())
    assert report["signature"]["key_id"] == values["signature-key-id"]
    assert "FAILED" in summary.read_text()
    assert host_residue(state_root) == {}
