"""What the embedded runner's process (`python -I -m supervisor.ci`, ci/__main__.py) imports,
read from the process itself: the probe runs that entry point unchanged (runpy) and prints
`sys.modules` at its os._exit, the one way the runner ends. Used by the unit tier (a runner that
refuses at once: no spec) and the e2e tier (a real run of `true`, as root)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

# Each entry: a package or module the runner must not import (or anything below it) for a
# plain run (no network, no MCP, no --report): what only another surface or a gateway run uses.
NOT_ON_THE_RUN_PATH = (
    "pyroute2", "aiohttp", "cryptography", "pyprctl", "argparse", "click",
    "supervisor.audit.verifier", "supervisor.egress.worker", "supervisor.egress.gateway",
    "supervisor.egress.worker_process", "supervisor.mcp", "supervisor.events",
    "supervisor.metrics", "supervisor.metrics_web", "supervisor.fleet", "supervisor.api",
    "supervisor.console", "supervisor.daemon.main", "supervisor.cli",
    # The control API's own models (list pages, drills, health...): the core never uses them;
    # the views the core makes only on request (an agent's, a held request's, an audit
    # verification's: models/views.py).
    "supervisor.models.api", "supervisor.models.views",
    # pydantic's plugin loader imports it (with email, zipfile, csv); ci/no_plugins.py
    # stands in for that loader.
    "importlib.metadata",
    # A workspace's modules: its manifest and scope guard, provenance, quarantine, the copy of
    # a system user's checkout (a plain run has no workspace).
    "supervisor.ci.manifest", "supervisor.ci.provenance", "supervisor.ci.quarantine",
    "supervisor.ci.checkout_copy",
    # A gateway's policy (routes, budgets, MCP servers...): a profile without a
    # [network.gateway] table never builds those models (models/network.py).
    "supervisor.models.egress", "supervisor.models.mcp", "supervisor.models.credentials",
    # Finding the packaged profiles (profiles.py reads their directory): importlib.resources'
    # readers bring zipfile and tempfile.
    "importlib.resources", "zipfile", "tempfile",
    # TLS: asyncio loads without it (ci/late_tls.py); the egress gateway's is in its process.
    "ssl", "_ssl",
    # The report's signing and summary (--report, --summary, --signing-key); the self-test
    # (--self-test).
    "supervisor.ci.report", "supervisor.daemon.selftest",
    # shutil, with the bz2 and lzma it loads: for nft (a gateway run), a niced runc call (the
    # daemon's cleanup) and trees too large to remove in rounds.
    "shutil", "bz2", "lzma",
    # The audit log's checkpoints: signed only with an audit key, verified on request.
    "supervisor.audit.anchor",
    # OpenSSL's hashes (libcrypto): hashlib and hmac load with CPython's own (ci/__main__.py).
    "_hashlib",
)

# The models the runner builds as it imports (the rest wait for their first use: buildmode.py):
# the kill path's, so no kill waits for one to be built, the records every run makes, and the
# spec it reads first.
BUILT_AT_THE_RUNNERS_START = (
    "supervisor.models.ActionRequest", "supervisor.models.Scope", "supervisor.models._Request",
    "supervisor.models.ActionResult", "supervisor.models.AgentResult",
    "supervisor.models.Actor", "supervisor.models.RunView", "supervisor.models.AuditEntry",
    "supervisor.models.TelemetrySummary", "supervisor.ci.spec.EmbeddedRun",
)
# What a plain run builds besides: its profile (validated from its file, with its policies
# inside it). Not the configuration: without a file it is every default, never validated.
BUILT_BY_A_PLAIN_RUN = (*BUILT_AT_THE_RUNNERS_START, "supervisor.profiles.Profile")

# Loaded when the run's processes are first walked by the telemetry sampler (sampler.py
# load_psutil), which a quick run may or may not reach: never before the run starts.
NOT_AT_THE_RUNNERS_START = (*NOT_ON_THE_RUN_PATH, "psutil")

PROBE = """
import json, os, runpy, sys, threading
_exit = os._exit
_start = threading.Thread.start
_started = []
def _named_start(thread):
    _started.append(thread.name)
    _start(thread)
threading.Thread.start = _named_start
def _built():
    main = sys.modules.get("pydantic.main")
    found, todo = [], list(main.BaseModel.__subclasses__()) if main else []
    while todo:
        model = todo.pop()
        todo += model.__subclasses__()
        if model.__dict__.get("__pydantic_complete__"):
            found.append(f"{model.__module__}.{model.__qualname__}")
    return sorted(set(found))
def _report(code):
    codes = getattr(sys.modules.get("__main__"), "codes", None)
    sys.stdout.write("\\nCODECACHE " + json.dumps(codes and codes.misses + codes.module_misses)
                     + "\\n")
    sys.stdout.write("\\nBUILT " + json.dumps(_built()) + "\\n")
    sys.stdout.write("\\nTHREADS " + json.dumps(_started) + "\\n")
    sys.stdout.write("\\nMODULES " + json.dumps(sorted(sys.modules)) + "\\n")
    sys.stdout.flush()
    _exit(code)
os._exit = _report
runpy.run_module("supervisor.ci", run_name="__main__", alter_sys=True)
"""


def runner_modules(env: Mapping[str, str], cwd: Path | str, timeout: float = 300
                   ) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """(the runner's process as run, the modules it had imported when it left)."""
    done = subprocess.run([sys.executable, "-c", PROBE], env=dict(env), capture_output=True,
                          text=True, cwd=cwd, timeout=timeout, check=False)
    marker = [line for line in done.stdout.splitlines() if line.startswith("MODULES ")]
    assert marker, f"the runner did not leave through os._exit: {done.stderr[-2000:]}"
    modules: list[str] = json.loads(marker[-1].removeprefix("MODULES "))
    return done, modules


def codecache_misses(done: subprocess.CompletedProcess[str]) -> int | None:
    """What the runner compiled, or found and loaded as usual, for want of its code cache
    (ci/codecache.py: strings compiled, modules' bytecode) in a process `runner_modules` ran;
    None: it had no cache (not root)."""
    marker = [line for line in done.stdout.splitlines() if line.startswith("CODECACHE ")]
    assert marker, done.stdout[-2000:]
    misses: int | None = json.loads(marker[-1].removeprefix("CODECACHE "))
    return misses


def models_built(done: subprocess.CompletedProcess[str]) -> list[str]:
    """The pydantic models (module.name) whose validators were built in a process
    `runner_modules` ran, when it left."""
    marker = [line for line in done.stdout.splitlines() if line.startswith("BUILT ")]
    assert marker, done.stdout[-2000:]
    built: list[str] = json.loads(marker[-1].removeprefix("BUILT "))
    return built


def threads_started(done: subprocess.CompletedProcess[str]) -> list[str]:
    """The names of the threads the runner started, in order, in a process `runner_modules`
    ran (threading.Thread.start; asyncio's child watcher and executors start theirs so)."""
    marker = [line for line in done.stdout.splitlines() if line.startswith("THREADS ")]
    assert marker, done.stdout[-2000:]
    names: list[str] = json.loads(marker[-1].removeprefix("THREADS "))
    return names


def unwanted(modules: list[str], forbidden: tuple[str, ...] = NOT_ON_THE_RUN_PATH
             ) -> list[str]:
    return sorted(m for m in modules for heavy in forbidden
                  if m == heavy or m.startswith(heavy + "."))
