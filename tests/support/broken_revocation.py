"""A test seam: agent-supervisord with kill step 2 broken, for tests/e2e/test_drill_credentials.py.
The gateway's revoke (daemon/egress.py `EgressControl.revoke`) records the run's token as revoked
and reports it revoked, but tells the gateway nothing: the claim without the act, which a drill's
credentials_revoked check must catch. Used as `Daemon.launcher` (tests/support/daemon.py), so
the product has no switch for it:

    python tests/support/broken_revocation.py <python> -m supervisor.daemon --config FILE
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from supervisor.daemon import egress


async def _revoke_nothing(self: egress.EgressControl, run_id: str) -> bool:
    state = self.runs.get(run_id)
    if state is None:
        return False
    state.revoked = True
    return True


egress.EgressControl.revoke = _revoke_nothing  # type: ignore[method-assign]
sys.argv = ["agent-supervisord", *sys.argv[sys.argv.index("--config"):]]
runpy.run_module("supervisor.daemon", run_name="__main__", alter_sys=True)
