"""What an embedded CI run imports before it knows it needs it. The runner (`python -I -m
supervisor.ci`) loads the supervisor's core for one run; modules only the daemon's other
surfaces or a gateway run use stay out: pyroute2 (a gateway run's veth only), the gateway's
own process code and aiohttp, the MCP gateway, the audit verifier's process (and cryptography,
loaded only to sign a report), pyprctl, the webhook outbox, metrics, the fleet and the API
server. Checked in a subprocess with a clean interpreter; no privilege."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Each entry: a package or module the runner must not import (or anything below it).
NOT_ON_THE_RUN_PATH = (
    "pyroute2", "aiohttp", "cryptography", "pyprctl", "argparse", "click",
    "supervisor.audit.verifier", "supervisor.egress.worker", "supervisor.egress.gateway",
    "supervisor.mcp.gateway", "supervisor.events", "supervisor.metrics",
    "supervisor.metrics_web", "supervisor.fleet", "supervisor.api", "supervisor.console",
    "supervisor.daemon.main", "supervisor.cli",
)

_PROBE = """
import json, sys
import supervisor.ci.runner
print(json.dumps(sorted(sys.modules)))
"""


def _imported_by_the_runner() -> list[str]:
    result = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                            cwd=REPO, check=True)
    modules: list[str] = json.loads(result.stdout)
    return modules


def test_the_ci_runner_imports_only_what_a_run_uses() -> None:
    modules = _imported_by_the_runner()
    assert "supervisor.daemon.core" in modules  # the probe did import the runner
    unwanted = sorted(m for m in modules for heavy in NOT_ON_THE_RUN_PATH
                      if m == heavy or m.startswith(heavy + "."))
    assert unwanted == []



# agentctl's side of an embedded run, up to the exec into the runner: the fast path reads argv
# (cli/fast.py, cli/embedded.py) and builds the runner's spec without click, pydantic, the API
# client or any of the daemon's code.
NOT_IN_AGENTCTL_BEFORE_THE_EXEC = (
    "click", "pydantic", "pathlib", "asyncio", "typing", "supervisor.cli.main",
    "supervisor.cli.verbs", "supervisor.api", "supervisor.models", "supervisor.daemon",
    "supervisor.ci.runner", "supervisor.ci.spec", "supervisor.config", "supervisor.profiles",
)

_AGENTCTL_PROBE = """
import json, sys
from supervisor.cli import embedded, fast
todo = fast.plan(["run", "--embedded", "--workspace", "/tmp", "--env", "A=1", "--report",
                  "/tmp/r.json", "--", "true"], {})
assert todo is not None and todo.embedded is not None
print(json.dumps(sorted(sys.modules)))
"""


def test_agentctl_reaches_the_runner_without_click_or_pydantic() -> None:
    result = subprocess.run([sys.executable, "-c", _AGENTCTL_PROBE], capture_output=True,
                            text=True, cwd=REPO, check=True)
    modules: list[str] = json.loads(result.stdout)
    assert "supervisor.cli.embedded" in modules
    unwanted = sorted(m for m in modules for heavy in NOT_IN_AGENTCTL_BEFORE_THE_EXEC
                      if m == heavy or m.startswith(heavy + "."))
    assert unwanted == []
