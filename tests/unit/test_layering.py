"""The layering of DESIGN.md: each layer imports only the layers below it, agentctl never loads
daemon or kernel code, and the API server reaches the daemon only through its Protocol.
Static (ast) plus one subprocess import; no privilege."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "supervisor"

# Top to bottom; a module may import its own layer and the layers below it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("cli", ("supervisor.cli", "supervisor.console")),
    # CI mode's runner assembles the daemon's core for one run: it sits at the daemon's level.
    ("daemon", ("supervisor.daemon", "supervisor.ci.runner", "supervisor.ci.__main__")),
    ("control plane", ("supervisor.api", "supervisor.audit", "supervisor.authz",
                       "supervisor.events", "supervisor.metrics", "supervisor.metrics_web",
                       "supervisor.ci", "supervisor.fleet")),
    # httpclient: outbound HTTP for the egress gateway and the webhook worker.
    ("enforcement", ("supervisor.runtime", "supervisor.sandbox", "supervisor.egress",
                     "supervisor.mcp", "supervisor.httpclient")),
    ("observation", ("supervisor.telemetry", "supervisor.tripwires")),
    ("model", ("supervisor.models", "supervisor.states", "supervisor.errors",
               "supervisor.config", "supervisor.profiles", "supervisor.openapi",
               "supervisor.sandbox_profiles", "supervisor.limits", "supervisor.buildmode",
               "supervisor")),
]
RANK = {name: rank for rank, (name, _) in enumerate(reversed(LAYERS))}


def layer_of(module: str) -> str:
    for name, prefixes in LAYERS:
        for prefix in prefixes:
            if prefix == "supervisor":
                if module == "supervisor":
                    return name
            elif module == prefix or module.startswith(prefix + "."):
                return name
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS (and DESIGN.md)")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_package(module: str) -> bool:
    return (REPO / Path(*module.split(".")) / "__init__.py").exists()


def supervisor_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import of a supervisor module, including those under
    `if TYPE_CHECKING:` (a type-only import still couples the layers)."""
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                # `from supervisor import daemon` imports the subpackage, not a name.
                candidate = f"{target}.{alias.name}"
                module = candidate if is_package(candidate) or (
                    REPO / Path(*candidate.split("."))).with_suffix(".py").exists() else target
                found.append((node.lineno, module))
    return [(line, m) for line, m in found if m == "supervisor" or m.startswith("supervisor.")]


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_the_package_is_where_expected() -> None:
    assert (PACKAGE / "__init__.py").exists()
    assert len(SOURCES) > 20


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_module_imports_a_higher_layer(path: Path) -> None:
    this = module_name(path)
    own = RANK[layer_of(this)]
    upward = [f"line {line}: {module} ({layer_of(module)})"
              for line, module in supervisor_imports(path) if RANK[layer_of(module)] > own]
    assert upward == [], f"{this} ({layer_of(this)}) imports a higher layer: {upward}"


def test_the_api_server_imports_nothing_from_the_daemon() -> None:
    server = PACKAGE / "api" / "server.py"
    daemon = [(line, m) for line, m in supervisor_imports(server)
              if m == "supervisor.daemon" or m.startswith("supervisor.daemon.")]
    assert daemon == []
    assert "class Controller(Protocol)" in server.read_text(encoding="utf-8")


def test_the_checker_sees_imports() -> None:
    """The static check would catch a violation: the daemon's imports are found."""
    found = {m for _, m in supervisor_imports(PACKAGE / "daemon" / "main.py")}
    assert {"supervisor.api.server", "supervisor.daemon.arbiter", "supervisor.config"} <= found
    assert RANK["cli"] > RANK["daemon"] > RANK["control plane"] > RANK["enforcement"]
    assert RANK["enforcement"] > RANK["model"]


def test_agentctl_never_imports_daemon_code() -> None:
    code = ("import supervisor.cli.main, sys; print(sorted(m for m in sys.modules if "
            "m.startswith(('supervisor.daemon','supervisor.runtime','supervisor.sandbox',"
            "'aiohttp','pyroute2'))))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
