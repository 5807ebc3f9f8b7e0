"""Shared fixtures. Privileged and e2e tests need root and runc; in CI (CI=true) a missing
requirement fails the test instead of skipping it, because a privileged test that skips in CI
proves nothing."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.sandbox.cgroups import Cgroup
from tests.support.daemon import (
    SESSION_CGROUP_PARENTS,
    TEST_CGROUP_ROOT,
    TEST_HOST_ROOT_IMAGE,
    Daemon,
    docker_reachable,
    remove_test_images,
    running_daemon,
    runtime_config,
)

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition: bool, reason: str) -> None:
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def require_root_and_runc() -> None:
    require(os.geteuid() == 0, "needs root (real namespaces, cgroups and runc)")
    require(shutil.which("runc") is not None, "needs runc (apt-get install runc)")


def require_gateway() -> None:
    """What a run behind the egress gateway needs: root, runc and nft."""
    require_root_and_runc()
    require(shutil.which("nft") is not None, "needs nft (apt-get install nftables)")


def require_docker() -> None:
    require(docker_reachable(), "needs a running dockerd (apt-get install docker.io; "
            "scripts/test.sh starts one)")


# The core behavioural suites run on both runtimes: pytestmark = BOTH_RUNTIMES.
BOTH_RUNTIMES = pytest.mark.parametrize("runtime", ["runc", "docker"], indirect=True)


@pytest.fixture
def runtime(request: pytest.FixtureRequest) -> str:
    """The runtime of the test's daemon: runc unless the test is parametrised."""
    name: str = getattr(request, "param", "runc")
    if name == "docker":
        require_docker()
    return name


@pytest.fixture
def tmp_root() -> Iterator[Path]:
    """A scratch directory the sandboxes can traverse (tmp_path is 0700)."""
    root = Path(tempfile.mkdtemp(prefix="as-test-", dir="/tmp"))
    root.chmod(0o755)
    yield root
    if not os.environ.get("AGENT_SUPERVISOR_TEST_KEEP"):  # keep daemon logs for a post-mortem
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def daemon(tmp_root: Path, runtime: str) -> Iterator[Daemon]:
    """A real agent-supervisord of the test's own, stopped and checked for leftovers after."""
    with running_daemon(tmp_root, **runtime_config(runtime)) as running:
        yield running


@pytest.fixture(scope="session", autouse=True)
def _remove_test_cgroup_parent() -> Iterator[None]:
    """Each test daemon removes its own cgroup parent; this also catches one a crashed test
    of this session left. rmdir only, and only this session's daemons' parents (then the
    common root if nothing else is in it): the empty cgroup of a run another session's test
    keeps on purpose (an exit while no daemon holds it, which the next daemon must find
    empty, not gone) is never this session's to remove."""
    yield
    if os.geteuid() == 0:
        for parent in sorted(SESSION_CGROUP_PARENTS):
            with contextlib.suppress(OSError, FileNotFoundError):
                Cgroup(parent).remove()
        Cgroup(TEST_CGROUP_ROOT).remove_if_empty()
        remove_test_images([TEST_HOST_ROOT_IMAGE])
