"""The workspace's read-only paths and who may use a workspace, attacked for real: an agent in a
real sandbox (runc and Docker, daemon and CI mode) tries every way we know to plant code the
host's git runs later, a host thread swaps paths for symlinks while two launchers start runs,
and real users launch on each other's private directories. Needs root."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor.profiles import load_profile
from tests.conftest import require
from tests.support.daemon import Daemon, running_daemon
from tests.support.embedded import WORKSPACE_UID, chown_tree, git, host_residue, run_embedded

pytestmark = pytest.mark.e2e

GUARDED = load_profile("coding-agent", []).workspace.readonly
EBUSY, EROFS, EACCES, EPERM, ENOTDIR, EXDEV = 16, 30, 13, 1, 20, 18

# Each attack on its own: plant something the host's git would run (or follow) at the owner's
# next checkout, or make a read-only path writable by moving what is around it.
ATTACKS = r"""
import json, os, subprocess, sys
HOOK = "#!/bin/sh\necho planted > %s/$(basename $0)\n" % sys.argv[1]
out = {}
def attempt(name, fn):
    try:
        fn()
        out[name] = "ok"
    except OSError as exc:
        out[name] = exc.errno
    except subprocess.CalledProcessError as exc:
        out[name] = "exit %d" % exc.returncode
def write(path, text=HOOK, mode=0o755):
    parent = os.path.dirname(path)
    if parent and not os.path.isdir(parent):
        os.makedirs(parent)
    with open(path, "w") as handle:
        handle.write(text)
    os.chmod(path, mode)
def swap_in(path, text):
    write(path + ".new", text)
    os.rename(path + ".new", path)
attempt("rename_git", lambda: os.rename(".git", ".g"))
attempt("rename_hooks", lambda: os.rename(".git/hooks", ".git/h"))
attempt("rmtree_hooks", lambda: os.rmdir(".git/hooks"))
attempt("hook", lambda: write(".git/hooks/post-checkout"))
attempt("hook_replaced", lambda: swap_in(".git/hooks/pre-commit.sample", HOOK))
attempt("config_append", lambda: open(".git/config", "a").write(
    "[core]\n\thooksPath = /workspace/evil\n\tfsmonitor = /workspace/evil/post-checkout\n"))
attempt("config_swap", lambda: swap_in(".git/config", "[core]\n\thooksPath = evil\n"))
attempt("config_unlink", lambda: os.unlink(".git/config"))
attempt("config_worktree", lambda: write(".git/config.worktree", "[core]\n\thooksPath=evil\n"))
attempt("commondir", lambda: write(".git/commondir", "../evil\n"))
attempt("info_attributes", lambda: write(".git/info/attributes", "* filter=evil\n"))
attempt("alternates", lambda: write(".git/objects/info/alternates", "/root/.git/objects\n"))
attempt("module_hook", lambda: write(".git/modules/sub/hooks/post-checkout"))
attempt("worktree_dir", lambda: write(".git/worktrees/w/commondir", "../../evil\n"))
attempt("gitattributes", lambda: write(".gitattributes", "* filter=evil diff=evil\n"))
attempt("gitmodules", lambda: write(".gitmodules", "[submodule \"x\"]\n\tpath = x\n"))
attempt("workflow", lambda: write(".github/workflows/pwn.yml", "on: push\n"))
attempt("gitlab_ci", lambda: write(".gitlab-ci.yml", "pwn: {script: [id]}\n"))
attempt("evil_dir", lambda: write("evil/post-checkout"))
git = ["git", "-c", "user.name=agent", "-c", "user.email=agent@example.invalid"]
attempt("hookspath_cli", lambda: subprocess.run(
    [*git, "config", "core.hooksPath", "/workspace/evil"], check=True,
    capture_output=True) and None)
# What a coding agent legitimately does still works.
write("src/feature.py", "VALUE = 1\n", 0o644)
work = subprocess.run([*git, "add", "src"], capture_output=True, text=True)
commit = subprocess.run([*git, "commit", "-q", "-m", "agent change"], capture_output=True,
                        text=True)
