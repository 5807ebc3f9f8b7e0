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


def _probe_then_sleep(*checks: str) -> list[str]:
    """The probe's command, limited to `checks` ("compat", "families"), then a long sleep: an
    agent that is not killed outlives any test."""
    return [PYTHON, "-c", PROBE + "\nimport time; time.sleep(600)\n", *checks]


def _tripped_once(daemon: Daemon, name: str, log_path: Path) -> str:
    """Once `name` is killed by its escape-attempt tripwire, which fired once, with every check
    it reached refused: the syscall that fired it (the first one the daemon heard of)."""
    wait_for(lambda: daemon.client.agent(name)["state"] == "killed", timeout=60,
             what=f"the escape-attempt tripwire on {name}")
    verdicts = _verdicts(log_path.read_text() if log_path.exists() else "")
    for check in COMPAT_CHECKS:  # those it reached before the kill landed
        if check in verdicts:
            assert verdicts[check] == ("PASS", {"signal": signal.SIGSYS}), check
    for check in NOTIFIED_CHECKS:
        if check in verdicts:
            assert verdicts[check][0] == "PASS" and verdicts[check][1]["errno"] == 1, check
    assert all(verdict == "PASS" for verdict, _ in verdicts.values()), verdicts
    rows = [r for r in daemon.client.audit(limit=1000)["entries"]
            if r["target"] == name and r["verb"] == "tripwire"]
    assert len(rows) == 1 and rows[0]["detail"]["rule"] == "escape-attempt", rows
    return str(rows[0]["detail"]["syscall"]["name"])


@BOTH_RUNTIMES
def test_strict_profile_refuses_and_kills_at_the_first_refused_family(
        daemon: Daemon, runtime: str) -> None:
    if runtime == "docker":
        # No seccomp notify through the engine: refused, not counted, so nothing trips.
        view = daemon.agentctl_json("run", "--detach", "--name", "strictabi", "--profile",
                                    "strict", "--", *_probe_then_sleep())
        log_path = daemon.root / "state" / "logs" / f"{view['id']}.log"
        wait_for(lambda: log_path.exists() and DONE in log_path.read_text(), timeout=60,
                 what="the probe to finish")
        verdicts = _verdicts(log_path.read_text())
        _assert_compat_refused(verdicts)
        _assert_families_refused(verdicts)
        daemon.agentctl("kill", "strictabi", "--reason", "test over", check=True)
        return
    # One agent per path, so neither's tripwire row depends on which path told the daemon
    # first. A compat kill reaches the daemon later than the kill itself: the kernel queues
    # the audit record for its kauditd thread, which multicasts it when next scheduled, while
    # the killed child's parent is woken at once. A notified call blocks until the listener
    # answers. So an agent that makes both kinds (the whole probe) can be killed at its first
    # refused family while the records of its compat kills are still on their way.
    logs = {}
    for name, checks in (("strictcompat", "compat"), ("strictfamily", "families")):
        view = daemon.agentctl_json("run", "--detach", "--name", name, "--profile", "strict",
                                    "--", *_probe_then_sleep(checks))
        logs[name] = daemon.root / "state" / "logs" / f"{view['id']}.log"
    fired = {name: _tripped_once(daemon, name, log_path) for name, log_path in logs.items()}
    # The compat agent refused nothing else, so its kill came from a compat call the kernel
    # killed, counted through the kernel's audit record of it. The other one's first refused
    # call is the probe's first family (AF_VSOCK): the interpreter's start-up refused nothing.
    assert fired["strictcompat"].startswith(("i386:", "x32:")), fired
    assert fired["strictfamily"] == "socket", fired
    wait_for(lambda: daemon.residue() == {}, what="cleanup")


def test_coding_agent_profile_refuses_and_reports_the_attempt(tmp_root: Path) -> None:
    workspace = tmp_root / "checkout"
    workspace.mkdir()
    os.chown(workspace, 1001, 1001)
    report_path = tmp_root / "report.json"
    # The compat calls only: the other refused calls are notified, which can reach the daemon
    # before the kernel's audit records of the compat kills do (see the strict test above).
    result = run_embedded(tmp_root / "ci-state", "--profile", "coding-agent", "--workspace",
                          str(workspace), "--report", str(report_path), "--",
                          *_probe_then_sleep("compat"))
    report = json.loads(report_path.read_text())
    verdicts = _verdicts(result.stdout)
    assert all(verdict == "PASS" for verdict, _ in verdicts.values()), verdicts
    for name in COMPAT_CHECKS:  # those it reached before the kill landed
        if name in verdicts:
            assert verdicts[name] == ("PASS", {"signal": signal.SIGSYS}), name
    # The first compat call the kernel killed is counted and kills the run (escape-attempt),
    # as in strict.
    assert report["ending"] == "tripwire", (report["ending"], report["end_reason"])
    assert "escape-attempt" in (report["end_reason"] or "")
    assert report["denied_syscalls"]["count"] >= 1
    # Counted from the compat calls the kernel killed: the agent refused nothing else.
    names = set(report["denied_syscalls"]["by_syscall"])
    assert names and all(n.startswith(("i386:", "x32:")) for n in names), names


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
