"""Every syscall entry point an agent can reach, attacked from inside real sandboxes: i386
`int 0x80` (socketcall and ipc multiplexers, direct socket, unshare), x32, and the socket
families no agent needs (vsock, also with high bits the kernel truncates away; packet; AF_ALG;
netlink other than rtnetlink; socketpair). On every profile (default, strict, coding-agent)
and both runtimes each is refused, and with runc each refused family and each compat call
the kernel killed is counted as an attempt (or trips the profile's escape-attempt kill). The
probe is supervisor/sandbox/abi_probe.py, the one the startup self-test runs. Needs root."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

from supervisor.sandbox.abi_probe import COMPAT_CHECKS, DONE, NOTIFIED_CHECKS, PROBE
from tests.conftest import BOTH_RUNTIMES
from tests.support.daemon import Daemon, wait_for
from tests.support.embedded import run_embedded

PYTHON = "/usr/bin/python3"


def _verdicts(output: str) -> dict[str, tuple[str, dict[str, Any]]]:
    found: dict[str, tuple[str, dict[str, Any]]] = {}
    for line in output.splitlines():
        verdict, _, rest = line.partition(" ")
        if verdict in ("PASS", "FAIL"):
            name, _, detail = rest.partition(" ")
            found[name] = (verdict, json.loads(detail))
    return found


def _assert_compat_refused(verdicts: dict[str, tuple[str, dict[str, Any]]]) -> None:
    for name in COMPAT_CHECKS:
        verdict, detail = verdicts[name]
        # Killed by the kernel at the filter's architecture check: no socket, no namespace.
        assert (verdict, detail) == ("PASS", {"signal": signal.SIGSYS}), (name, detail)


def _assert_families_refused(verdicts: dict[str, tuple[str, dict[str, Any]]]) -> None:
    for name in NOTIFIED_CHECKS:
        verdict, detail = verdicts[name]
        assert verdict == "PASS" and detail["errno"] == 1, (name, detail)  # EPERM, by the filter


def _attempts(daemon: Daemon, name: str) -> int:
    data = daemon.agentctl_json("telemetry", name, "--limit", "1")
    if data["samples"]:
        return int(data["samples"][-1].get("syscall_attempts") or 0)
    return int((data.get("summary") or {}).get("syscall_attempts") or 0)


def _summary(daemon: Daemon, name: str) -> dict[str, Any]:
    data = daemon.agentctl_json("telemetry", name)
    return dict(data.get("summary") or {})


@BOTH_RUNTIMES
def test_default_profile_refuses_every_entry_point_and_counts_the_families(
        daemon: Daemon, runtime: str) -> None:
    result = daemon.agentctl("run", "--name", "abi", "--", PYTHON, "-c", PROBE, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert DONE in result.stdout
    verdicts = _verdicts(result.stdout)
    _assert_compat_refused(verdicts)
    _assert_families_refused(verdicts)
    if runtime == "runc":
        # Each refused family reached the daemon's listener and each compat call the kernel
        # killed reached it through the audit records: one attempt each, no more.
        expected = len(NOTIFIED_CHECKS) + len(COMPAT_CHECKS)
        wait_for(lambda: _summary(daemon, "abi").get("syscall_attempts") == expected,
                 timeout=20, what=f"{expected} attempts in the run's telemetry")
    # The startup self-test ran the same probe in its canary, and counted it.
    [selftest] = [r for r in daemon.client.audit(limit=1000)["entries"]
                  if r["verb"] == "self_test"]
    checks = selftest["detail"]["checks"]
    for name in (*COMPAT_CHECKS, *NOTIFIED_CHECKS):
        assert checks.get(name) == "PASS", (name, checks)
    # And item 2's: output through a drained pipe, counted past its cap but not recorded.
    for name in ("output-is-a-file", "output-truncatable", "file-size-unlimited",
                 "output-counted-past-cap", "output-recorded-within-cap"):
        assert checks.get(name) == "PASS", (name, checks)
    if runtime == "runc":
        assert checks.get("seccomp-attempts-counted") == "PASS", checks
        assert checks.get("seccomp-compat-kills-counted") == "PASS", checks


@BOTH_RUNTIMES
def test_strict_profile_refuses_and_kills_at_the_first_refused_family(
        daemon: Daemon, runtime: str) -> None:
    view = daemon.agentctl_json("run", "--detach", "--name", "strictabi", "--profile", "strict",
                                "--", PYTHON, "-c", PROBE + "\nimport time; time.sleep(600)\n")
    log_path = daemon.root / "state" / "logs" / f"{view['id']}.log"

    def output() -> str:
        return log_path.read_text() if log_path.exists() else ""

    if runtime == "docker":
        # No seccomp notify through the engine: refused, not counted, so nothing trips.
        wait_for(lambda: DONE in output(), timeout=60, what="the probe to finish")
        verdicts = _verdicts(output())
        _assert_compat_refused(verdicts)
        _assert_families_refused(verdicts)
        daemon.agentctl("kill", "strictabi", "--reason", "test over", check=True)
        return
    wait_for(lambda: daemon.client.agent("strictabi")["state"] == "killed", timeout=60,
             what="the escape-attempt tripwire")
    verdicts = _verdicts(output())
    for name in COMPAT_CHECKS:  # those it reached before the kill landed
        if name in verdicts:
            assert verdicts[name] == ("PASS", {"signal": signal.SIGSYS}), name
    for name in NOTIFIED_CHECKS:
        if name in verdicts:
            assert verdicts[name][0] == "PASS" and verdicts[name][1]["errno"] == 1, name
    rows = [r for r in daemon.client.audit(limit=1000)["entries"]
            if r["target"] == "strictabi" and r["verb"] == "tripwire"]
    assert rows and rows[0]["detail"]["rule"] == "escape-attempt", rows
    # The probe's compat calls come first: the first one the kernel killed already counts as
    # an escape attempt, through the kernel's audit record of the kill.
    assert rows[0]["detail"]["syscall"]["name"].startswith(("i386:", "x32:")), rows[0]
    wait_for(lambda: daemon.residue() == {}, what="cleanup")


def test_coding_agent_profile_refuses_and_reports_the_attempt(tmp_root: Path) -> None:
    workspace = tmp_root / "checkout"
    workspace.mkdir()
    os.chown(workspace, 1001, 1001)
    report_path = tmp_root / "report.json"
    result = run_embedded(tmp_root / "ci-state", "--profile", "coding-agent", "--workspace",
                          str(workspace), "--report", str(report_path), "--",
                          PYTHON, "-c", PROBE + "\nimport time; time.sleep(600)\n")
    report = json.loads(report_path.read_text())
    verdicts = _verdicts(result.stdout)
    for name in COMPAT_CHECKS:  # those it reached before the kill landed
        if name in verdicts:
            assert verdicts[name] == ("PASS", {"signal": signal.SIGSYS}), name
    # The first compat call the kernel killed is counted and kills the run (escape-attempt),
    # as in strict.
    assert report["ending"] == "tripwire", (report["ending"], report["end_reason"])
    assert "escape-attempt" in (report["end_reason"] or "")
    assert report["denied_syscalls"]["count"] >= 1
    # Counted from the first compat call the kernel killed (the probe makes those first).
    names = set(report["denied_syscalls"]["by_syscall"])
    assert names and all(n.startswith(("i386:", "x32:")) or n == "socket" for n in names), names
    assert any(n.startswith(("i386:", "x32:")) for n in names), names


# A variant of our own: compat calls from threads of a process that lives on, after the agent
# tried to leave the audit session its kills are attributed by (a new loginuid needs
# CAP_AUDIT_CONTROL on the host).
THREADED = PROBE.split("checks = sys.argv")[0] + r"""
import threading
try:
    fd = os.open("/proc/self/loginuid", os.O_WRONLY)
    os.write(fd, b"4242")  # unbuffered: the kernel's answer is this call's
    print("loginuid-written", flush=True)
