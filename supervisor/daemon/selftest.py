"""The startup self-test: launch a canary through the real runtime and prove that a forbidden
syscall, a network connection, the control socket and host secrets are out of its reach, that
the compat syscall ABIs and the refused socket families are refused (abi_probe.py) and, where
the daemon has a seccomp listener, counted, that its output reaches the host through a pipe
the supervisor drains and stops being recorded at the run's cap while the agent writes on,
that files it writes are size-limited, and that the kill path empties its cgroup. The daemon
refuses to serve when any check fails."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from supervisor.config import Config
from supervisor.profiles import Profile, load_profile
from supervisor.runtime.base import RunParams
from supervisor.runtime.output_index import index_path
from supervisor.sandbox import abi_probe

if TYPE_CHECKING:
    from supervisor.daemon.arbiter import Arbiter
    from supervisor.sandbox.seccomp_notify import SeccompListener

_READY = "canary-ready"
# The notified attempts the canary makes: `unshare -U` and each refused socket family.
_NOTIFIED = 1 + len(abi_probe.NOTIFIED_CHECKS)
_COUNT_WAIT = 5.0


_PROBE_EOF = "AGENT_SUPERVISOR_ABI_PROBE"
# The canary's output cap, and what it writes past it once its checks are recorded: the drain
# must count every byte, record none past the cap, and never block the writer.
_CANARY_CAP = 64 * 1024
_CANARY_FLOOD = 512 * 1024


def _script(runtime_dir: Path) -> str:
    # Each check prints PASS or FAIL; a check that cannot run prints SKIP and is not trusted.
    return "\n".join([
        'check() { if eval "$2" >/dev/null 2>&1; then echo "FAIL $1"; else echo "PASS $1"; fi; }',
        # fd 3 is the canary's stdout (check's own is /dev/null): a pipe, never the log file.
        "exec 3>&1",
        "check output-is-a-file 'test -f /proc/$$/fd/3'",
        "check output-truncatable 'truncate -s 0 /proc/$$/fd/3'",
        # RLIMIT_FSIZE is set: no single file the agent writes can fill the disk.
        "check file-size-unlimited 'test \"$(ulimit -f)\" = unlimited'",
        "check seccomp-unshare 'unshare -U true'",
        f"check control-socket-visible 'test -e {runtime_dir}'",
        "check network-interface \"grep -vE '^ *(lo|Inter|face)' /proc/net/dev | grep -q .\"",
        "check shadow-readable 'test -s /etc/shadow && cat /etc/shadow'",
        "check usr-writable 'touch /usr/.agent-supervisor-canary'",
        "check root-user 'test \"$(id -u)\" = 0'",
        # The canary runs under the sandbox's init (runtime/init.py), never as PID 1 itself.
        "check agent-is-pid-1 'test $$ = 1 || test \"$(cat /proc/1/comm)\" != init'",
        # The ABI probe prints its own PASS/FAIL lines; without python3 nothing proves them,
        # and the count of checks below fails the self-test.
        f"python3 - <<'{_PROBE_EOF}'",
        abi_probe.PROBE,
        _PROBE_EOF,
        f"echo {_READY}",
        # Past the cap: counted, not recorded, and the writer never blocks (a drain that
        # stopped reading would leave it stuck at a pipe's capacity, short of the flood).
        f"head -c {_CANARY_FLOOD} /dev/zero",
        "exec sleep 600",
    ])


async def run_self_test(arbiter: Arbiter, config: Config, timeout: float = 20.0,
                        seccomp: SeccompListener | None = None) -> dict[str, Any]:
    """The canary on the default runtime and, when docker is enabled besides, on docker too
    (its checks then carry a "docker:" prefix). With `seccomp`, the daemon's listener, a runc
    canary's refused calls must also have reached it (Docker takes no listener)."""
    report = await _canary(arbiter, config, config.sandbox.runtime, timeout, seccomp)
    if config.docker_enabled and config.sandbox.runtime != "docker":
        docker = await _canary(arbiter, config, "docker", timeout, None)
        report["ok"] = report["ok"] and docker["ok"]
        report["checks"].update({f"docker:{k}": v for k, v in docker["checks"].items()})
        if "error" in docker:
            report["error"] = f"docker: {docker['error']}"
        report["duration_ms"] += docker["duration_ms"]
    return report


