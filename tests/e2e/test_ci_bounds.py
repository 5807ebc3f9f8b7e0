"""CI mode's bounds and private places: what an embedded run makes on the host is root's
alone whatever the umask (the per-host slot lock directory), and what an agent leaves in the
checkout bounds neither the report nor the runner's memory. Real runc, namespaces and files;
needs root."""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.ci import DEFAULT_ROOT
from supervisor.ci.manifest import LISTED_AT_MOST, listed_digest
from tests.conftest import require, require_root_and_runc
from tests.support.embedded import (
    WORKSPACE_UID,
    agentctl_command,
    agentctl_env,
    chown_tree,
    clean_state_root,
    git,
)

pytestmark = pytest.mark.e2e


@pytest.fixture
def ci(tmp_root: Path) -> Iterator[Path]:
    require_root_and_runc()
    require(shutil.which("git") is not None, "needs git")
    with clean_state_root(tmp_root / "ci-state") as state_root:
        yield state_root


@pytest.fixture
def repo(tmp_root: Path) -> Path:
    """A small git checkout owned by an unprivileged uid, as a runner's is."""
    repo = tmp_root / "repo"
    (repo / "src").mkdir(parents=True)
    (repo / "src" / "calc.py").write_text("def add(a, b):\n    return a + b\n")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-q", "-m",
        "initial")
    chown_tree(repo, WORKSPACE_UID)
    return repo


# In a mount namespace of its own with an empty /run (so the host's per-host directory of
# embedded runs, which concurrent runs share, is neither read nor changed): umask 0, a run whose
# checkout is root's and whose copy root another user made, so that it is refused right after
# it has made the per-host directory and claimed its slot, before anything runs; then the modes
# it left there.
IN_EMPTY_RUN = """
set -u
mount -t tmpfs -o mode=0755 as-test-run /run
{prepare}
umask 0
{command} >/dev/null 2>"$1/stderr"
echo "status $?"
stat -c '%n %a %u' {default_root} {default_root}/locks {default_root}/codecache "$1/deep/a" \
    "$1/deep/a/ci-state" 2>&1 || true
"""


def _in_empty_run(tmp_root: Path, state_root: Path, repo: Path, prepare: str = ""
                  ) -> tuple[list[str], str]:
    copies = tmp_root / "theirs-copies"
    copies.mkdir(exist_ok=True)
    shutil.chown(copies, "nobody")
    chown_tree(repo, 0)
    command = shlex.join(agentctl_command(
        "run", "--embedded", "--workspace", str(repo), "--", "touch", "agent-ran"))
    script = IN_EMPTY_RUN.format(prepare=prepare, command=command, default_root=DEFAULT_ROOT)
    env = agentctl_env(state_root, AGENT_SUPERVISOR_CI_COPY_ROOT=str(copies))
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                             script, "sh", str(tmp_root)], env=env, capture_output=True,
                            text=True, timeout=120, cwd="/")
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.splitlines(), (tmp_root / "stderr").read_text()


def test_the_per_host_directory_is_made_root_only_under_umask_0(
        ci: Path, repo: Path, tmp_root: Path) -> None:
    """/run/agent-supervisor-ci (the slots' locks, the code cache) is made whatever
    $AGENT_SUPERVISOR_CI_ROOT says; it was made with the umask's mode: under umask 0 writable
    by anyone, who could move the locks aside and run in a slot a run holds (its cgroup, its
    host uids). Made 0711, its locks 0700, and so is a state root's path made 0711 (it was
    0777 there, and the run refused by its own check)."""
    require(shutil.which("unshare") is not None, "needs unshare (util-linux)")
    state_root = tmp_root / "deep" / "a" / "ci-state"
    lines, stderr = _in_empty_run(tmp_root, state_root, repo)
    # Refused at the copy root (another user's), after the per-host directory was made.
    assert lines[0] == "status 6", "\n".join(lines) + stderr
    assert "AGENT_SUPERVISOR_CI_COPY_ROOT" in stderr and "uid 65534" in stderr, stderr
    assert lines[1:] == [f"{DEFAULT_ROOT} 711 0", f"{DEFAULT_ROOT}/locks 700 0",
                         f"{DEFAULT_ROOT}/codecache 700 0", f"{tmp_root}/deep/a 711 0",
                         f"{state_root} 711 0"], stderr
    assert not (repo / "agent-ran").exists()


