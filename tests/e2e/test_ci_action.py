"""The GitHub Action's script part for real: `python -m supervisor.ci.action` with the step's
inputs as the runner passes them and $GITHUB_OUTPUT set, around a real embedded run whose agent
makes one change in scope and two outside it. Outputs, annotations and the exit status are
what a workflow sees. Then action.yml's own run step, as a runner runs a composite step's
`shell: bash` (`bash --noprofile --norc -eo pipefail FILE`, the step's env with the inputs
substituted, real sudo): the signing key and model key reach agentctl through sudo, and the
key file is gone afterwards whatever the agent did. Real runc, namespaces, files and sudo;
needs root."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from supervisor.ci import DEFAULT_ROOT
from tests.conftest import require, require_root_and_runc
from tests.support.embedded import (
    WORKSPACE_UID,
    agentctl_command,
    agentctl_env,
    chown_tree,
    host_residue,
)

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


ROOT = Path(__file__).resolve().parents[2]
INSTALLED = "/opt/agent-supervisor/venv"  # where action.yml's install step puts the venv


def _run_step(inputs: dict[str, str], context: dict[str, str], tmp_root: Path
              ) -> subprocess.CompletedProcess[str]:
    """action.yml's second step as the runner runs it: its `${{ inputs.* }}` (defaults
    included) and `${{ github.workspace }}`/`${{ runner.temp }}` substituted, the script in a
    file run by `bash --noprofile --norc -eo pipefail` in $GITHUB_WORKSPACE (a step's working
    directory unless it names another), this test's venv for the installed one (the install
    step itself is not run: it would rebuild the host's venv)."""
    action = yaml.safe_load((ROOT / "action.yml").read_text())
    step = action["runs"]["steps"][1]
    venv = str(Path(sys.executable).parent.parent)
    values = {f"inputs.{name}": spec.get("default", "")
              for name, spec in action["inputs"].items()}
    values.update({f"inputs.{k}": v for k, v in inputs.items()})
    values.update({"github.workspace": context["GITHUB_WORKSPACE"],
                   "runner.temp": context["RUNNER_TEMP"]})

    def expand(text: str) -> str:
        for _ in range(2):  # a default may itself be an expression
            text = re.sub(r"\$\{\{\s*([\w.-]+)\s*\}\}", lambda m: values[m.group(1)], text)
        return text.replace(INSTALLED, venv)

    script = tmp_root / "step.sh"
    script.write_text(expand(step["run"]))
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_root), **context,
           **{name: expand(str(value)) for name, value in step["env"].items()}}
    return subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)],
                          env=env, capture_output=True, text=True, timeout=300,
                          cwd=context["GITHUB_WORKSPACE"])


@pytest.mark.parametrize("agent,status", [
    ("echo y > src/app.py; echo agent-done", 0),
    ("echo n > stray.txt; echo agent-done", 83),
])
def test_the_actions_own_step_runs_through_sudo_and_leaves_no_key_behind(
        tmp_root: Path, agent: str, status: int) -> None:
    require_root_and_runc()
    require(shutil.which("sudo") is not None, "needs sudo (GitHub's runners run the step's "
            "agentctl through it; scripts/install-deps.sh installs it)")
    repo = tmp_root / "repo"
    (repo / "src").mkdir(parents=True)
    (repo / "src" / "app.py").write_text("x = 1\n")
    chown_tree(repo, WORKSPACE_UID)
    private = tmp_root / "keys" / "ci"
    private.parent.mkdir()
    subprocess.run(agentctl_command("report", "keygen", str(private)), check=True,
                   capture_output=True)
    runner_temp = tmp_root / "runner-temp"
    runner_temp.mkdir()
    github_output = tmp_root / "github_output"
    context = {"GITHUB_WORKSPACE": str(repo), "RUNNER_TEMP": str(runner_temp),
               "GITHUB_OUTPUT": str(github_output),
               "GITHUB_STEP_SUMMARY": str(tmp_root / "summary.md")}
    # A gateway profile: the run starts only if the model key reached agentctl through sudo.
    result = _run_step({"command": agent, "profile": "coding-agent", "allow-changes": "src/**",
                        "timeout": "2m", "model-api-key": "sk-model-key-through-sudo",
                        "signing-key": private.read_text()}, context, tmp_root)
    assert result.returncode == status, result.stdout + result.stderr
    assert "agent-done" in result.stdout
    # The private key was written for the run only: gone however the step ended.
    assert sorted(p.name for p in runner_temp.iterdir()) == ["agent-report.json",
                                                             "agent-report.json.audit.jsonl"]
    outputs = dict(line.split("=", 1) for line in github_output.read_text().splitlines())
    assert outputs["exit-status"] == str(status)
    assert outputs["verdict"] == ("passed" if status == 0 else "failed")
    report_path = Path(outputs["report"])
    assert report_path == runner_temp / "agent-report.json"
    # Signed with the key the step was given, not an ephemeral one.
    verified = subprocess.run(agentctl_command("report", "verify", str(report_path), "--key",
                                               str(private.with_name("ci.pub"))),
                              capture_output=True, text=True)
    assert verified.returncode == 0, verified.stderr
    report = json.loads(report_path.read_text())
    assert report["run"]["profile"] == "coding-agent" and report["ending"] == "exited"
    assert not report["signature"].get("ephemeral_key")
    assert "sk-model-key-through-sudo" not in report_path.read_text()
    assert host_residue(Path(DEFAULT_ROOT)) == {}


