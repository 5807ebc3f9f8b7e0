"""`agentctl run --embedded` for tests: its own state root, and what of its runs is still on the
host (processes, cgroups, network namespaces, nft tables, mounts). Needs root."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import re
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from supervisor.ci import DEFAULT_ROOT
from supervisor.sandbox.cgroups import unified_root
from supervisor.sandbox.libc import libc

CI_CGROUP_ROOT = "agent-supervisor-ci"
WORKSPACE_UID = 1001  # GitHub's runner user; any unprivileged uid outside the sandbox ranges


# The coding-agent profile's model route reads its key from the supervisor's environment.
MODEL_API_KEY = "sk-model-key-not-for-agents"


def agentctl_env(state_root: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "AGENT_SUPERVISOR_CI_ROOT": str(state_root),
            "AGENT_SUPERVISOR_SOCKET": str(state_root / "no-daemon.sock"),
            "MODEL_API_KEY": MODEL_API_KEY, **extra}


def agentctl_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "supervisor.cli", *args]


# agentctl interrupted at a fixed point of its own start, before any exec into the runner: SIGINT
# to itself while it reads argv (the fast path's imports happen there, click's come after), as
# a Ctrl-C would. `python -c INTERRUPTED_AGENTCTL ARGV...`.
INTERRUPTED_AGENTCTL = """
import os, signal, sys
from supervisor.cli import fast
read = fast.plan
def plan(argv, environ):
    os.kill(os.getpid(), signal.SIGINT)
    return read(argv, environ)
