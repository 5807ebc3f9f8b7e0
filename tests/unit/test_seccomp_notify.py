"""The seccomp user-notification constants and syscall table (supervisor/sandbox/seccomp_notify.py)
against the kernel ABI and libseccomp. No privilege (libseccomp is loaded, nothing installed)."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
from dataclasses import replace
from pathlib import Path

import pytest

from supervisor.sandbox import seccomp_notify
from supervisor.sandbox.seccomp_notify import (
    AUDIT_ARCH_I386,
    AUDIT_ARCH_X86_64,
    SECCOMP_IOCTL_NOTIF_RECV,
    SECCOMP_IOCTL_NOTIF_SEND,
    AttemptObservers,
    AttemptTally,
    SeccompListener,
    syscall_name,
    unsupported_reason,
)
from supervisor.telemetry import SyscallAttempt
from tests.conftest import require

PROFILE = Path(__file__).parents[2] / "sandbox_profiles" / "seccomp" / "default.json"


def _iowr(kind: str, nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (ord(kind) << 8) | nr


def _notified_names() -> set[str]:
    rules = json.loads(PROFILE.read_text())["syscalls"]
    return {n for r in rules if r["action"] == "SCMP_ACT_NOTIFY" for n in r["names"]}


def test_structs_and_ioctls_match_the_kernel_abi() -> None:
    # struct seccomp_notif is 80 bytes (8 + 4 + 4 + struct seccomp_data 64) and
    # struct seccomp_notif_resp 24 (8 + 8 + 4 + 4): the sizes are encoded in the ioctl numbers.
    assert seccomp_notify._NOTIF.size == 80
    assert seccomp_notify._RESP.size == 24
    assert _iowr("!", 0, 80) == SECCOMP_IOCTL_NOTIF_RECV == 0xC0502100
    assert _iowr("!", 1, 24) == SECCOMP_IOCTL_NOTIF_SEND == 0xC0182101


def test_every_notified_syscall_has_a_name_on_x86_64() -> None:
    names = {syscall_name(AUDIT_ARCH_X86_64, nr) for nr in seccomp_notify._X86_64.values()}
    assert names == _notified_names() - {"umount"}  # umount is umount2 on x86_64


def test_unknown_numbers_are_reported_by_number() -> None:
    assert syscall_name(AUDIT_ARCH_X86_64, 0) == "nr 0"  # read: never notified
    assert syscall_name(0xC00000B7, 272) == "nr 272"  # aarch64: no table
    assert syscall_name(AUDIT_ARCH_I386, 310) == "unshare"
    assert syscall_name(AUDIT_ARCH_X86_64, 0x40000000 | 521) == "ptrace"  # x32


@pytest.mark.parametrize(("arch", "table"), [
    ("x86_64", seccomp_notify._X86_64),
    ("x86", seccomp_notify._I386),
    ("x32", seccomp_notify._X32),
])
def test_tables_agree_with_libseccomp(arch: str, table: dict[str, int]) -> None:
    path = ctypes.util.find_library("seccomp")
    require(path is not None, "needs libseccomp (apt-get install libseccomp2)")
    assert path is not None
    lib = ctypes.CDLL(path)
    lib.seccomp_arch_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_arch_resolve_name.restype = ctypes.c_uint32
    lib.seccomp_syscall_resolve_name_arch.argtypes = [ctypes.c_uint32, ctypes.c_char_p]
    lib.seccomp_syscall_resolve_name_arch.restype = ctypes.c_int
    token = lib.seccomp_arch_resolve_name(arch.encode())
    resolved = {}
    for name in _notified_names():
        nr = lib.seccomp_syscall_resolve_name_arch(token, name.encode())
        if nr >= 0:  # negative: a pseudo-number, the syscall does not exist on this arch
            resolved[name] = nr & ~0x40000000 if arch == "x32" else nr
    assert table == resolved


@pytest.mark.parametrize(("release", "supported"), [
    ("6.18.44-fc-v657", True), ("5.10.0-28-amd64", True), ("5.8.0", True),
    ("5.6.19", False), ("5.4.0-150-generic", False), ("4.19.0-26-amd64", False),
    ("weird", False),
])
def test_kernel_support(release: str, supported: bool) -> None:
    assert (unsupported_reason(release) is None) is supported


def _attempt(container: str, syscall: str, n: int) -> SyscallAttempt:
    return SyscallAttempt(ts=float(n), container_id=container, pid=n, syscall=syscall,
                          number=272, args=(n,))


def test_a_notify_flood_is_coalesced_into_a_bounded_hand_over() -> None:
    # What the listener's thread leaves for the loop: one record per (container, syscall),
    # however many attempts arrive before the loop flushes.
    listener = SeccompListener(Path("/nonexistent/seccomp.sock"))
    names = ("unshare", "mount", "socket")
    for batch in range(2000):
        listener._count("c1", [_attempt("c1", names[i % 3], batch * 64 + i) for i in range(64)])
    assert len(listener._pending) == 3
    assert sum(r.count for r in listener._pending.values()) == 2000 * 64
    latest = listener._pending[("c1", "socket")]
    assert latest.args == (2000 * 64 - 2,)  # the most recent attempt's details
    # More keys than the cap fold into one overflow record: still bounded, still counted.
    for index in range(seccomp_notify._MAX_PENDING + 500):
        listener._count(f"c{index}", [_attempt(f"c{index}", "mount", index)])
    assert len(listener._pending) <= seccomp_notify._MAX_PENDING + 1
    assert sum(r.count for r in listener._pending.values()) == (
        2000 * 64 + seccomp_notify._MAX_PENDING + 500)
    seen: list[SyscallAttempt] = []
    listener.observers.tripwires = seen.append
    listener._flush()
    assert listener._pending == {} and len(seen) <= seccomp_notify._MAX_PENDING + 1


def test_a_containers_first_attempt_reaches_the_loop_alone() -> None:
    # The loop may flush late (busy with a kill, a read flood): the attempts that came after
    # the first are coalesced, but the first arrives on its own with a count of one, ahead of
    # them, so a syscall_attempts tripwire fires on it (tests/privileged/test_tripwires.py).
    listener = SeccompListener(Path("/nonexistent/seccomp.sock"))
    listener._counts.update({"c1": 0, "c2": 0})  # fds adopted, nothing attempted yet
    listener._count("c1", [_attempt("c1", "unshare", 1), _attempt("c1", "unshare", 2)])
    listener._count("c1", [_attempt("c1", "unshare", 3)])
    listener._count("c2", [_attempt("c2", "mount", 4)])
    listener._count("c2", [_attempt("c2", "mount", 5)])
    seen: list[SyscallAttempt] = []
    listener.observers.tripwires = seen.append
    listener._flush()
    assert [(r.container_id, r.pid, r.count) for r in seen] == [
        ("c1", 1, 1), ("c2", 4, 1), ("c1", 3, 2), ("c2", 5, 1)]
    listener._count("c1", [_attempt("c1", "unshare", 6)])  # only the first goes alone
    listener._flush()
    assert [(r.pid, r.count) for r in seen[4:]] == [(6, 1)]
    assert listener._firsts == [] and listener.attempts_by_container() == {"c1": 4, "c2": 2}


def test_an_observers_tally_stays_bounded_under_a_flood() -> None:
    # Embedded runs keep this, not a list of attempts (1.9 M attempts once took +807 MB).
    tally = AttemptTally(recent=32, containers=4)
    names = ("unshare", "mount", "socket", "bpf")
    for index in range(200_000):
        tally.add(_attempt("run-1", names[index % 4], index))
    assert tally.count("run-1") == 200_000
    assert tally.by_syscall("run-1") == {name: 50_000 for name in names}
    assert tally.size() == 1 + 4 + 32
    assert tally.recent[-1].pid == 199_999
    # Coalesced records count for what they stand for.
    tally.add(replace(_attempt("run-1", "bpf", 0), count=1000))
    assert tally.count("run-1") == 201_000
    # Containers are capped too (oldest forgotten first).
    for index in range(100):
        tally.add(_attempt(f"other-{index}", "mount", index))
    assert tally.size() <= 4 + 4 * 4 + 32


def test_each_named_observer_hears_every_record_and_a_failing_one_stops_none(
        caplog: pytest.LogCaptureFixture) -> None:
    heard: dict[str, list[int]] = {"metrics": [], "ci": []}

    def broken(record: SyscallAttempt) -> None:
        raise RuntimeError("tripwire bug")

    listener = SeccompListener(Path("/nonexistent/seccomp.sock"), AttemptObservers(
        tripwires=broken, metrics=lambda r: heard["metrics"].append(r.pid),
        ci=lambda r: heard["ci"].append(r.pid)))
    listener._counts.update({"c1": 0})
    listener._count("c1", [_attempt("c1", "unshare", 1), _attempt("c1", "unshare", 2)])
    with caplog.at_level("ERROR", logger="supervisor.sandbox.seccomp_notify"):
        listener._flush()
    assert heard == {"metrics": [1, 2], "ci": [1, 2]}
    assert [r.message.split(" (")[0] for r in caplog.records] == [
        "seccomp attempt observer tripwires"] * 2