@pytest.mark.parametrize("left", ["writable", "theirs"])
def test_a_slot_lock_directory_others_can_change_is_refused(
        ci: Path, repo: Path, tmp_root: Path, left: str) -> None:
    """A per-host directory an earlier run left writable by anyone (umask 0), or a lock
    directory another user made first: refused as the roots are, with the same structured
    error naming the directory, before the agent starts. It was used as it was."""
    require(shutil.which("unshare") is not None, "needs unshare (util-linux)")
    prepare = (f"mkdir -m 0777 {DEFAULT_ROOT}" if left == "writable"
               else f"mkdir -m 0711 {DEFAULT_ROOT} && mkdir {DEFAULT_ROOT}/locks && "
                    f"chown nobody {DEFAULT_ROOT}/locks")
    lines, stderr = _in_empty_run(tmp_root, ci, repo, prepare)
    assert lines[0] == "status 6", "\n".join(lines) + stderr
    assert "invalid_request" in stderr and "the slot lock directory" in stderr, stderr
    why = ("can be written by others (mode 0777)" if left == "writable"
           else "is owned by uid 65534")
    assert why in stderr and "AGENT_SUPERVISOR_CI_COPY_ROOT" not in stderr, stderr
    assert not (repo / "agent-ran").exists()


# A local user (nobody) makes the copy root's former default, /var/tmp/agent-supervisor-ci,
# first, in a mount namespace with a /var/tmp of its own (the host's is shared); then a run of a
# root-owned checkout with the default copy root, whose change is applied back.
SQUATTED_VAR_TMP = """
set -u
mount -t tmpfs -o mode=1777 as-test-var-tmp /var/tmp
setpriv --reuid=nobody --regid=nogroup --clear-groups -- mkdir -m 0777 \
    /var/tmp/agent-supervisor-ci
exec "$@"
"""


def test_a_squatted_former_copy_root_does_not_stop_runs_of_root_owned_checkouts(
        ci: Path, repo: Path) -> None:
    """The copy root's default was /var/tmp/agent-supervisor-ci: any local user could make it
    first, and every run of a root-owned checkout was then refused (exit 6) until root removed
    it. The default is now in /var/lib, where only root makes directories: the run goes."""
    require(shutil.which("unshare") is not None and shutil.which("setpriv") is not None,
            "needs unshare and setpriv (util-linux)")
    chown_tree(repo, 0)
    env = agentctl_env(ci)
    env.pop("AGENT_SUPERVISOR_CI_COPY_ROOT", None)
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", SQUATTED_VAR_TMP,
         "sh", *agentctl_command("run", "--embedded", "--workspace", str(repo),
                                 "--allow-changes", "src/**", "--", "sh", "-c",
                                 "echo 'x = 2' > src/new.py && echo agent-done")],
        env=env, capture_output=True, text=True, timeout=300, cwd="/")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "agent-done" in result.stdout
    assert (repo / "src" / "new.py").read_text() == "x = 2\n"
    assert (repo / "src" / "new.py").stat().st_uid == 0


# The runner's peak resident memory: agentctl execs the runner in its own process, this
# wrapper's only child (its children's are folded in as it waits for them, and are smaller).
MEASURED = ("import resource, subprocess, sys\n"
            "status = subprocess.run(sys.argv[1:]).returncode\n"
            "print(f'peak_rss_kib={resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}', "
            "file=sys.stderr)\n"
            "sys.exit(status)\n")
# 100,000 empty files in 20 directories, the reproduction of the finding.
MANY_FILES = "for d in $(seq 1 20); do mkdir d$d && (cd d$d && seq 1 5000 | xargs touch); done"
EMPTY = hashlib.sha256(b"").hexdigest()


def _measured(state_root: Path, repo: Path, report: Path, allow: str, agent: str,
              *options: str) -> tuple[subprocess.CompletedProcess[str], int]:
    result = subprocess.run(
        [sys.executable, "-I", "-c", MEASURED, *agentctl_command(
            "run", "--embedded", "--workspace", str(repo), "--allow-changes", allow,
            "--report", str(report), *options, "--", "sh", "-c", agent)],
        env=agentctl_env(state_root), capture_output=True, text=True, timeout=600, cwd="/")
    peak = int(result.stderr.rsplit("peak_rss_kib=", 1)[1].split()[0]) * 1024
    return result, peak


@pytest.mark.parametrize("allow,owner", [("src/**", WORKSPACE_UID), ("**", WORKSPACE_UID),
                                         ("**", 0)])
