#!/usr/bin/env bash
# Remove agent-supervisor and everything it made (run as root):   bash scripts/uninstall.sh
# Stops the service first (its orderly stop kills every agent, audited), then removes the
# unit, the venv, configuration, state, logs and the agent-operators group, any cgroup,
# network namespace or nftables table a crashed daemon may have left, what CI mode
# (`agentctl run --embedded`) left (its cgroups, state, checkout copies, asciN-* namespaces and
# asciN.* tables), the Docker runtime's containers and host-root image, and the audit
# signing key (with its .pub) and checkpoint file wherever [audit] put them. Copy the audit
# log (/var/lib/agent-supervisor/state.db), its checkpoints (/var/log/agent-supervisor) and
# the public key (/etc/agent-supervisor/audit-key.pub) away first if you must keep them.
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
DEFAULTS="/agent-supervisor as agent-supervisor/host-root:1 /etc/agent-supervisor/audit-key"
DEFAULTS+=" /var/log/agent-supervisor/audit-checkpoints.jsonl /var/lib/agent-supervisor"
DEFAULTS+=" /run/agent-supervisor"
read -r parent prefix image audit_key checkpoints state_dir runtime_dir <<<"$DEFAULTS"
if [[ -x "$VENV/bin/python" ]]; then
    read -r parent prefix image audit_key checkpoints state_dir runtime_dir < <(
        "$VENV/bin/python" - "$CONF" <<'PY' || echo "$DEFAULTS"
import sys
from pathlib import Path
from supervisor.config import load_config
path = Path(sys.argv[1])
config = load_config(path if path.exists() else None)
print(config.sandbox.cgroup_parent, config.sandbox.name_prefix, config.docker.host_root_image,
      config.audit.key, config.audit.checkpoint_file, config.daemon.state_dir,
      config.daemon.runtime_dir)
PY
    )
fi
# CI mode's names (supervisor/ci): fixed, one slot per concurrent embedded run.
CI_CGROUP=/agent-supervisor-ci
# /var/tmp/agent-supervisor-ci: the copy root's default before /var/lib/agent-supervisor-ci.
CI_DIRS=(/run/agent-supervisor-ci /var/lib/agent-supervisor-ci /var/tmp/agent-supervisor-ci)

# remove_tree DIR: unmount whatever is mounted below DIR (a crashed run's workspace bind is
# the user's checkout: never delete through it), deepest first, then delete DIR without
# crossing into another filesystem.
remove_tree() {
    local dir="$1" mount
    [[ -e "$dir" ]] || return 0
    while read -r mount; do
        umount -l "$mount" 2>/dev/null || true
    done < <(awk -v d="$dir" '$5 == d || index($5, d "/") == 1 {print $5}' /proc/self/mountinfo \
             | sort -r)
    rm -rf --one-file-system "$dir"
}

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
# CI mode's cgroups are removed, never killed: a CI job may be running now, and an embedded
# run's own watchdog kills its agent when agentctl dies. Each slot's lock is taken first, so
# no run starts in a slot while it goes.
held=()
for lock in /run/agent-supervisor-ci/locks/slot*; do
    [[ -e "$lock" ]] || continue
    exec {fd}<"$lock"
    if ! flock -n "$fd"; then
        echo "uninstall: an embedded run holds $(basename "$lock"); its leftovers stay" >&2
        exec {fd}<&-
        continue
    fi
    slot="$(basename "$lock")"
    for tree in /sys/fs/cgroup/unified /sys/fs/cgroup /sys/fs/cgroup/*/; do
        top="${tree%/}$CI_CGROUP/$slot"
        for dir in "$top" "$top-gateway" "$top-watchdog"; do
            if [[ -d "$dir" ]]; then
                find "$dir" -depth -type d -exec rmdir {} + 2>/dev/null || true
            fi
        done
    done
    held+=("$fd")
done
for tree in /sys/fs/cgroup/unified /sys/fs/cgroup /sys/fs/cgroup/*/; do
    top="${tree%/}$CI_CGROUP"
    [[ -d "$top" ]] || continue
    rmdir "$top" 2>/dev/null || echo "uninstall: $top still holds a running CI job's cgroups" >&2