fast.plan = plan
sys.argv = ["agentctl", *sys.argv[1:]]
fast.main()
"""

# Earlier still: a Ctrl-C in the interpreter's own start, before any code of agentctl's runs.
# As `sitecustomize` on PYTHONPATH, `site` imports it; with agentctl's launcher (cli/launcher.py)
# the signal waits, blocked, for agentctl's main(). Once, in the process whose environment says
# so (the runner's children, such as its watchdog, inherit PYTHONPATH, not the variable).
SIGINT_IN_SITE = ("import os, signal\nif os.environ.pop('SIGINT_AT_START', None):\n"
                  "    os.kill(os.getpid(), signal.SIGINT)\n")


def launcher_with_hook(directory: Path, hook: str, pip_script: str) -> tuple[Path, dict[str, str]]:
    """agentctl's launcher written over `pip_script` in `directory`, and the environment that
    runs this checkout's agentctl through it with `hook` as its sitecustomize (armed by
    SIGINT_AT_START)."""
    from supervisor.cli.launcher import install

    (directory / "hooks").mkdir(parents=True, exist_ok=True)
    (directory / "hooks" / "sitecustomize.py").write_text(hook)
    script = directory / "agentctl"
    script.write_text(pip_script)
    script.chmod(0o755)
    said = install(directory)
    assert "launcher written" in said, said
    return script, {"PYTHONPATH": f"{directory / 'hooks'}:{Path(__file__).resolve().parents[2]}",
                    "PYTHONDONTWRITEBYTECODE": "1", "SIGINT_AT_START": "1"}


def run_embedded(state_root: Path, *args: str, timeout: float = 300, **env: str
                 ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(agentctl_command("run", "--embedded", *args),
                          env=agentctl_env(state_root, **env), capture_output=True, text=True,
                          timeout=timeout, cwd="/")


# Slot locks held by hold_slot until run_in_slot (or the watched state root's end) releases them.
_held: dict[str, int] = {}


def hold_slot(slot: str) -> None:
    """Take the lock of `slot` (`slotN`) as soon as no run holds it (the runner of a run just
    killed has died) and keep it until `run_in_slot` runs: meanwhile no other process's run
    (another test's) takes the slot and reaps or adds to what the killed run left."""
    fd = _wait_until_free(Path(DEFAULT_ROOT) / "locks" / slot)
    assert fd is not None
    if (old := _held.pop(slot, None)) is not None:
        os.close(old)
    _held[slot] = fd


def run_in_slot(state_root: Path, slot: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The next run of `state_root` in `slot` (`slotN`, its directory left there by a run killed
    before its teardown), which reaps what that run left. A run takes such a slot first when
    it is free (ci/runner.py left_slots): the slot's lock, if `hold_slot` holds it, is released
    just before; when another process's run takes the slot meanwhile, this waits for that run
    to end and runs again (a run that got another slot leaves nothing)."""
    lock = Path(DEFAULT_ROOT) / "locks" / slot
    for _ in range(20):
        fd = _held.pop(slot, None)
        if fd is None:
            fd = _wait_until_free(lock)
        if fd is not None:
            os.close(fd)
        result = run_embedded(state_root, *args)
        if not (state_root / slot).exists():
            return result
    raise AssertionError(f"no run of {state_root} got {slot} in 20 tries")


def _wait_until_free(lock: Path, *, unless_ours: bool = False) -> int | None:
    """A descriptor holding `lock`, once no run holds it (SLOT_WAIT at most). `unless_ours`:
    None at once, nothing taken, while a run of this process's own holds it (a probe while it
    runs)."""
    fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
    deadline = time.monotonic() + SLOT_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            holder = _lock_holder(lock)
            if unless_ours and holder is not None and _descends_from_us(holder):
                os.close(fd)
                return None
            if time.monotonic() >= deadline:
                os.close(fd)
                raise AssertionError(f"{lock} stayed in use by pid {holder} for "
                                     f"{SLOT_WAIT:g} s") from None
            time.sleep(0.01)


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "safe.directory=*", "-C", str(repo), *args],
                          capture_output=True, text=True, check=True).stdout


def chown_tree(root: Path, uid: int) -> None:
    os.lchown(root, uid, uid)
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            os.lchown(os.path.join(dirpath, name), uid, uid)


# inotify(7): a directory made in the watched one, or moved there; the queue overflowed.
IN_CREATE, IN_MOVED_TO, IN_Q_OVERFLOW = 0x100, 0x80, 0x4000
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name
_SLOT_NAME = re.compile(rb"slot([0-9]+)")
# Waited for, at most, while another process's run holds one of the slots a check looks at.
SLOT_WAIT = 300.0


class _SlotWatch:
    """The slots the runs of one state root claim. A run makes its slot's directory there
    (`<state root>/slotN`) before anything else of the slot's (cgroups, netns, mounts,
    tables), and an inotify watch set before the first run sees every one, however short the
    run and whoever removes the directory after. None from `slots`: events were lost (the
    queue overflowed), so which slots were claimed is unknown."""

    def __init__(self, state_root: Path) -> None:
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        if libc.inotify_add_watch(self.fd, os.fsencode(state_root), IN_CREATE | IN_MOVED_TO) < 0:
            os.close(self.fd)
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {state_root}")
        self.seen = {int(m.group(1)) for p in state_root.iterdir()
                     if (m := _SLOT_NAME.fullmatch(os.fsencode(p.name)))}
        self.overflowed = False

    def slots(self) -> set[int] | None:
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                break
            offset = 0
            while offset + _EVENT.size <= len(data):
                _wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                name = data[offset + _EVENT.size: offset + _EVENT.size + length].rstrip(b"\0")
                offset += _EVENT.size + length
                self.overflowed |= bool(mask & IN_Q_OVERFLOW)
                if match := _SLOT_NAME.fullmatch(name):
                    self.seen.add(int(match.group(1)))
        return None if self.overflowed else set(self.seen)


_watches: dict[Path, _SlotWatch] = {}


@contextlib.contextmanager
def watched_state_root(state_root: Path) -> Iterator[Path]:
    """`state_root`, made now (0711, as a run makes it) and watched until the block ends, so
    that `host_residue(state_root)` looks only at what runs of this state root could have left
    (the slots they claimed), not at other tests' runs on the same host."""
    state_root.mkdir(mode=0o711, parents=True, exist_ok=True)
    _watches[state_root] = watch = _SlotWatch(state_root)
    try:
        yield state_root
    finally:
        del _watches[state_root]
        os.close(watch.fd)
        for slot in list(_held):  # a test that failed before its run_in_slot
            os.close(_held.pop(slot))



@contextlib.contextmanager
def clean_state_root(state_root: Path) -> Iterator[Path]:
    """`watched_state_root`, and once the block ends, nothing its runs could have left may
    remain (`host_residue`): a test's state root fixture."""
    with watched_state_root(state_root) as root:
        yield root
        residue = host_residue(root)
    assert residue == {}, f"embedded runs left things behind: {residue}"

