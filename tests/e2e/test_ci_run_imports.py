"""A whole embedded run of `true` (no workspace, no network, no report) imports none of what
only a gateway run, a report or another surface needs (tests/support/ci_imports.py): the
runner's real entry point, run as agentctl execs it, with the spec agentctl's fast path
builds. The unit tier checks the same list for a runner that refuses at once; here the models a
run validates are built and the core runs, as root, with real runc."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.ci import ENV_VAR
from supervisor.cli import fast
from tests.conftest import require_root_and_runc
from tests.support.ci_imports import runner_modules, unwanted
from tests.support.embedded import agentctl_env, host_residue

pytestmark = pytest.mark.e2e


@pytest.fixture
def state_root(tmp_root: Path) -> Iterator[Path]:
    require_root_and_runc()
    root = tmp_root / "ci-state"
    yield root
    assert host_residue(root) == {}, "the run left things behind"


def test_a_plain_run_imports_only_what_it_uses(state_root: Path) -> None:
    env = agentctl_env(state_root)
    todo = fast.plan(["run", "--embedded", "--", "sh", "-c", "echo ran-in-the-sandbox"], env)
    assert todo is not None and todo.embedded is not None
    env[ENV_VAR] = json.dumps(todo.embedded)
    done, modules = runner_modules(env, "/")
    assert done.returncode == 0, done.stderr
    assert "ran-in-the-sandbox" in done.stdout  # the agent did run
    assert "supervisor.daemon.core" in modules and "pydantic" in modules
    assert unwanted(modules) == []