done
for ns in /run/netns/"$prefix"-* /run/netns/asci[0-9]*-*; do
    [[ -e "$ns" ]] && ip netns delete "$(basename "$ns")"
done
if command -v nft >/dev/null; then
    nft -j list tables 2>/dev/null | /usr/bin/python3 -c '
import json, sys
import re
names = re.compile(r"^(" + re.escape(sys.argv[1]) + r"|asci[0-9]+)\.")
for item in json.load(sys.stdin).get("nftables", []):
    table = item.get("table")
    if table and names.match(table["name"]):
        print(table["family"], table["name"])' "$prefix" 2>/dev/null |
    while read -r family name; do nft delete table "$family" "$name"; done || true
fi

# The Docker runtime's containers (labelled with the daemon's name prefix) and the host-root
# image it imported; only when an engine answers.
if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
    docker ps -aq --filter "label=io.agent-supervisor.prefix=$prefix" | xargs -r docker rm -f \
        >/dev/null || true
    docker image rm "$image" >/dev/null 2>&1 || true
fi
for dir in "${CI_DIRS[@]}"; do remove_tree "$dir"; done
for fd in "${held[@]}"; do exec {fd}<&-; done  # the lock files went with their directory

[[ "$(readlink /usr/local/bin/agentctl 2>/dev/null)" == "$VENV/bin/agentctl" ]] \
    && rm -f /usr/local/bin/agentctl
remove_cli_extras
rm -f /etc/systemd/system/agent-supervisor.service /etc/sysusers.d/agent-supervisor.conf \
      /etc/tmpfiles.d/agent-supervisor.conf
# The unit's drop-ins are the operator's, but they are this unit's alone and may hold secrets
# (`Environment=` route and webhook secrets, docs/egress.md): removed, each named, so that a
# later install does not pick them up again unseen.
dropins=/etc/systemd/system/agent-supervisor.service.d
if [[ -e "$dropins" ]]; then
    find "$dropins" -mindepth 1 -maxdepth 1 -printf "uninstall: removing the unit's drop-in %p\n" >&2
    rm -rf "$dropins"
fi
systemctl daemon-reload
# The directories install.sh made (none that were there before it), deepest first, if empty.
if [[ -f /opt/agent-supervisor/created-dirs ]]; then
    sort -u /opt/agent-supervisor/created-dirs | awk '{ print length($0) "\t" $0 }' \
        | sort -rn | cut -f2- | while read -r dir; do rmdir "$dir" 2>/dev/null || true; done
fi
for dir in /opt/agent-supervisor /etc/agent-supervisor /var/lib/agent-supervisor \
           /var/log/agent-supervisor /run/agent-supervisor; do
    remove_tree "$dir"
done
# The audit key and checkpoints may lie elsewhere ([audit] key, checkpoint_file): exactly the
# files the daemon makes there, and their directory if that leaves it empty.
for file in "$audit_key" "$audit_key.pub" "$checkpoints" "$checkpoints.tmp"; do
    rm -f "$file"
    rmdir "$(dirname "$file")" 2>/dev/null || true
done
# A state or runtime directory moved elsewhere ([daemon] state_dir, runtime_dir) is named,
# never deleted: it may be a directory the operator shares with other things.
for dir in "$state_dir" "$runtime_dir"; do
    case "$dir" in
        /var/lib/agent-supervisor | /run/agent-supervisor) ;;
        *) [[ -e "$dir" ]] && echo "uninstall: $dir ([daemon] state_dir or runtime_dir) is" \
               "left as it is; remove the daemon's files there yourself" >&2 ;;
    esac
done
getent group agent-operators >/dev/null && groupdel agent-operators
echo "uninstall: done"