except OSError as exc:
    print("loginuid-refused", exc.errno, flush=True)
def attempt():
    x32(41, AF_VSOCK, SOCK_STREAM, 0)
def attempt32():
    int80(117, 23, 0, 4096)
for target in (attempt, attempt32):
    # The kernel ends the thread inside the call, so it never returns and join() would wait
    # for ever: give it time, then go on.
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(2)
print("threads-done", flush=True)
import time; time.sleep(600)
"""


def test_compat_calls_from_threads_are_counted_and_the_session_cannot_be_left(
        daemon: Daemon) -> None:
    view = daemon.agentctl_json("run", "--detach", "--name", "threads", "--",
                                PYTHON, "-c", THREADED)
    log_path = daemon.root / "state" / "logs" / f"{view['id']}.log"
    wait_for(lambda: log_path.exists() and "loginuid-" in log_path.read_text(), timeout=60,
             what="the agent's attempt on its audit session")
    assert "loginuid-refused" in log_path.read_text(), log_path.read_text()
    wait_for(lambda: "threads-done" in log_path.read_text(), timeout=60,
             what="both threads to be killed while the process lives on")
    # Each call the kernel killed is one attempt of the run (the thread died, the process did
    # not, and it is still in the session runc create started).
    wait_for(lambda: _attempts(daemon, "threads") == 2, timeout=20,
             what="2 attempts in the run's telemetry")
    daemon.agentctl("kill", "threads", "--reason", "test over", check=True)
