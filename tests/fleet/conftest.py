"""The fleet tier: one etcd (TLS, client certificates, users and roles) and five real daemons,
each in its own network namespace on a bridge made for the session, shared by the tier. Needs
root, runc and etcd; in CI a missing one fails."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import require, require_root_and_runc
from tests.fleet.support import Fleet, fleet_of

# h3, h4, h5 differ in partition policy (test_partition.py); h1, h2 are zone a.
LABELS = [{"zone": "a"}, {"zone": "a"}, {"zone": "b"}, {"zone": "b"}, {"zone": "b"}]
POLICIES = [{}, {}, {"partition_policy": "halt"}, {"partition_policy": "pause"},
            {"partition_policy_by_class": {"risky": "halt"}}]


@pytest.fixture(scope="session")
def fleet() -> Iterator[Fleet]:
    require_root_and_runc()
    require(shutil.which("etcd") is not None, "needs etcd (apt-get install etcd-server)")
    # Sandboxes traverse the daemons' directories: not under pytest's 0700 tmp.
    root = Path(tempfile.mkdtemp(prefix="as-fleet-", dir="/tmp"))
    root.chmod(0o755)
    try:
        with fleet_of(root, 5, LABELS, POLICIES) as running:
            with ThreadPoolExecutor(5) as pool:
                list(pool.map(lambda h: h.start(), running.hosts))
            yield running
    finally:
        # Kept for a post-mortem (daemon logs, state databases) like every other tier's.
        if not (os.environ.get("AGENT_SUPERVISOR_TEST_KEEP") or os.environ.get("AS_FLEET_KEEP")):
            shutil.rmtree(root, ignore_errors=True)