# A module the action's root interpreter would import (json; the package's own name, for the
# GitLab job), planted in the checkout by an agent of an earlier step, as the scope allowed it:
# imported by root, it records so.
PLANTED = ("import os, sys\nwith open({marker!r}, 'a') as f:\n"
           "    f.write(f'{{os.getuid()}} {{sys.argv}}\\n')\n")


def _plant(path: str, marker: Path) -> str:
    """An agent's command that writes PLANTED to `path` in its workspace."""
    text = shlex.quote(PLANTED.format(marker=str(marker)))
    return f"mkdir -p \"$(dirname {path})\" && printf %s {text} > {path} && echo agent-done"


def test_the_actions_step_imports_nothing_an_agent_planted_in_the_checkout(
        tmp_root: Path) -> None:
    """A runner runs each step in the checkout, which the agent writes: the first step's agent
    leaves json.py at its root (in scope), and the next step's `python -m supervisor.ci.action`,
    root through sudo, would import it before the standard library's (`-m` puts the current
    directory first on the path). Isolated (`-I`), it imports nothing from there."""
    require_root_and_runc()
    require(shutil.which("sudo") is not None, "needs sudo (GitHub's runners run the step's "
            "agentctl through it; scripts/install-deps.sh installs it)")
    repo = tmp_root / "repo"
    repo.mkdir()
    chown_tree(repo, WORKSPACE_UID)
    marker = tmp_root / "imported-as-root"
    runner_temp = tmp_root / "runner-temp"
    runner_temp.mkdir()
    context = {"GITHUB_WORKSPACE": str(repo), "RUNNER_TEMP": str(runner_temp),
               "GITHUB_OUTPUT": str(tmp_root / "github_output"),
               "GITHUB_STEP_SUMMARY": str(tmp_root / "summary.md")}
    for agent in (_plant("json.py", marker), "echo agent-done"):
        result = _run_step({"command": agent, "profile": "default", "allow-changes": "**",
                            "timeout": "2m"}, context, tmp_root)
        assert not marker.exists(), marker.read_text()
        assert result.returncode == 0, result.stdout + result.stderr
        assert "agent-done" in result.stdout
    assert (repo / "json.py").read_text() == PLANTED.format(marker=str(marker))


def test_the_gitlab_jobs_action_imports_nothing_an_agent_planted_in_the_checkout(
        tmp_root: Path) -> None:
    """The GitLab template's job runs as root in $CI_PROJECT_DIR: a `supervisor` package an
    agent planted there (here by a real embedded run) would be the one `python -m
    supervisor.ci.action` imports, its __init__ run as root."""
    require_root_and_runc()
    repo = tmp_root / "repo"
    repo.mkdir()
    chown_tree(repo, WORKSPACE_UID)
    marker = tmp_root / "imported-as-root"
    state_root = tmp_root / "ci-state"
    env = agentctl_env(state_root)
    planted = subprocess.run(
        agentctl_command("run", "--embedded", "--workspace", str(repo), "--allow-changes",
                         "**", "--", "sh", "-c", _plant("supervisor/__init__.py", marker)),
        env=env, capture_output=True, text=True, timeout=300, cwd="/")
    assert planted.returncode == 0, planted.stdout + planted.stderr
    assert (repo / "supervisor" / "__init__.py").exists()
    job = yaml.safe_load((ROOT / "ci-templates" / "agent-supervisor.gitlab-ci.yml").read_text())
    [line] = [line for line in job[".agent-supervisor"]["script"]
              if "supervisor.ci.action" in line]
    venv = str(Path(sys.executable).parent.parent)
    result = subprocess.run(
        ["bash", "-eo", "pipefail", "-c", line.replace(INSTALLED, venv)],
        env={**env, "CI_PROJECT_DIR": str(repo), "INPUT_COMMAND": "echo agent-done",
             "INPUT_PROFILE": "default", "INPUT_WORKSPACE": str(repo),
             "INPUT_REPORT": str(tmp_root / "agent-report.json"),
             "INPUT_AGENTCTL": str(Path(sys.executable).parent / "agentctl")},
        capture_output=True, text=True, timeout=300, cwd=repo)
    assert not marker.exists(), marker.read_text()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "agent-done" in result.stdout
    assert host_residue(state_root) == {}