out["commit"] = commit.returncode
out["commit_err"] = work.stderr + commit.stderr
print(json.dumps(out))
"""
REFUSED = {"rename_git": (EBUSY,), "rename_hooks": (EBUSY,), "rmtree_hooks": (EBUSY,),
           "hook": (EROFS,), "hook_replaced": (EROFS,), "config_append": (EROFS,),
           "config_swap": (EBUSY,), "config_unlink": (EBUSY,), "config_worktree": (EROFS,),
           "commondir": (EROFS,), "info_attributes": (EROFS,), "alternates": (EROFS,),
           "module_hook": (EROFS,), "worktree_dir": (EROFS,), "gitattributes": (EROFS,),
           "gitmodules": (EROFS,), "workflow": (EROFS,), "gitlab_ci": (EROFS,)}


def guard_profile(daemon: Daemon) -> str:
    """The coding-agent profile's read-only list on a profile without egress (the test daemons
    run no gateway)."""
    listed = ", ".join(json.dumps(p) for p in GUARDED)
    (daemon.root / "profiles" / "ws-guard.toml").write_text(
        f'description = "workspace guard test"\n[workspace]\nreadonly = [{listed}]\n')
    return "ws-guard"


def make_repo(root: Path, uid: int = WORKSPACE_UID) -> Path:
    """A git checkout owned by an unprivileged user, with sample hooks, info/exclude and a
    README; no .github, .gitattributes, .gitmodules or .gitlab-ci.yml (absent at launch)."""
    repo = root / "repo"
    (repo / "src").mkdir(parents=True)
    (repo / "README").write_text("hello\n")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-q", "-m",
        "initial")
    chown_tree(repo, uid)
    return repo


def tree_of(path: Path) -> dict[str, bytes | None]:
    """Every path under `path` -> its bytes (None for directories), symlinks unresolved."""
    found: dict[str, bytes | None] = {}
    for dirpath, dirs, files in os.walk(path):
        for name in dirs + files:
            full = Path(dirpath, name)
            found[str(full.relative_to(path))] = (None if full.is_dir() and not full.is_symlink()
                                                  else os.readlink(full).encode()
                                                  if full.is_symlink() else full.read_bytes())
    return found


def owner_checkout(repo: Path, marker_dir: Path) -> list[str]:
    """What the owner's next git commands on the host run: returns the hooks that fired."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(marker_dir), "GIT_CONFIG_NOSYSTEM": "1"}
    for args in (["checkout", "-q", "-b", "after-run"], ["status", "--short"],
                 ["diff", "HEAD~1"], ["commit", "-q", "--allow-empty", "-m", "host"]):
        subprocess.run(["git", "-c", "user.name=o", "-c", "user.email=o@example.invalid",
                        *args], cwd=repo, env=env, user=WORKSPACE_UID, group=WORKSPACE_UID,
                       capture_output=True, check=False)
    return sorted(p.name for p in marker_dir.iterdir() if p.name != ".gitconfig")


@pytest.fixture
def markers(tmp_root: Path) -> Path:
    marker_dir = tmp_root / "markers"
    marker_dir.mkdir()
    marker_dir.chmod(0o777)
    return marker_dir


def check_attacks(out: dict[str, Any]) -> None:
    wrong = {name: out.get(name) for name, errnos in REFUSED.items()
             if out.get(name) not in errnos}
    assert wrong == {}, f"attacks that were not refused as expected: {wrong}"
    assert out["hookspath_cli"] != "ok"
    assert out["commit"] == 0, out["commit_err"]


