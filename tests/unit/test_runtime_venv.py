"""The service venv holds runtime dependencies only (issue 13): scripts/lib/prune_venv.py, run by
every runtime install (scripts/lib/venv.sh: install.sh, install-ci.sh, demo.sh), removes what
an earlier `install-deps.sh` (`.[dev]`: pytest, ruff, mypy, ...) left in the venv, and the demo
builds a venv of its own instead of the test tiers' one. Real venvs and real pip; no root, no
network (the distributions are written in place)."""

from __future__ import annotations

import importlib.metadata as metadata
import importlib.util
import subprocess
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ROOT_DIST = "agent-supervisor-killswitch"


def _prune_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("prune_venv",
                                                  ROOT / "scripts/lib/prune_venv.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_dist(site: Path, name: str, *requires: str) -> None:
    """A distribution as pip installs one: its module, METADATA and the RECORD pip uninstalls
    from."""
    module = name.lower().replace("-", "_") + "_mod.py"
    (site / module).write_text("X = 1\n")
    info = site / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    lines = ["Metadata-Version: 2.1", f"Name: {name}", "Version: 1.0",
             *(f"Requires-Dist: {line}" for line in requires)]
    (info / "METADATA").write_text("\n".join(lines) + "\n")
    (info / "INSTALLER").write_text("pip\n")
    record = [f"{module},,", *(f"{info.name}/{f},," for f in ("METADATA", "INSTALLER")),
              f"{info.name}/RECORD,,"]
    (info / "RECORD").write_text("\n".join(record) + "\n")


def populate(site: Path) -> None:
    write_dist(site, ROOT_DIST, "aiohttp>=3", 'pytest>=8; extra == "dev"',
               'tomli; python_version < "3.0"', 'mypy; extra == "dev"')
    write_dist(site, "aiohttp", "Yarl")
    write_dist(site, "yarl")
    write_dist(site, "pytest", "pluggy")  # and its own requirement, which nothing else needs
    write_dist(site, "pluggy")
    write_dist(site, "mypy")
    write_dist(site, "tomli")  # required only under a marker false here


def test_extras_are_what_the_runtime_closure_does_not_reach(tmp_path: Path) -> None:
    populate(tmp_path)
    prune = _prune_module()
    found = prune.extras(ROOT_DIST, metadata.distributions(path=[str(tmp_path)]))
    assert found == ["mypy", "pluggy", "pytest", "tomli"]


def test_a_venv_filled_by_a_dev_install_keeps_its_runtime_dependencies_only(
        tmp_path: Path) -> None:
    target = tmp_path / "venv"
    venv.create(target, with_pip=True, symlinks=True)
    python = target / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig;"
                                "print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    populate(site)
    done = subprocess.run([str(python), str(ROOT / "scripts/lib/prune_venv.py"), ROOT_DIST],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "prune_venv: removing mypy pluggy pytest tomli"
    left = {dist.metadata["Name"] for dist in metadata.distributions(path=[str(site)])}
    assert {ROOT_DIST, "aiohttp", "yarl", "pip"} <= left
    assert not left & {"pytest", "pluggy", "mypy", "tomli"}
    assert not (site / "pytest_mod.py").exists() and (site / "aiohttp_mod.py").exists()
    # Nothing more to remove the second time; a venv without the distribution is refused.
    again = subprocess.run([str(python), str(ROOT / "scripts/lib/prune_venv.py"), ROOT_DIST],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout == ""
    missing = subprocess.run([str(python), str(ROOT / "scripts/lib/prune_venv.py"), "nothere"],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and "nothere is not installed" in missing.stderr


def test_every_runtime_install_builds_its_venv_the_same_way() -> None:
    venv_sh = (ROOT / "scripts/lib/venv.sh").read_text()
    assert "prune_venv.py agent-supervisor-killswitch" in venv_sh
    assert ".[dev]" not in venv_sh
    for script in ("install.sh", "install-ci.sh", "demo.sh"):
        text = (ROOT / "scripts" / script).read_text()
        assert "build_runtime_venv" in text, script
        code = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
        assert not any("install-deps.sh" in line for line in code), script


def test_the_demo_does_not_share_the_service_venv() -> None:
    text = (ROOT / "scripts/demo.sh").read_text()
    assert 'VENV="${AGENT_SUPERVISOR_VENV:-/opt/agent-supervisor/demo-venv}"' in text