# The GitLab job on a shell executor's shared host, in a mount namespace with a /tmp of its own
# (the host's is shared) where a local user (nobody) made the names the job used to write
# first: a file for the signing key (root's `>` wrote the key into it), a link for the report,
# a file for the summary (appended to). Then the job's script lines after the install (as the
# job runs them, in one `bash -eo pipefail`), its after_script in a shell of its own, and what
# /tmp holds afterwards.
GITLAB_JOB = """
set -u
mkdir "$1/tmp" && mount -t tmpfs -o mode=1777 as-test-tmp "$1/tmp"
mkdir -m 0755 "$1/tmp/${1#/tmp/}" && mount --bind "$1" "$1/tmp/${1#/tmp/}"
mount --move "$1/tmp" /tmp
setpriv --reuid=nobody --regid=nogroup --clear-groups -- sh -c \
    'touch /tmp/agent-report.key /tmp/agent-summary.md && chmod 666 /tmp/agent-report.key \
     /tmp/agent-summary.md && ln -s "$0/root-only/report" /tmp/agent-report.json' "$1"
cd "$CI_PROJECT_DIR"
bash -eo pipefail "$1/script.sh" >"$1/job.out" 2>&1
echo "job $?"
bash -eo pipefail "$1/after_script.sh"
echo "after $?"
ls -lA --time-style=+ /tmp | awk 'NR > 1 && $6 != "'"${1#/tmp/}"'" {print $1, $3, $6, $7, $8}'
wc -c < /tmp/agent-report.key
wc -c < /tmp/agent-summary.md
"""


@pytest.mark.parametrize("agent", ["in_scope", "links_an_artifact_out"])
def test_the_gitlab_job_keeps_its_key_and_evidence_in_a_private_directory(
        tmp_root: Path, agent: str) -> None:
    """The template wrote the signing key, the report and the summary to fixed names in /tmp
    with the shell's `>`: a local user who made them first (without fs.protected_regular) read
    the key and chose where root's report went. They go to a `mktemp -d` directory of the job's
    own (0700), copied into the checkout for the artifacts and removed; the names another user
    made are left alone and never written. A variant: the agent leaves a link at an artifact's
    name in the checkout to a root-only place (a scope violation, status 83): the copy
    replaces the link, never writes through it."""
    require_root_and_runc()
    require(shutil.which("unshare") is not None and shutil.which("setpriv") is not None,
            "needs unshare and setpriv (util-linux)")
    repo = tmp_root / "repo"
    (repo / "src").mkdir(parents=True)
    (repo / "src" / "app.py").write_text("x = 1\n")
    chown_tree(repo, WORKSPACE_UID)
    (tmp_root / "root-only").mkdir(mode=0o700)
    private = tmp_root / "keys" / "ci"
    private.parent.mkdir()
    subprocess.run(agentctl_command("report", "keygen", str(private)), check=True,
                   capture_output=True)
    job = yaml.safe_load((ROOT / "ci-templates" / "agent-supervisor.gitlab-ci.yml").read_text())
    script = job[".agent-supervisor"]["script"]
    installed = next(i for i, line in enumerate(script) if "install-ci.sh" in line)
    venv = str(Path(sys.executable).parent.parent)
    (tmp_root / "script.sh").write_text(
        "\n".join(script[installed + 1:]).replace(INSTALLED, venv) + "\n")
    (tmp_root / "after_script.sh").write_text(
        "\n".join(job[".agent-supervisor"]["after_script"]) + "\n")
    state_root = tmp_root / "ci-state"
    env = agentctl_env(
        state_root, CI_PROJECT_DIR=str(repo), CI_JOB_ID="4242",
        AGENT_COMMAND="echo y > src/app.py; echo agent-done" + (
            f"; ln -s {tmp_root}/root-only/summary agent-summary.md"
            if agent == "links_an_artifact_out" else ""), AGENT_PROFILE="default",
        AGENT_ALLOW_CHANGES="src/**", AGENT_TIMEOUT="2m", AGENT_ARGS="",
        AGENT_REPORT_KEY=private.read_text())
    env.pop("TMPDIR", None)
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                             GITLAB_JOB, "sh", str(tmp_root)], env=env, capture_output=True,
                            text=True, timeout=300, cwd="/")
    out = (tmp_root / "job.out").read_text() if (tmp_root / "job.out").exists() else ""
    lines = result.stdout.splitlines()
    status = 0 if agent == "in_scope" else 83
    assert lines[:2] == [f"job {status}", "after 0"], result.stdout + result.stderr + out
    assert "agent-done" in out
    # /tmp holds only the other user's names, as they were: no directory of the job's left.
    assert sorted(line.rstrip() for line in lines[2:5]) == sorted([
        f"lrwxrwxrwx nobody agent-report.json -> {tmp_root}/root-only/report",
        "-rw-rw-rw- nobody agent-report.key", "-rw-rw-rw- nobody agent-summary.md"]), lines
    assert lines[5:] == ["0", "0"], lines  # the other user's files were never written
    assert list((tmp_root / "root-only").iterdir()) == []
    # The artifacts: the report, signed with the job's key, its audit log and the summary.
    report_path = repo / "agent-report.json"
    verified = subprocess.run(agentctl_command("report", "verify", str(report_path), "--key",
                                               f"{private}.pub"), capture_output=True, text=True)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert (repo / "agent-report.json.audit.jsonl").exists()
    assert not (repo / "agent-summary.md").is_symlink()
    assert ("passed" if agent == "in_scope" else "FAILED") in (
        repo / "agent-summary.md").read_text()
    assert host_residue(state_root) == {}
