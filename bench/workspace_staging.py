"""What staging a run's workspace costs at launch and teardown (sandbox/workspace_binds.py): a
plain bind of the workspace path (what the daemon did before) against `stage` + `unstage` of
the pinned workspace alone and with the coding-agent profile's read-only list on a real git
checkout (ancestor binds, placeholders made and removed), in one run, order rotating.

    python bench/workspace_staging.py [--iterations 200] [--json PATH]

Needs root and git. Works in its own temporary directory and removes it. Host side only: the
runtime's own extra bind per staged path inside the container is not counted."""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from stats import cpu_model, nearest_rank

from supervisor.profiles import load_profile
from supervisor.sandbox.libc import libc
from supervisor.sandbox.mounts import MNT_DETACH, MS_BIND, MS_PRIVATE
from supervisor.sandbox.workspace_binds import stage, unstage


def plain_bind(workspace: Path, target: Path) -> None:
    target.mkdir(mode=0o700)
    for source, flags in ((str(workspace).encode(), MS_BIND), (None, MS_PRIVATE)):
        if libc.mount(source, str(target).encode(), None, flags, None) != 0:
            raise OSError(ctypes.get_errno(), "mount")
    if libc.umount2(str(target).encode(), MNT_DETACH) != 0:
        raise OSError(ctypes.get_errno(), "umount")
    target.rmdir()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if os.geteuid() != 0 or shutil.which("git") is None:
        print("needs root and git", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="as-bench-ws-", dir="/tmp"))
    repo = workdir / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    readonly = load_profile("coding-agent", []).workspace.readonly
    fd = os.open(repo, os.O_PATH | os.O_DIRECTORY)
    # The daemon stages under its runtime directory, a tmpfs (/run) on a normal host.
    run_dir = Path(tempfile.mkdtemp(prefix="as-bench-ws-", dir="/run"))
    staging = run_dir / "staging"

    def staged(entries: list[str]) -> Callable[[], None]:
        def once() -> None:
            stage(fd, entries, staging)
            unstage(staging)
        return once

    cases: dict[str, Callable[[], None]] = {
        "plain_bind": lambda: plain_bind(repo, staging),
        "stage_root_only": staged([]),
        "stage_coding_agent": staged(readonly),
    }
    timings: dict[str, list[float]] = {name: [] for name in cases}
    try:
        for index in range(args.iterations):
            names = list(cases)
            names = names[index % len(names):] + names[:index % len(names)]
            for name in names:
                started = time.perf_counter()
                cases[name]()
                timings[name].append((time.perf_counter() - started) * 1000)
    finally:
        os.close(fd)
        shutil.rmtree(workdir, ignore_errors=True)
        run_dir.rmdir()
    result = {
        "iterations": args.iterations, "cpu": cpu_model(), "kernel": platform.release(),
        "readonly_paths": len(readonly),
        "ms": {name: {"p50": round(statistics.median(values), 3),
                      "p95": round(nearest_rank(values, 0.95), 3),
                      "max": round(max(values), 3)} for name, values in timings.items()},
    }
    print(json.dumps(result, indent=1))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
