"""The kernel's audit records of seccomp kills, read as attempts: the record's fields, the ABI
a killed call came through, and a run's kills found by its audit session and nobody else's.
No root: records are fed to the reader as the kernel formats them."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.sandbox import seccomp_kills
from supervisor.sandbox.childenv import child_env
from supervisor.sandbox.seccomp_kills import (
    AUDIT_ARCH_I386,
    AUDIT_ARCH_X86_64,
    SeccompKillReader,
    compat_name,
    parse_record,
)
from supervisor.telemetry import SyscallAttempt

# As this kernel wrote them (dmesg), one per ABI.
I386 = (b'audit(1796188629.359:17118): auid=0 uid=34489896 gid=34489896 ses=7 pid=12980 '
        b'comm="python3" exe="/usr/bin/python3.11" sig=31 arch=40000003 syscall=102 compat=1 '
        b'ip=0x41701012 code=0x0')
X32 = (b'audit(1796188629.411:17119): auid=0 uid=34489896 gid=34489896 ses=7 pid=12988 '
       b'comm="a b" exe="/usr/bin/python3.11" sig=31 arch=c000003e syscall=1073741865 '
       b'compat=0 ip=0x7f9db5584829 code=0x0')


def test_records_are_read_field_by_field() -> None:
    fields = parse_record(I386)
    assert fields is not None
    assert (fields["ses"], fields["pid"], fields["sig"]) == ("7", "12980", "31")
    assert (fields["arch"], fields["syscall"], fields["comm"]) == ("40000003", "102", "python3")
    x32 = parse_record(X32)
    assert x32 is not None and x32["comm"] == "a b" and x32["syscall"] == "1073741865"
    assert parse_record(b"not a record") is None
    assert parse_record(b"audit(1.2:3): pid=1") is None  # no session, signal or call


def test_names_say_the_abi() -> None:
    assert compat_name(AUDIT_ARCH_I386, 102) == "i386:socketcall"
    assert compat_name(AUDIT_ARCH_I386, 117) == "i386:ipc"
    assert compat_name(AUDIT_ARCH_X86_64, 0x40000000 | 41) == "x32:socket"
    assert compat_name(AUDIT_ARCH_X86_64, 0x40000000 | 999) == "x32:nr 999"
    assert compat_name(AUDIT_ARCH_I386, 5000) == "i386:nr 5000"


def test_kills_are_the_runs_of_their_session_only() -> None:
    seen: list[tuple[str, SyscallAttempt]] = []
    reader = SeccompKillReader(lambda container, attempt: seen.append((container, attempt)))
    reader.watch(7, "asv-run1")
    for payload in (I386, X32):
        fields = parse_record(payload)
        assert fields is not None
        reader._record(fields)
    other = parse_record(I386.replace(b"ses=7", b"ses=8"))
    logged = parse_record(I386.replace(b"sig=31", b"sig=0"))
    assert other is not None and logged is not None
    reader._record(other)   # another session: another daemon's or the host's
    reader._record(logged)  # logged, not killed
    assert [(c, a.syscall) for c, a in seen] == [("asv-run1", "i386:socketcall"),
                                                 ("asv-run1", "x32:socket")]
    assert reader.counted("asv-run1") == 2
    reader.unwatch("asv-run1")
    reader._record(fields)
    assert len(seen) == 2 and reader.counted("asv-run1") == 0


def test_sessions_held_are_bounded() -> None:
    reader = SeccompKillReader(lambda container, attempt: None)
    for session in range(10_000):
        reader.watch(session + 1, f"c{session}")
    assert len(reader._sessions) <= 4096 and len(reader._counts) <= 4096


def test_the_calibration_child_gets_the_minimal_environment_not_the_daemons(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real child, started as the reader starts it, in place of the one that dies by
    seccomp: it writes the environment it was given."""
    seen = tmp_path / "env.json"
    monkeypatch.setattr(seccomp_kills, "calibration_argv", lambda: [
        sys.executable, "-I", "-S", "-c",
        f"import json, os; open({str(seen)!r}, 'w').write(json.dumps(dict(os.environ)))"])
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("AS_WEBHOOK_SECRET", "hunter2")
    SeccompKillReader(lambda _container, _attempt: None)._calibrate()
    env = json.loads(seen.read_text())
    assert "NOTIFY_SOCKET" not in env and "AS_WEBHOOK_SECRET" not in env
    assert {k: v for k, v in env.items() if k != "LC_CTYPE"} == child_env()


@pytest.mark.parametrize("how", ["perl", "python"])
def test_the_calibration_child_dies_by_seccomp_strict_mode(how: str, tmp_path: Path) -> None:
    """The child the reader starts is killed by the kernel for a syscall strict mode refuses
    (SIGKILL), not ended by itself: perl where it is at hand on a known machine (its prctl
    number right), Python otherwise. No root: strict mode needs no privilege."""
    if how == "perl":
        argv = seccomp_kills.calibration_argv()
        assert argv[0] == seccomp_kills._PERL, argv  # this host has perl and a known machine
    else:
        argv = seccomp_kills.calibration_argv(perl=str(tmp_path / "no-perl"))
        assert argv[:2] == [sys.executable, "-I"], argv
    child = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                           env=child_env(), timeout=30)
    assert child.returncode == -signal.SIGKILL, (child.returncode, child.stderr)


def test_an_unknown_machine_calibrates_with_python() -> None:
    argv = seccomp_kills.calibration_argv(machine="s390x")
    assert argv == [sys.executable, "-I", "-S", "-c", seccomp_kills._CALIBRATION_CHILD]


def test_a_perl_that_exits_instead_of_dying_is_followed_by_the_python_child(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A perl whose syscall() does not reach prctl (built for another ABI than the kernel's
    machine: a 32-bit perl on a 64-bit kernel numbers the calls otherwise) ends by itself, and
    no kill would ever be recorded for it: the reader then starts the Python child, which the
    kernel kills, and waits for that one's record."""
    started = tmp_path / "started"
    perl = tmp_path / "perl"
    perl.write_text(f"#!/bin/sh\necho perl >> {started}\nexit 0\n")
    perl.chmod(0o755)
    monkeypatch.setattr(seccomp_kills, "_PERL", str(perl))
    monkeypatch.setattr(seccomp_kills, "_CALIBRATION_CHILD",
                        f"open({str(started)!r}, 'a').write('python\\n')\n"
                        + seccomp_kills._CALIBRATION_CHILD)
    reader = SeccompKillReader(lambda _container, _attempt: None)
    assert seccomp_kills.calibration_argv()[0] == str(perl)  # this host's machine is known
    statuses: list[int | None] = []
    child = reader._calibration_child
    monkeypatch.setattr(reader, "_calibration_child",
                        lambda argv: statuses.append(child(argv)) or statuses[-1])
    reader._calibrate()
    assert started.read_text().split() == ["perl", "python"]
    assert statuses == [0, -signal.SIGKILL]  # the second, killed by the kernel, is awaited