async def _canary(arbiter: Arbiter, config: Config, runtime: str, timeout: float,
                  seccomp: SeccompListener | None) -> dict[str, Any]:
    started = time.perf_counter()
    run_id = f"selftest{secrets.token_hex(3)}"
    container_id = f"{config.sandbox.name_prefix}-{run_id}"
    log_path = config.daemon.runtime_dir / f"{container_id}.log"
    params = RunParams(
        run_id=run_id, agent="selftest", container_id=container_id, netns=container_id,
        cgroup=f"{config.sandbox.cgroup_parent.strip('/')}/{container_id}",
        bundle=config.daemon.runtime_dir / "bundles" / container_id, log_path=log_path,
        profile=_canary_profile(config),
        command=["/bin/sh", "-c", _script(config.daemon.runtime_dir)],
        uid_slot=config.sandbox.max_runs - 1, runtime=runtime,
    )
    report: dict[str, Any] = {"ok": False, "checks": {}}
    handle = None
    try:
        handle = await arbiter.runtime.launch(params)
        await handle.start()
        deadline = time.monotonic() + timeout
        output = ""
        while _READY not in output and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            with contextlib.suppress(FileNotFoundError):
                output = log_path.read_text()
        for line in output.splitlines():
            verdict, _, rest = line.partition(" ")
            if verdict in ("PASS", "FAIL", "SKIP"):
                name, _, detail = rest.partition(" ")
                report["checks"][name] = verdict
                if verdict != "PASS" and detail:
                    report.setdefault("details", {})[name] = detail
        report["checks"].update(await _output_capped(handle, log_path))
        if seccomp is not None and runtime == "runc":
            # Compat calls are killed, not notified: counted from the kernel's audit records
            # where the host gives them (seccomp_kills.py), and then they must be.
            kills = len(abi_probe.COMPAT_CHECKS) if await asyncio.to_thread(
                seccomp.kills.wait_calibrated) else 0
            counted = await _counted(seccomp, container_id, _NOTIFIED + kills)
            report["checks"]["seccomp-attempts-counted"] = (
                "PASS" if counted >= _NOTIFIED + kills else "FAIL")
            report["seccomp_attempts"] = counted
            if kills:
                killed = seccomp.kills.counted(container_id)
                report["checks"]["seccomp-compat-kills-counted"] = (
                    "PASS" if killed >= kills else "FAIL")
            else:
                report["compat_kills_uncounted"] = seccomp.kills.why_inactive
        mechanism = handle.kill()
        empty = await handle.wait_empty(config.kill.confirm_timeout)
        handle.teardown_network()
        report["checks"]["kill-confirmed"] = "PASS" if empty else "FAIL"
        report["kill_mechanism"] = mechanism
        # 8 base checks, the 3 output checks in the canary and the 2 on the drain, besides
        # the seccomp probe's.
        expected = 13 + len(abi_probe.NOTIFIED_CHECKS) + len(abi_probe.COMPAT_CHECKS)
        report["ok"] = (_READY in output and len(report["checks"]) >= expected
                        and all(v == "PASS" for v in report["checks"].values()))
        if _READY not in output:
            report["error"] = f"canary did not report within {timeout:g}s: {output[-500:]!r}"
    except Exception as exc:
        report["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if handle is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(handle.wait_exit(), 2.0)
            await handle.cleanup()
        # The output recorder's index beside the log too: a start must leave nothing behind
        # (a runtime directory kept across restarts would gather one per start).
        for made in (log_path, index_path(log_path)):
            made.unlink(missing_ok=True)
    report["duration_ms"] = round((time.perf_counter() - started) * 1000, 1)
    return report


def _canary_profile(config: Config) -> Profile:
    profile = load_profile(config.daemon.default_profile, config.daemon.profile_dirs)
    output = profile.output.model_copy(update={"max_bytes": _CANARY_CAP, "action": "alert"})
    return profile.model_copy(update={"output": output})


async def _output_capped(handle: Any, log_path: Path) -> dict[str, str]:
    """The drain's side of the output checks: every byte the canary wrote past its cap was
    counted and none recorded (the log file holds at most the cap and the drain's markers)."""
    deadline = time.monotonic() + _COUNT_WAIT
    counts = handle.output.counts()
    while counts.produced < _CANARY_FLOOD and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
        counts = handle.output.counts()
    try:
        size = log_path.stat().st_size
    except FileNotFoundError:
        size = -1
    return {
        "output-counted-past-cap": "PASS" if counts.produced >= _CANARY_FLOOD else "FAIL",
        # The cap plus the drain's own marker line, never the flood.
        "output-recorded-within-cap": (
            "PASS" if counts.capped and counts.recorded <= _CANARY_CAP
            and 0 <= size <= _CANARY_CAP + 1024 else "FAIL"),
    }


async def _counted(seccomp: SeccompListener, container_id: str, expected: int) -> int:
    """The attempts the listener has counted for the canary, once `expected` arrived or the
    wait ran out (the listener hands counts to the loop in batches)."""
    deadline = time.monotonic() + _COUNT_WAIT
    while True:
        counted = seccomp.attempts_by_container().get(container_id, 0)
        if counted >= expected or time.monotonic() >= deadline:
            return counted
        await asyncio.sleep(0.02)
