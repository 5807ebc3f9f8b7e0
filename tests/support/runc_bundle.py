"""A plain bundle of the default profile for tests that drive real runc themselves
(tests/privileged/test_runc_*.py), with its network namespace and cgroup parent made and
removed around the test. Needs root."""

from __future__ import annotations

import contextlib
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

from supervisor.profiles import load_profile, load_seccomp
from supervisor.sandbox import netns
from supervisor.sandbox.bundle import BundleSpec, IdMap, write_bundle
from supervisor.sandbox.cgroups import Cgroup

UID_BASE = 3_100_000_000  # apart from the daemon's, the embedded slots' and the bench's


@contextlib.contextmanager
def runc_bundle(tmp_root: Path, prefix: str, hostname: str,
                containers: tuple[str, ...] = ("",)) -> Iterator[tuple[Path, str]]:
    """(bundle, name) for `sleep 30` as its command; `name` (prefix + a random tag) names its
    network namespace and, with each of `containers` appended, the containers the caller
    creates under `tmp_root / "runc-root"`: all of them are force-deleted afterwards, then the
    namespace and the cgroup parent, whatever the test reached."""
    tag = secrets.token_hex(3)
    name, parent = f"as{prefix}{tag}", f"agent-supervisor-test/{prefix}{tag}"
    netns_path = netns.create(name)
    profile = load_profile("default", [])
    id_map = IdMap(UID_BASE, 1000, UID_BASE + 1000)
    try:
        write_bundle(tmp_root / "bundle", BundleSpec(
            run_id=name, hostname=hostname, command=["sleep", "30"], profile=profile,
            seccomp=load_seccomp(profile.seccomp.profile), uid_map=id_map, gid_map=id_map,
            cgroups_path=f"/{parent}/run", netns_path=str(netns_path), workspace=None))
        yield tmp_root / "bundle", name
    finally:
        for suffix in containers:
            subprocess.run(["runc", "--root", str(tmp_root / "runc-root"), "delete", "--force",
                            f"{name}{suffix}"], capture_output=True, check=False)
        netns.remove(name)
        Cgroup(parent).remove(strict=False)
        Cgroup("agent-supervisor-test").remove_if_empty()
