"""Remove from a venv every distribution that the named one does not need at run time: a service
venv that an earlier `scripts/install-deps.sh` (the test tiers' `.[dev]`) or a hand-run pip
filled keeps its runtime dependencies only (issue 13). Run with the venv's own python:

    VENV/bin/python scripts/lib/prune_venv.py agent-supervisor-killswitch

Keeps the named distribution, the closure of its requirements without extras (markers evaluated
for this interpreter) and pip itself; `pip uninstall`s the rest and prints their names. Reads
metadata only; standard library and pip's vendored `packaging`."""

from __future__ import annotations

import importlib.metadata as metadata
import re
import subprocess
import sys
from collections.abc import Iterable

# The venv's own tools: kept, whatever the closure says.
KEEP = frozenset({"pip", "setuptools", "wheel"})


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(dist: metadata.Distribution) -> Iterable[str]:
    from pip._vendor.packaging.requirements import Requirement

    for line in dist.requires or []:
        requirement = Requirement(line)
        # No extra is asked for: a requirement behind `extra == "dev"` is false here.
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            yield canonical(requirement.name)


def needed(root: str, installed: dict[str, metadata.Distribution]) -> set[str]:
    """The root and everything it requires, transitively, among the installed distributions."""
    seen: set[str] = set()
    todo = [canonical(root)]
    while todo:
        name = todo.pop()
        if name in seen or name not in installed:
            continue
        seen.add(name)
        todo.extend(_requirements(installed[name]))
    return seen


def extras(root: str, dists: Iterable[metadata.Distribution]) -> list[str]:
    installed = {canonical(dist.metadata["Name"]): dist for dist in dists}
    if canonical(root) not in installed:
        raise SystemExit(f"prune_venv: {root} is not installed in {sys.prefix}")
    keep = needed(root, installed) | KEEP
    return sorted(name for name in installed if name not in keep)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: prune_venv.py DISTRIBUTION", file=sys.stderr)
        return 2
    unneeded = extras(argv[0], metadata.distributions())
    if unneeded:
        print(f"prune_venv: removing {' '.join(unneeded)}")
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y",
                        "--disable-pip-version-check", *unneeded], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
