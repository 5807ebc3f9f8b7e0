"""A drill's credentials_revoked check against a real egress gateway: it passes when kill step 2
revoked the run's token, and fails when step 2 claims a revocation it never made
(tests/support/broken_revocation.py), although step 5 has removed the run's address by then:
the check asks the gateway's own listener for the run (daemon/egress.py `TokenCheck`), not
whether the address still answers. Real daemon, gateway worker and runc; needs root."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_root_and_runc
from tests.support.egress import LLM_ROUTE, GatewayRig, gateway_rig

BROKEN_REVOCATION = Path(__file__).resolve().parents[1] / "support" / "broken_revocation.py"


@pytest.fixture
def rig(tmp_root: Path) -> Iterator[GatewayRig]:
    require_root_and_runc()
    with gateway_rig(tmp_root) as prepared:
        yield prepared


def _drill_with_gateway(rig: GatewayRig, launcher: list[str]) -> tuple[dict[str, Any], int]:
    """Restart the daemon with a gateway profile as its default (a drill's canary runs under
    it, so it holds a token) and `launcher` in front of it; one drill."""
    daemon = rig.daemon
    profile = rig.profile("gw", LLM_ROUTE)
    daemon.stop()
    section = daemon.extra_config.get("daemon")
    daemon.extra_config["daemon"] = {**(section if isinstance(section, dict) else {}),
                                     "default_profile": profile}
    daemon.launcher = launcher
    daemon.start()
    result = daemon.agentctl("drill", "--processes", "3", "--slo", "60s", "--json")
    return json.loads(result.stdout), result.returncode


def test_a_drill_passes_when_the_gateway_refuses_the_killed_runs_token(rig: GatewayRig) -> None:
    drill, code = _drill_with_gateway(rig, [])
    assert drill["checks"]["credentials_revoked"] == "pass", json.dumps(drill, indent=1)
    assert drill["passed"] is True and code == 0, json.dumps(drill, indent=1)


def test_a_drill_fails_when_kill_step_2_did_not_revoke_the_token(rig: GatewayRig) -> None:
    drill, code = _drill_with_gateway(rig, [sys.executable, str(BROKEN_REVOCATION)])
    checks = drill["checks"]
    # The gateway took the token: it refused only the drill's target, as policy.
    assert checks["credentials_revoked"].startswith("fail"), json.dumps(drill, indent=1)
    assert "egress_denied" in checks["credentials_revoked"], checks
    # Everything else held, the run's network included: the address being gone after step 5
    # is not what the check goes by.
    for check in ("kill_confirmed", "no_processes", "no_network", "no_sandbox_state", "slo"):
        assert checks[check] == "pass", json.dumps(drill, indent=1)
    assert drill["passed"] is False and code == 12, json.dumps(drill, indent=1)
