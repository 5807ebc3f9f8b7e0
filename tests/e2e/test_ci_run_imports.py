"""A whole embedded run of `true` (no workspace, no network, no report) imports none of what
only a gateway run, a report or another surface needs (tests/support/ci_imports.py): the
runner's real entry point, run as agentctl execs it, with the spec agentctl's fast path
builds. The unit tier checks the same list for a runner that refuses at once; here the models a
run validates are built (and only those: tests/support/ci_imports.py) and the core runs, as
root, with real runc."""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.ci import DEFAULT_ROOT, ENV_VAR, codecache
from supervisor.cli import fast
from tests.conftest import require_root_and_runc
from tests.support.ci_imports import (
    BUILT_BY_A_PLAIN_RUN,
    codecache_misses,
    models_built,
    runner_modules,
    threads_started,
    unwanted,
)
from tests.support.embedded import agentctl_env, clean_state_root

pytestmark = pytest.mark.e2e


@pytest.fixture
def state_root(tmp_root: Path) -> Iterator[Path]:
    require_root_and_runc()
    with clean_state_root(tmp_root / "ci-state") as root:
        yield root


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
    # Its spec and profile validated, its records made; the configuration (no file: every
    # default) never validated, so none of its models built (buildmode.py).
    assert models_built(done) == sorted(BUILT_BY_A_PLAIN_RUN)
    # The run's processes (runc create, nsenter, runc delete) were waited on through their
    # pidfds on the loop, not by a thread each (3.11's default child watcher: runner.py).
    started = threads_started(done)
    assert "netns-" in " ".join(started)  # the probe saw the run's threads
    assert [name for name in started if name.startswith("waitpid-")] == []


def test_the_runner_compiles_its_imports_code_once_per_host(state_root: Path) -> None:
    """As root the runner's entry point keeps what its imports compile from strings in
    root's cache (ci/codecache.py): a second start compiles nothing and leaves the file as it
    was, root's alone in a directory only root can enter."""
    env = agentctl_env(state_root)  # no spec: each start refuses once its modules are loaded
    first, _ = runner_modules(env, "/")
    assert "invalid_request" in first.stderr
    path = Path(DEFAULT_ROOT) / codecache.DIRECTORY_NAME / codecache.FILE_NAME
    before = path.stat()
    second, modules = runner_modules(env, "/")
    assert "invalid_request" in second.stderr and "supervisor.daemon.core" in modules
    assert codecache_misses(first) is not None and codecache_misses(second) == 0
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert after.st_uid == 0 and stat.S_IMODE(after.st_mode) == 0o600
    assert path.parent.stat().st_uid == 0 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
