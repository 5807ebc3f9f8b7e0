"""The startup self-test: launch a canary through the real runtime and prove that a forbidden
syscall, a network connection, the control socket and host secrets are out of its reach, and
that the kill path empties its cgroup. The daemon refuses to serve when any check fails."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from supervisor.config import Config
from supervisor.profiles import load_profile
from supervisor.runtime.base import RunParams

if TYPE_CHECKING:
    from supervisor.daemon.arbiter import Arbiter

_READY = "canary-ready"


def _script(runtime_dir: Path) -> str:
    # Each check prints PASS or FAIL; a check that cannot run prints SKIP and is not trusted.
    return "\n".join([
        'check() { if eval "$2" >/dev/null 2>&1; then echo "FAIL $1"; else echo "PASS $1"; fi; }',
        "check seccomp-unshare 'unshare -U true'",
        f"check control-socket-visible 'test -e {runtime_dir}'",
        "check network-interface \"grep -vE '^ *(lo|Inter|face)' /proc/net/dev | grep -q .\"",
        "check shadow-readable 'test -s /etc/shadow && cat /etc/shadow'",
        "check usr-writable 'touch /usr/.agent-supervisor-canary'",
        "check root-user 'test \"$(id -u)\" = 0'",
        f"echo {_READY}",
        "exec sleep 600",
    ])


async def run_self_test(arbiter: Arbiter, config: Config, timeout: float = 20.0
                        ) -> dict[str, Any]:
    """The canary on the default runtime and, when docker is enabled besides, on docker too
    (its checks then carry a "docker:" prefix)."""
    report = await _canary(arbiter, config, config.sandbox.runtime, timeout)
    if config.docker_enabled and config.sandbox.runtime != "docker":
        docker = await _canary(arbiter, config, "docker", timeout)
        report["ok"] = report["ok"] and docker["ok"]
        report["checks"].update({f"docker:{k}": v for k, v in docker["checks"].items()})
        if "error" in docker:
            report["error"] = f"docker: {docker['error']}"
        report["duration_ms"] += docker["duration_ms"]
    return report


async def _canary(arbiter: Arbiter, config: Config, runtime: str, timeout: float
                  ) -> dict[str, Any]:
    started = time.perf_counter()
    run_id = f"selftest{secrets.token_hex(3)}"
    container_id = f"{config.sandbox.name_prefix}-{run_id}"
    log_path = config.daemon.runtime_dir / f"{container_id}.log"
    params = RunParams(
        run_id=run_id, agent="selftest", container_id=container_id, netns=container_id,
        cgroup=f"{config.sandbox.cgroup_parent.strip('/')}/{container_id}",
        bundle=config.daemon.runtime_dir / "bundles" / container_id, log_path=log_path,
        profile=load_profile(config.daemon.default_profile, config.daemon.profile_dirs),
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
            verdict, _, name = line.partition(" ")
            if verdict in ("PASS", "FAIL", "SKIP"):
                report["checks"][name] = verdict
        mechanism = handle.kill()
        empty = await handle.wait_empty(config.kill.confirm_timeout)
        handle.teardown_network()
        report["checks"]["kill-confirmed"] = "PASS" if empty else "FAIL"
        report["kill_mechanism"] = mechanism
        report["ok"] = (_READY in output and len(report["checks"]) >= 7
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
        with contextlib.suppress(FileNotFoundError):
            log_path.unlink()
    report["duration_ms"] = round((time.perf_counter() - started) * 1000, 1)
    return report
