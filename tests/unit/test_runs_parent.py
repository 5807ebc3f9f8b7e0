"""Whether a configured runs' parent cgroup is the supervisor's to take
(supervisor/sandbox/runs_parent.py), judged on cgroup trees laid out in tmp. No privilege: the
real kernel's refusal and the mark are in tests/privileged/test_runs_parent.py."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.sandbox import runs_parent
from tests.support.daemon import wait_for


def tree(root: Path, *, hybrid: bool = False) -> Path:
    """A v2 tree (or a hybrid host's: v1 pids and memory beside `unified`); its v2 root."""
    v2 = root / "unified" if hybrid else root
    v2.mkdir(parents=True, exist_ok=True)
    (v2 / "cgroup.controllers").write_text("")
    if hybrid:
        for controller in ("pids", "memory"):
            (root / controller).mkdir()
    return v2


def cgroup(path: Path, pids: str = "") -> Path:
    path.mkdir(parents=True)
    (path / "cgroup.procs").write_text(pids)
    return path


def test_an_absent_parent_is_the_supervisors_to_make(tmp_path: Path) -> None:
    tree(tmp_path)
    assert runs_parent.why_foreign("/agent-supervisor", tmp_path) is None


def test_a_parent_holding_only_runs_cgroups_is_taken(tmp_path: Path) -> None:
    """An earlier daemon's parent (unmarked: made before the mark, or the kernel refused it)
    with handed-over runs, of this and of an earlier name_prefix, their MCP servers and a
    self-test canary: adoption needs it taken."""
    v2 = tree(tmp_path)
    parent = cgroup(v2 / "agent-supervisor")
    for name in ("as-0123456789ab", "old-prefix-fedcba987654", "as-0123456789ab-mcp0",
                 "as-selftest1a2b3c"):
        cgroup(parent / name, "4242\n")
    assert runs_parent.why_foreign("/agent-supervisor", tmp_path,
                                   handed="/agent-supervisor") is None
    # Without the handover naming it (or a watchdog of ours beside it, below) the processes
    # in those cgroups are nobody's runs to adopt.
    why = runs_parent.why_foreign("/agent-supervisor", tmp_path)
    assert why is not None and "4242" in why and "no handover naming it" in why
    with ours(WATCHDOG) as watchdog:
        cgroup(v2 / "agent-supervisor-watchdog", f"{watchdog}\n")
        assert runs_parent.why_foreign("/agent-supervisor", tmp_path) is None


def test_a_marked_parent_is_still_judged_by_name(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The mark says the parent is ours, not that a cgroup put in it since is."""
    v2 = tree(tmp_path)
    parent = cgroup(v2 / "agent-supervisor")
    cgroup(parent / "as-0123456789ab", "4242\n")
    monkeypatch.setattr(runs_parent, "is_marked", lambda *_: True)
    assert runs_parent.why_foreign("/agent-supervisor", tmp_path) is None
    cgroup(parent / "docker")
    why = runs_parent.why_foreign("/agent-supervisor", tmp_path)
    assert why is not None and "docker" in why


WATCHDOG = "supervisor.daemon.watchdog"


@contextlib.contextmanager
def ours(module: str) -> Iterator[int]:
    """A process started as the daemon starts its watchdog or gateway worker (`-m MODULE`
    in its argv); its pid."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "-m",
                             module], stdin=subprocess.DEVNULL)
    try:
        # Popen returns once the exec is under way, before the kernel shows its command line.
        wait_for(lambda: Path(f"/proc/{proc.pid}/cmdline").read_bytes(), timeout=10,
                 what="the command line")
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("suffix", ["-watchdog", "-gateway"])
def test_a_handover_naming_the_parent_vouches_for_its_watchdogs_cgroup_only(
        tmp_path: Path, suffix: str) -> None:
    """What the earlier daemon left in <parent>-watchdog (its watchdog, a stand-in it left to
    end) is its own when a handover names the parent; <parent>-gateway is judged anyway, and
    a handover of another parent vouches for nothing here."""
    v2 = tree(tmp_path)
    cgroup(v2 / f"agent-supervisor{suffix}", f"{os.getpid()}\n")
    handed = runs_parent.why_foreign("/agent-supervisor", tmp_path, handed="/agent-supervisor")
    assert (handed is None) is (suffix == "-watchdog"), handed
    assert runs_parent.why_foreign("/agent-supervisor", tmp_path, handed="/elsewhere")


def test_only_a_parent_made_or_holding_runs_is_marked(tmp_path: Path) -> None:
    v2 = tree(tmp_path)
    assert not runs_parent.exists("/agent-supervisor", tmp_path)
    parent = cgroup(v2 / "agent-supervisor")
    assert runs_parent.exists("/agent-supervisor", tmp_path)
    assert not runs_parent.holds_runs("/agent-supervisor", tmp_path)  # another tool's, maybe
    cgroup(parent / "as-0123456789ab")
    assert runs_parent.holds_runs("/agent-supervisor", tmp_path)


