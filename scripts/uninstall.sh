#!/usr/bin/env bash
# Remove agent-supervisor and everything it made (run as root):   bash scripts/uninstall.sh
# Stops the service first (its orderly stop kills every agent, audited), then removes the
# unit, the venv, configuration, state, logs and the agent-operators group, and finally any
# cgroup, network namespace or nftables table a crashed daemon may have left. Copy the audit
# log (/var/lib/agent-supervisor/state.db) and checkpoints (/var/log/agent-supervisor) away
# first if you must keep them.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/cli-extras.sh
source scripts/lib/cli-extras.sh
if [[ $EUID -ne 0 ]]; then
    echo "uninstall: run as root" >&2
    exit 1
fi
CONF=/etc/agent-supervisor/daemon.toml
VENV=/opt/agent-supervisor/venv

# Names the daemon used, from its configuration (defaults when there is none).
parent=/agent-supervisor
prefix=as
if [[ -x "$VENV/bin/python" ]]; then
    read -r parent prefix < <("$VENV/bin/python" - "$CONF" <<'PY' || echo "/agent-supervisor as"
import sys
from pathlib import Path
from supervisor.config import load_config
path = Path(sys.argv[1])
config = load_config(path if path.exists() else None)
print(config.sandbox.cgroup_parent, config.sandbox.name_prefix)
PY
)
fi

if systemctl cat agent-supervisor.service >/dev/null 2>&1; then
    systemctl disable --now agent-supervisor.service || true
    systemctl reset-failed agent-supervisor.service 2>/dev/null || true
fi

# Leftovers of a daemon that did not stop in order: agents' cgroups (killed first), the
# gateway worker's and the watchdog's (both live outside the unit's cgroup, so stopping the
# unit does not end them), their network namespaces and nftables tables.
for root in /sys/fs/cgroup/unified /sys/fs/cgroup; do
    for top in "$root$parent" "$root$parent-gateway" "$root$parent-watchdog"; do
        [[ -d "$top" ]] || continue
        [[ -e "$top/cgroup.kill" ]] && echo 1 > "$top/cgroup.kill" 2>/dev/null || true
    done
done
for dir in /sys/fs/cgroup/*/ /sys/fs/cgroup/; do
    for top in "$dir${parent#/}" "$dir${parent#/}-gateway" "$dir${parent#/}-watchdog"; do
        [[ -d "$top" ]] || continue
        # Deepest first; a cgroup directory goes with rmdir once it holds no process.
        for _ in $(seq 50); do
            find "$top" -depth -type d -exec rmdir {} + 2>/dev/null || true
            [[ -d "$top" ]] || break
            sleep 0.1
        done
        [[ -d "$top" ]] && echo "uninstall: $top still holds processes" >&2
    done
done
for ns in /run/netns/"$prefix"-*; do
    [[ -e "$ns" ]] && ip netns delete "$(basename "$ns")"
done
if command -v nft >/dev/null; then
    nft -j list tables 2>/dev/null | "${VENV}/bin/python" -c '
import json, sys
prefix = sys.argv[1] + "."
for item in json.load(sys.stdin).get("nftables", []):
    table = item.get("table")
    if table and table["name"].startswith(prefix):
        print(table["family"], table["name"])' "$prefix" 2>/dev/null |
    while read -r family name; do nft delete table "$family" "$name"; done || true
fi

[[ "$(readlink /usr/local/bin/agentctl 2>/dev/null)" == "$VENV/bin/agentctl" ]] \
    && rm -f /usr/local/bin/agentctl
remove_cli_extras
rm -f /etc/systemd/system/agent-supervisor.service /etc/sysusers.d/agent-supervisor.conf \
      /etc/tmpfiles.d/agent-supervisor.conf
systemctl daemon-reload
rm -rf /opt/agent-supervisor /etc/agent-supervisor /var/lib/agent-supervisor \
       /var/log/agent-supervisor /run/agent-supervisor
getent group agent-operators >/dev/null && groupdel agent-operators
echo "uninstall: done"
