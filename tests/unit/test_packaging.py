"""Every package under supervisor/ ships: pyproject lists packages explicitly (the profiles are
mapped in from the top of the repository), so a new subpackage must be added there too."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_every_package_is_listed_in_pyproject() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    found = {".".join(path.parent.relative_to(REPO).parts)
             for path in (REPO / "supervisor").rglob("__init__.py")}
    assert found - listed == set(), "add these to [tool.setuptools] packages"
    assert "supervisor.sandbox_profiles.seccomp" in listed


def test_shipped_profiles_and_seccomp_files_are_package_data() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    data = config["tool"]["setuptools"]["package-data"]
    assert data["supervisor.sandbox_profiles"] == ["*.toml"]
    assert data["supervisor.sandbox_profiles.seccomp"] == ["*.json"]
    assert list((REPO / "sandbox_profiles").glob("*.toml"))
    assert list((REPO / "sandbox_profiles" / "seccomp").glob("*.json"))