def test_a_parent_holding_processes_is_refused(tmp_path: Path) -> None:
    v2 = tree(tmp_path)
    cgroup(v2 / "shared", "101\n102\n")
    why = runs_parent.why_foreign("/shared", tmp_path)
    assert why is not None
    assert "2 process(es)" in why and "101" in why and "global halt would kill" in why


def test_a_parent_holding_a_foreign_cgroup_is_refused(tmp_path: Path) -> None:
    v2 = tree(tmp_path)
    parent = cgroup(v2 / "shared")
    cgroup(parent / "as-0123456789ab")
    cgroup(parent / "postgres")
    why = runs_parent.why_foreign("/shared", tmp_path)
    assert why is not None and "postgres" in why and "as-0123456789ab" not in why


@pytest.mark.parametrize("name", ["as-0123456789ab-x", "as-0123456789a", "AS-0123456789ab",
                                  "docker", "as-selftest"])
def test_names_that_only_look_like_a_runs_are_foreign(tmp_path: Path, name: str) -> None:
    v2 = tree(tmp_path)
    cgroup(cgroup(v2 / "shared") / name)
    assert runs_parent.why_foreign("/shared", tmp_path) is not None


def test_a_hybrid_hosts_v1_hierarchies_are_judged_too(tmp_path: Path) -> None:
    """The budget is written in the v1 pids and memory hierarchies: a process there, or a
    cgroup there, is as foreign as one in the v2 tree."""
    tree(tmp_path, hybrid=True)
    cgroup(tmp_path / "unified" / "shared")
    cgroup(tmp_path / "pids" / "shared", "77\n")
    why = runs_parent.why_foreign("/shared", tmp_path)
    assert why is not None and str(tmp_path / "pids" / "shared") in why
    (tmp_path / "pids" / "shared" / "cgroup.procs").write_text("")
    cgroup(cgroup(tmp_path / "memory" / "shared") / "java")
    why = runs_parent.why_foreign("/shared", tmp_path)
    assert why is not None and "java" in why


@pytest.fixture
def watchdog_like() -> Iterator[subprocess.Popen[bytes]]:
    """A process whose command line is a watchdog's (`python -m supervisor.daemon.watchdog`)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                             "-m", "supervisor.daemon.watchdog"], stdin=subprocess.DEVNULL)
    # Popen returns once the exec is under way, before the kernel shows its command line.
    wait_for(lambda: Path(f"/proc/{proc.pid}/cmdline").read_bytes(), timeout=10,
             what="the command line")
    yield proc
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("suffix", ["-watchdog", "-gateway"])
def test_a_sibling_holding_a_stranger_is_refused(tmp_path: Path, suffix: str) -> None:
    """The start SIGKILLs what is in <parent>-watchdog (an earlier watchdog) and kills the
    cgroup <parent>-gateway (a stray worker): a process of someone else's there is refused."""
    v2 = tree(tmp_path)
    cgroup(v2 / f"shared{suffix}", f"{os.getpid()}\n")
    why = runs_parent.why_foreign("/shared", tmp_path)
    assert why is not None and f"shared{suffix}" in why and str(os.getpid()) in why


def test_an_earlier_watchdog_beside_the_parent_is_the_supervisors(
        tmp_path: Path, watchdog_like: subprocess.Popen[bytes]) -> None:
    """The watchdog of a daemon that handed its runs over (its window still open), and a
    member of another pid namespace (pid 0), are no strangers."""
    v2 = tree(tmp_path)
    cgroup(v2 / "agent-supervisor")
    cgroup(v2 / "agent-supervisor-watchdog", f"{watchdog_like.pid}\n0\n")
    assert runs_parent.why_foreign("/agent-supervisor", tmp_path) is None
    # The same process in the gateway worker's cgroup is not a worker.
    cgroup(v2 / "agent-supervisor-gateway", f"{watchdog_like.pid}\n")
    assert runs_parent.why_foreign("/agent-supervisor", tmp_path) is not None


def test_a_process_without_a_command_line_is_no_stranger(tmp_path: Path) -> None:
    """A zombie has no command line, nor has a process the daemon just spawned, still inside
    its exec: neither is taken for someone else's (the first cannot be harmed, the second is
    the daemon's own watchdog or worker)."""
    zombie = subprocess.Popen(["true"], stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: Path(f"/proc/{zombie.pid}/stat").read_text().split(") ")[1][0] == "Z",
                 timeout=10, what="the zombie")
        assert Path(f"/proc/{zombie.pid}/cmdline").read_bytes() == b""
        v2 = tree(tmp_path)
        cgroup(v2 / "agent-supervisor-watchdog", f"{zombie.pid}\n")
        assert runs_parent.why_foreign("/agent-supervisor", tmp_path) is None
    finally:
        zombie.wait()


def test_no_cgroup_tree_is_no_refusal_here(tmp_path: Path) -> None:
    """A host without cgroups is refused by the start's own checks, with their message."""
    assert runs_parent.why_foreign("/agent-supervisor", tmp_path) is None
