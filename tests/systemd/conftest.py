"""The systemd tier: the service installed by the README's steps in a container that boots
systemd as PID 1 (tests/systemd/machine.py). Needs root, mmdebstrap and dockerd; in CI a
missing requirement fails."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.conftest import require, require_docker, require_root_and_runc
from tests.systemd.machine import WHEELS, WORKDIR, Machine, booted, readme_service_commands

# The container has no network: pip installs from the wheelhouse, and skips compiling
# bytecode (it would only cost time here).
OFFLINE_PIP = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": WHEELS, "PIP_NO_COMPILE": "1"}
OPERATOR = "alice"
OUTSIDER = "bob"
SECRET = "AS_TEST_SECRET"
DROP_IN = "/etc/systemd/system/agent-supervisor.service.d/test.conf"


def require_systemd_tier() -> None:
    require_root_and_runc()
    require(shutil.which("mmdebstrap") is not None,
            "needs mmdebstrap (apt-get install mmdebstrap; scripts/install-deps.sh does)")
    require_docker()


def follow_readme(machine: Machine) -> str:
    """Run the README's service commands, in order, from the checkout's directory; what
    they printed."""
    return "".join(machine.run("bash", "-euo", "pipefail", "-c", f"cd {WORKDIR} && {line}",
                               env=OFFLINE_PIP, timeout=600).stdout
                   for line in readme_service_commands())


@pytest.fixture(scope="module")
def machine() -> Iterator[Machine]:
    """A booted machine with the service installed as the README says, users alice (made
    an operator by the README's own line) and bob (not one)."""
    require_systemd_tier()
    with booted() as machine:
        machine.run("useradd", "--create-home", OPERATOR)
        machine.run("useradd", "--create-home", OUTSIDER)
        # Before the install, so its daemon-reload picks it up: a secret-looking variable in
        # the daemon's environment (it must reach no child), and a shorter watchdog period.
        machine.sh(f"mkdir -p {DROP_IN.rsplit('/', 1)[0]} && cat > {DROP_IN} <<'EOF'\n"
                   f"[Service]\nEnvironment={SECRET}=hunter2\nWatchdogSec=8s\nEOF")
        follow_readme(machine)
        yield machine
