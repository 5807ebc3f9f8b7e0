"""`agentctl run --embedded` for tests: its own state root, and what of its runs is still on the
host (processes, cgroups, network namespaces, nft tables, mounts). Needs root."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from supervisor.sandbox.cgroups import unified_root

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


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "safe.directory=*", "-C", str(repo), *args],
                          capture_output=True, text=True, check=True).stdout


def chown_tree(root: Path, uid: int) -> None:
    os.lchown(root, uid, uid)
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            os.lchown(os.path.join(dirpath, name), uid, uid)


def host_residue(state_root: Path) -> dict[str, Any]:
    """Everything embedded runs left on this host; {} when clean."""
    left: dict[str, Any] = {}
    cgroups = unified_root() / CI_CGROUP_ROOT
    if cgroups.is_dir() and (children := sorted(p.name for p in cgroups.iterdir() if p.is_dir())):
        left["cgroups"] = children
    netns_dir = Path("/run/netns")
    if netns_dir.is_dir() and (names := sorted(p.name for p in netns_dir.iterdir()
                                               if p.name.startswith("asci"))):
        left["netns"] = names
    with open("/proc/self/mountinfo") as table:
        mounts = [line.split(" ", 5)[4] for line in table if str(state_root) in line]
    if mounts:
        left["mounts"] = mounts
    slots = sorted(p.name for p in state_root.glob("slot*")) if state_root.is_dir() else []
    if slots:
        left["state"] = slots
    nft = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=False)
    if tables := [t for t in nft.stdout.splitlines() if "asci" in t]:
        left["nft_tables"] = tables
    return left