@pytest.mark.parametrize("runtime", ["runc", "docker"], indirect=True)
def test_read_only_paths_hold_against_renames_absent_paths_and_config(
        daemon: Daemon, runtime: str, tmp_root: Path, markers: Path) -> None:
    repo = make_repo(tmp_root)
    protected_before = {p: tree_of(repo / p) if (repo / p).is_dir() else (repo / p).read_bytes()
                        for p in (".git/hooks", ".git/config", ".git/info")}
    profile = guard_profile(daemon)
    result = daemon.agentctl("run", "--name", "attacker", "--profile", profile, "--workspace",
                             str(repo), "--", "/usr/bin/python3", "-c", ATTACKS, str(markers))
    assert result.returncode == 0, result.stdout + result.stderr
    check_attacks(json.loads(result.stdout.strip().splitlines()[-1]))
    # On the host: nothing the agent planted runs, the protected paths are as they were, and
    # every placeholder is gone again.
    assert owner_checkout(repo, markers) == []
    assert {p: tree_of(repo / p) if (repo / p).is_dir() else (repo / p).read_bytes()
            for p in protected_before} == protected_before
    for absent in (".gitattributes", ".gitmodules", ".github", ".gitlab-ci.yml", ".gitlab",
                   ".git/commondir", ".git/config.worktree", ".git/modules", ".git/worktrees",
                   ".git/objects/info/alternates"):
        assert not (repo / absent).exists(), absent
    assert "agent change" in git(repo, "log", "--format=%s")


def test_ci_mode_holds_the_same_and_leaves_nothing_on_disk(
        tmp_root: Path, markers: Path) -> None:
    require(shutil.which("git") is not None, "needs git")
    state_root = tmp_root / "ci-state"
    repo = make_repo(tmp_root)
    hooks_before = tree_of(repo / ".git" / "hooks")
    report_path = tmp_root / "report.json"
    result = run_embedded(state_root, "--profile", "coding-agent", "--workspace", str(repo),
                          "--report", str(report_path), "--", "/usr/bin/python3", "-c", ATTACKS,
                          str(markers))
    assert result.stdout.strip(), result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    check_attacks(out)
    report = json.loads(report_path.read_text())
    changes = {c["path"] for c in report["manifest"]["changes"]}
    # Only the agent's own work changed: no placeholder shows in the manifest either.
    guarded = [g.rstrip("/") for g in GUARDED]
    assert not any(p == g or p.startswith(g + "/") for p in changes for g in guarded), changes
    assert "src/feature.py" in changes
    assert result.returncode == 0, result.stdout + result.stderr
    assert tree_of(repo / ".git" / "hooks") == hooks_before
    assert owner_checkout(repo, markers) == []
    assert host_residue(state_root) == {}


def test_ci_mode_quarantines_files_that_select_host_filters(tmp_root: Path) -> None:
    """A nested .gitattributes (or .gitmodules) is not a fixed path a bind can hold: the scope
    guard fails the run on it and moves it out of the checkout, so no later CI step's git
    sees it."""
    state_root = tmp_root / "ci-state"
    repo = make_repo(tmp_root)
    report_path = tmp_root / "report.json"
    result = run_embedded(
        state_root, "--profile", "coding-agent", "--workspace", str(repo), "--report",
        str(report_path), "--", "sh", "-c",
        "printf '* filter=lfs diff=evil\\n' > src/.gitattributes; echo x > src/ok.py")
    assert result.returncode == 83, result.stdout + result.stderr
    report = json.loads(report_path.read_text())
    violations = {v["path"]: v["why"] for v in report["scope"]["violations"]}
    assert set(violations) == {"src/.gitattributes"}, violations
    quarantined = {q["path"]: q for q in report["scope"]["quarantined"]}
    assert set(quarantined) == {"src/.gitattributes"}
    assert not (repo / "src" / ".gitattributes").exists()
    moved = Path(quarantined["src/.gitattributes"]["moved_to"])
    assert moved.read_text() == "* filter=lfs diff=evil\n" and str(repo) not in str(moved)
    assert (repo / "src" / "ok.py").exists()  # in scope: stays
    assert "quarantined" in result.stderr
    shutil.rmtree(moved.parent, ignore_errors=True)
    assert host_residue(state_root) == {}


