"""The console's read-only fleet view: every host in the etcd fleet store (alive, version,
labels, its agents and their states) and the holds in force, read with the operator's own
fleet credentials (the AGENT_SUPERVISOR_FLEET_* variables `agentctl fleet` uses) through
`agentctl fleet`'s own reader, so the two always agree on the store's layout. Synchronous (the
fleet client is); the console runs it on a thread. No privilege."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from supervisor.cli.fleet import ENV, FleetContext, _hosts
from supervisor.fleet.etcd import Credentials

DEFAULT_PREFIX = "/agent-supervisor/fleet/"
HOSTS_MAX = 1000


class FleetView:
    def __init__(self, creds: Credentials, prefix: str = DEFAULT_PREFIX) -> None:
        self.ctx = FleetContext(creds, prefix)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> FleetView:
        """The fleet view from the operator's AGENT_SUPERVISOR_FLEET_* credentials."""
        password = Path(env[ENV + "PASSWORD_FILE"]).read_text().strip()
        creds = Credentials(
            endpoints=tuple(e.strip() for e in env[ENV + "ENDPOINTS"].split(",") if e.strip()),
            ca_file=Path(env[ENV + "CA"]), cert_file=Path(env[ENV + "CERT"]),
            key_file=Path(env[ENV + "KEY"]), user=env[ENV + "USER"], password=password)
        return cls(creds, env.get(ENV + "PREFIX") or DEFAULT_PREFIX)

    def read(self) -> dict[str, Any]:
        now = time.time()
        hosts = []
        for name, entry in sorted(_hosts(self.ctx).items())[:HOSTS_MAX]:
            reg = entry.get("registration") or {}
            updated = reg.get("updated_at")
            hosts.append({
                "host": name, "alive": bool(entry.get("alive")), "version": reg.get("version"),
                "labels": reg.get("labels", {}), "held": bool(reg.get("fleet_held", False)),
                "updated_s_ago": round(now - updated, 1) if isinstance(updated, int | float)
                else None,
                "agents": [{"name": a.get("name"), "class": a.get("agent_class"),
                            "state": a.get("state")} for a in reg.get("agents", [])]})
        holds, _ = self.ctx.etcd.get_prefix(self.ctx.keys.holds)
        held = []
        for kv in holds:
            try:
                hold = json.loads(kv.value)
            except ValueError:
                continue
            held.append({k: hold.get(k) for k in ("id", "verb", "operator", "reason")})
        return {"hosts": hosts, "holds": held, "error": None}
