"""CI mode's bounds and private places: what an embedded run makes on the host is root's
alone whatever the umask (the per-host slot lock directory), and what an agent leaves in the
checkout bounds neither the report nor the runner's memory. Real runc, namespaces and files;
needs root."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.ci import DEFAULT_ROOT
from tests.conftest import require, require_root_and_runc
from tests.support.embedded import (
    WORKSPACE_UID,
    agentctl_command,
    agentctl_env,
    chown_tree,
    git,
    host_residue,
    watched_state_root,
)

pytestmark = pytest.mark.e2e


@pytest.fixture
def ci(tmp_root: Path) -> Iterator[Path]:
    require_root_and_runc()
    require(shutil.which("git") is not None, "needs git")
    with watched_state_root(tmp_root / "ci-state") as state_root:
        yield state_root
        residue = host_residue(state_root)
    assert residue == {}, f"embedded runs left things behind: {residue}"


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