def _descends_from_us(pid: int) -> bool:
    while pid > 1:
        if pid == os.getpid():
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, IndexError, ValueError):
            return False
    return False


def _lock_holder(path: Path) -> int | None:
    """The pid that holds the flock on `path` (/proc/locks), None: nobody (or it is gone)."""
    try:
        info = path.stat()
        with open("/proc/locks") as table:
            for line in table:
                fields = line.split()
                if "FLOCK" not in fields or "->" in fields:  # "->": a waiter, not the holder
                    continue
                pid, where = fields[-4], fields[-3]
                if where.rsplit(":", 1)[-1] == str(info.st_ino):
                    return int(pid)
    except (OSError, ValueError):
        return None
    return None


@contextlib.contextmanager
def _quiet_slots(slots: set[int]) -> Iterator[None]:
    """While the block runs no other process's run uses any of `slots`: each one's lock
    (ci/runner.py claim_slot) taken, after waiting (SLOT_WAIT at most) for another process's
    run that holds it to end; a slot held by this process's own run (a probe while it runs)
    is left to it. What is found of a slot then is what its last runs left."""
    held: list[int] = []
    locks = Path(DEFAULT_ROOT) / "locks"
    try:
        for slot in sorted(slots):
            path = locks / f"slot{slot}"
            if path.exists() and (fd := _wait_until_free(path, unless_ours=True)) is not None:
                held.append(fd)
        yield
    finally:
        for fd in held:
            os.close(fd)


def host_residue(state_root: Path) -> dict[str, Any]:
    """What embedded runs left on this host; {} when clean. For a state root watched (made by
    `watched_state_root` before its first run): what the runs of that state root could have
    left, and nothing of other tests' runs: the cgroups, netns, nft tables and processes of the
    slots they claimed, checked while no other process's run uses those slots, and the mounts
    and slot directories under the state root. Otherwise everything of every embedded run on
    the host."""
    with quiet_slots(state_root) as slots:
        return _residue(state_root, slots)


@contextlib.contextmanager
def quiet_slots(state_root: Path) -> Iterator[set[int] | None]:
    """The slots the runs of the watched `state_root` claimed, held (`_quiet_slots`) while the
    block runs; None (nothing held): the state root is not watched, or which slots its runs
    claimed is unknown."""
    watch = _watches.get(state_root)
    slots = watch.slots() if watch is not None else None
    if slots is None:
        yield None
        return
    with _quiet_slots(slots):
        yield slots


def _residue(state_root: Path, slots: set[int] | None) -> dict[str, Any]:
    def ours(name: str, separator: str) -> bool:
        """`name` is a slot's (`slot3`, `slot3-watchdog`; `asci3-<run>`, `asci3.<run>`)."""
        if slots is None:
            return True
        return any(name == f"{prefix}{n}" or name.startswith(f"{prefix}{n}{separator}")
                   for n in slots for prefix in ("slot", "asci"))

    left: dict[str, Any] = {}
    cgroups = unified_root() / CI_CGROUP_ROOT
    if cgroups.is_dir() and (children := sorted(p.name for p in cgroups.iterdir()
                                                if p.is_dir() and ours(p.name, "-"))):
        left["cgroups"] = children
        pids = sorted({pid for child in children
                       for procs in (cgroups / child).rglob("cgroup.procs")
                       for pid in _read_pids(procs)})
        if pids:
            left["processes"] = pids
    netns_dir = Path("/run/netns")
    if netns_dir.is_dir() and (names := sorted(p.name for p in netns_dir.iterdir()
                                               if p.name.startswith("asci")
                                               and ours(p.name, "-"))):
        left["netns"] = names
    with open("/proc/self/mountinfo") as table:
        mounts = [line.split(" ", 5)[4] for line in table if str(state_root) in line]
    if mounts:
        left["mounts"] = mounts
    slot_dirs = sorted(p.name for p in state_root.glob("slot*")) if state_root.is_dir() else []
    if slot_dirs:
        left["state"] = slot_dirs
    nft = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=False)
    if tables := [t for t in nft.stdout.splitlines()
                  if "asci" in t and ours(t.split()[-1], ".")]:
        left["nft_tables"] = tables
    return left


def _read_pids(procs: Path) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(pid) for pid in procs.read_text().split()]
    return []