def test_an_agents_many_paths_bound_neither_the_report_nor_the_runners_memory(
        ci: Path, repo: Path, tmp_root: Path, allow: str, owner: int) -> None:
    """An agent that leaves 100,000 empty files made a 33 MB report and a runner 367 MB
    resident, growing with every path. Every path is still judged (the totals are exact, the
    100,020 violations fail the run with 83, or all of them pass in scope as a large
    dependency install must, applied back from the copy of a root-owned checkout), but the
    report lists at most LISTED_AT_MOST of each list with a digest over all of them, and the
    runner's peak memory is within a margin of a run that leaves one file."""
    chown_tree(repo, owner)
    small, small_peak = _measured(ci, repo, tmp_root / "small.json", allow, "touch one")
    assert small.returncode == (83 if allow == "src/**" else 0), small.stderr
    git(repo, "clean", "-fdq")
    report_path = tmp_root / "report.json"
    key = tmp_root / "ci-key"
    subprocess.run(agentctl_command("report", "keygen", str(key)), check=True,
                   capture_output=True)
    result, peak = _measured(ci, repo, report_path, allow, MANY_FILES, "--signing-key",
                             str(key))
    report = json.loads(report_path.read_text())
    # The truncated report verifies, its provenance against the repository too.
    verified = subprocess.run(agentctl_command("report", "verify", str(report_path), "--key",
                                               f"{key}.pub", "--repo", str(repo)),
                              capture_output=True, text=True)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    changes = sorted([{"path": f"d{d}", "change": "created", "kind": "dir", "flags": []}
                      for d in range(1, 21)]
                     + [{"path": f"d{d}/{i}", "change": "created", "kind": "file",
                         "sha256_after": EMPTY, "flags": []}
                        for d in range(1, 21) for i in range(1, 5001)],
                     key=lambda change: str(change["path"]))
    manifest, scope = report["manifest"], report["scope"]
    assert manifest["changes_total"] == len(changes) == 100_020
    assert manifest["changes"] == changes[:LISTED_AT_MOST]
    assert manifest["changes_sha256"] == listed_digest(changes)
    if allow == "src/**":
        assert result.returncode == 83, result.stderr[-2000:]
        assert scope["violations_total"] == 100_020 and len(scope["violations"]) == LISTED_AT_MOST
        assert "agentctl: 100020 change(s) outside the allowed scope" in result.stderr
    else:
        assert result.returncode == 0, result.stderr[-2000:]
        assert scope["violations_total"] == 0 and scope["violations"] == []
        assert len(list((repo / "d7").iterdir())) == 5000
        assert (repo / "d7").stat().st_uid == owner
        if owner == 0:
            assert report["checkout"]["paths_applied"] == 100_020
    assert report_path.stat().st_size < 4 << 20, report_path.stat().st_size
    assert peak - small_peak < 64 << 20, (peak, small_peak)


# Directories of 250-character names nested as deep as the agent's shell can go (its `cd`
# stops near PATH_MAX: the last directory is made, not entered), a planted .gitattributes in
# the deepest one it entered.
DEEP = ('n=$(printf "x%.0s" $(seq 1 250)); for i in $(seq 1 30); do '
        '(mkdir $n && cd $n) 2>/dev/null && cd $n || break; done; '
        'echo deep > file; echo "* filter=x" > .gitattributes; echo "depth $i"')


def test_paths_deeper_than_path_max_from_the_host_are_judged_and_quarantined(
        ci: Path, repo: Path, tmp_root: Path) -> None:
    """A variant: paths whose host path (the workspace's own path before them) is longer than
    PATH_MAX. The runner read each by its full path: `File name too long`, a traceback and no
    report (status 1). Walked from directory descriptors, they are judged as any other: the
    planted .gitattributes is a violation (83) and taken out of the checkout."""
    report_path = tmp_root / "report.json"
    result = subprocess.run(
        agentctl_command("run", "--embedded", "--workspace", str(repo), "--allow-changes",
                         "**", "--report", str(report_path), "--", "sh", "-c", DEEP),
        env=agentctl_env(ci), capture_output=True, text=True, timeout=300, cwd="/")
    assert result.returncode == 83, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    depth = int(result.stdout.rsplit("depth ", 1)[1].split()[0])
    assert len(str(repo)) + 251 * depth > 4096  # the deepest directory's host path
    report = json.loads(report_path.read_text())
    deep = "/".join(["x" * 250] * (depth - 1))
    assert report["manifest"]["changes_total"] == depth + 2
    assert report["scope"]["violations"] == [
        {"path": f"{deep}/.gitattributes", "rule": "host_code",
         "why": "created: a git attributes or modules file can make the host's git run a "
                "filter or driver"}]
    [taken] = report["scope"]["quarantined"]
    assert taken["path"] == f"{deep}/.gitattributes" and "moved_to" in taken, taken
    names = subprocess.run(["find", str(repo), "-name", ".gitattributes"], capture_output=True,
                           text=True)
    assert names.stdout == "", names.stdout