# The race: a host thread (the strongest attacker: the workspace's owner) swaps `.git/hooks`,
# then `.git` itself, for symlinks into a root-only directory while two launchers start runs.
RACE_ATTEMPTS = 15  # per launcher (the unfixed daemon let 1-2 of 20 through)


@pytest.mark.parametrize("runtime", ["runc", "docker"], indirect=True)
def test_symlink_swaps_during_launch_never_bind_outside_the_workspace(
        daemon: Daemon, runtime: str, tmp_root: Path) -> None:
    vault = tmp_root / "vault"
    (vault / "inner" / "hooks").mkdir(parents=True)
    secret = "vault-secret-" + os.urandom(4).hex()
    (vault / "inner" / "token.txt").write_text(secret)
    (vault / "inner" / "hooks" / "token.txt").write_text(secret)
    vault.chmod(0o700)
    repo = make_repo(tmp_root)
    git_dir, hooks = repo / ".git", repo / ".git" / "hooks"
    profile = guard_profile(daemon)
    stop = threading.Event()
    swaps = [0]

    def swapper() -> None:
        # Each state lasts a few to tens of milliseconds, the span of a launch's steps, so a
        # check and a later use of the same path see different things a good part of the time.
        rng = random.Random(7)
        while not stop.is_set():
            for real, target in ((hooks, vault / "inner"), (git_dir, vault / "inner")):
                aside = real.with_name(real.name + ".aside")
                with contextlib.suppress(OSError):
                    os.rename(real, aside)
                    os.symlink(target, real)
                    time.sleep(rng.uniform(0.005, 0.06))
                    os.unlink(real)
                    os.rename(aside, real)
                    swaps[0] += 1
                time.sleep(rng.uniform(0.005, 0.06))

    outcomes: list[tuple[int, str]] = []
    lock = threading.Lock()

    def launcher(index: int) -> None:
        for attempt in range(RACE_ATTEMPTS):
            result = daemon.agentctl(
                "run", "--name", f"race-{index}-{attempt}", "--profile", profile,
                "--workspace", str(repo), "--", "/bin/sh", "-c",
                "cat .git/hooks/token.txt .git/token.txt .git/hooks/hooks/token.txt "
                "2>/dev/null; echo ran")
            with lock:
                outcomes.append((result.returncode, result.stdout + result.stderr))

    threads = [threading.Thread(target=swapper, daemon=True)]
    threads += [threading.Thread(target=launcher, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads[1:]:
        thread.join(timeout=1200)
    stop.set()
    threads[0].join(timeout=10)
    escapes = [text for _code, text in outcomes if secret in text]
    assert escapes == [], f"{len(escapes)} of {len(outcomes)} launches read the vault"
    assert len(outcomes) == 2 * RACE_ATTEMPTS and swaps[0] > 0
    # Each launch either ran on the real checkout or was refused (fail closed): a symlink or
    # a missing path met by openat2 (workspace_invalid), by runc's own mount checks
    # (runtime_failed), or a bind found misplaced afterwards (enforcement_failed).
    refusals = ("workspace_invalid", "runtime_failed", "enforcement_failed")
    for code, text in outcomes:
        assert (code == 0 and "ran" in text) or any(r in text for r in refusals), text


@contextlib.contextmanager
def users(*names: str) -> Iterator[dict[str, pwd.struct_passwd]]:
    tag = os.urandom(2).hex()
    group = f"ast-sock-{tag}"
    full = {name: f"ast-{name[:5]}-{tag}" for name in names}
    subprocess.run(["groupadd", group], check=True)
    try:
        for login in full.values():
            subprocess.run(["useradd", "-M", "-N", "-s", "/usr/sbin/nologin", "-G", group,
                            login], check=True)
        made = {name: pwd.getpwnam(login) for name, login in full.items()}
        yield {"socket_group": group, **made}  # type: ignore[dict-item]
    finally:
        for login in full.values():
            subprocess.run(["userdel", login], check=False, capture_output=True)
        subprocess.run(["groupdel", group], check=False, capture_output=True)


def as_user(daemon: Daemon, user: pwd.struct_passwd, *args: str
            ) -> subprocess.CompletedProcess[str]:
    env = {"AGENT_SUPERVISOR_SOCKET": str(daemon.socket), "PATH": "/usr/bin:/bin", "HOME": "/",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.run(
        [sys.executable, "-m", "supervisor.cli", *args], env=env, capture_output=True,
        text=True, timeout=120, user=user.pw_uid, group=user.pw_gid,
        extra_groups=os.getgrouplist(user.pw_name, user.pw_gid), cwd="/")


# The API itself, as the user: agentctl's own readability check must not be what refuses.
RAW_LAUNCH = r"""
import http.client, socket, sys
class Unix(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(sys.argv[1])
conn = Unix("localhost", timeout=120)
conn.request("POST", "/v1/runs", body=sys.argv[2], headers={"Content-Type": "application/json"})
response = conn.getresponse()
print(response.status)
print(response.read().decode())
"""


def raw_launch(daemon: Daemon, user: pwd.struct_passwd, body: dict[str, Any]
               ) -> tuple[int, dict[str, Any]]:
    result = subprocess.run(
        [sys.executable, "-I", "-c", RAW_LAUNCH, str(daemon.socket), json.dumps(body)],
        capture_output=True, text=True, timeout=120, user=user.pw_uid, group=user.pw_gid,
        extra_groups=os.getgrouplist(user.pw_name, user.pw_gid), cwd="/")
    assert result.returncode == 0, result.stderr
    status, text = result.stdout.split("\n", 1)
    return int(status), json.loads(text)


def private_dir(parent: Path, user: pwd.struct_passwd, name: str, mode: int = 0o700) -> Path:
    path = parent / name
    path.mkdir(parents=True)
    (path / "diary.txt").write_text("private\n")
    for item in (path, path / "diary.txt"):
        os.chown(item, user.pw_uid, user.pw_gid)
    path.chmod(mode)
    return path


def refused_workspace(status: int, body: dict[str, Any], uid: int) -> None:
    assert status == 403, body
    error = body["error"]
    assert error["code"] == "workspace_forbidden" and error["detail"]["uid"] == uid, error
    assert error["detail"]["hint"]


def test_a_caller_cannot_launch_on_another_users_private_directory(tmp_root: Path) -> None:
    with users("admin", "victim") as made:
        admin, victim = made["admin"], made["victim"]
        srv = tmp_root / "srv"
        srv.mkdir()
        home = tmp_root / "home"
        home.mkdir()
        secret_home = private_dir(home, victim, "victim")       # 0700, the victim's
        under_root = private_dir(srv, victim, "job")             # 0700, under a granted root
        mine = private_dir(home, admin, "admin")                 # the admin's own
        shared = private_dir(home, victim, "shared", 0o770)      # group access for the admin
        os.chown(shared, victim.pw_uid, admin.pw_gid)
        (mine / "link").symlink_to(secret_home)                  # a way in through a symlink
        extra = {"daemon": {"socket_group": made["socket_group"]},
                 "roles": {"admin": [f"user:{admin.pw_name}"]},
                 "workspaces": {"roots": {"admin": [str(srv)]}}}
        with running_daemon(tmp_root, **extra) as daemon:  # type: ignore[arg-type]
            before = tree_of(home)
            for workspace in (secret_home, mine / "link", secret_home / "nope"):
                status, body = raw_launch(daemon, admin, {
                    "name": "snoop", "workspace": str(workspace),
                    "command": ["sh", "-c", "cat diary.txt; echo admin-was-here > diary.txt"]})
                refused_workspace(status, body, admin.pw_uid)
            # agentctl, which no longer checks anything itself, gets the daemon's answer.
            result = as_user(daemon, admin, "run", "--json", "--name", "snoop", "--workspace",
                             str(mine / "link"), "--", "true")
            assert result.returncode == 5 and "workspace_forbidden" in result.stdout, result
            # Refusals change nothing: no agent registered, nothing written, each audited.
            assert daemon.client.agents()["agents"] == []
            assert tree_of(home) == before
            refusals = [e for e in daemon.client.audit(limit=100)["entries"]
                        if e["outcome"] == "refused:workspace_forbidden"]
            assert len(refusals) == 4 and {e["actor"] for e in refusals} == {
                f"{admin.pw_name}(uid={admin.pw_uid})"}
            # What the admin may use: their own directory, one their group may write, and
            # any under the root the config grants their role.
            for name, workspace in (("own", mine), ("shared", shared), ("granted", under_root)):
                result = as_user(daemon, admin, "run", "--name", name, "--workspace",
                                 str(workspace), "--", "sh", "-c", "cat diary.txt")
                assert result.returncode == 0 and "private" in result.stdout, (
                    name, result.stdout + result.stderr)
            # Root (owner) may use any.
            result = daemon.agentctl("run", "--name", "root-run", "--workspace",
                                     str(secret_home), "--", "cat", "diary.txt")
            assert result.returncode == 0 and "private" in result.stdout, result.stderr



ROOT_RACE_ATTEMPTS = 12


def test_a_workspace_root_swapped_during_launch_is_never_what_gets_bound(tmp_root: Path) -> None:
    """Item 5 for the workspace root itself: an admin launches on their own directory while
    the directory is swapped, every few milliseconds, for a symlink to another user's 0700
    directory. The daemon admits the directory it opened as the caller and binds that very
    inode, so a launch runs on the admin's own files or is refused; never on the victim's."""
    with users("admin", "victim") as made:
        admin, victim = made["admin"], made["victim"]
        home = tmp_root / "home"
        home.mkdir()
        vault = private_dir(home, victim, "vault")
        secret = "victim-secret-" + os.urandom(4).hex()
        (vault / "diary.txt").write_text(secret)
        mine = private_dir(home, admin, "mine")
        aside = home / "mine.aside"
        extra = {"daemon": {"socket_group": made["socket_group"]},
                 "roles": {"admin": [f"user:{admin.pw_name}"]}}
        with running_daemon(tmp_root, **extra) as daemon:  # type: ignore[arg-type]
            stop = threading.Event()
            swaps = [0]

            def swapper() -> None:
                rng = random.Random(11)
                while not stop.is_set():
                    with contextlib.suppress(OSError):
                        os.rename(mine, aside)
                        os.symlink(vault, mine)
                        time.sleep(rng.uniform(0.002, 0.03))
                        os.unlink(mine)
                        os.rename(aside, mine)
                        swaps[0] += 1
                    time.sleep(rng.uniform(0.002, 0.03))

            thread = threading.Thread(target=swapper, daemon=True)
            thread.start()
            outcomes = []
            try:
                for attempt in range(ROOT_RACE_ATTEMPTS):
                    result = as_user(daemon, admin, "run", "--name", f"root-race-{attempt}",
                                     "--workspace", str(mine), "--", "sh", "-c",
                                     "cat diary.txt; echo ran")
                    outcomes.append(result.stdout + result.stderr)
            finally:
                stop.set()
                thread.join(timeout=10)
            assert swaps[0] > 0
            escapes = [text for text in outcomes if secret in text]
            assert escapes == [], f"{len(escapes)} of {len(outcomes)} launches read the vault"
            for text in outcomes:  # the admin's own files, or refused (the symlink, as them)
                assert ("private" in text and "ran" in text) or "workspace_forbidden" in text \
                    or "workspace_invalid" in text, text
            assert any("private" in text for text in outcomes), outcomes
            assert (vault / "diary.txt").read_text() == secret
