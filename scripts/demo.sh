#!/usr/bin/env bash
# The demo, on a fresh Debian 12 machine, as root:
#   sudo bash scripts/demo.sh
# Installs what it needs, starts agent-supervisord (its own state under a temp dir), runs a
# sandboxed agent that forks 200 processes, kills it, and prints time_to_halt_ms.
# Its own venv, runtime dependencies only (never the service's, never the test tools).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/apt.sh
source scripts/lib/apt.sh
# shellcheck source=scripts/lib/packages.sh
source scripts/lib/packages.sh
# shellcheck source=scripts/lib/venv.sh
source scripts/lib/venv.sh
VENV="${AGENT_SUPERVISOR_VENV:-/opt/agent-supervisor/demo-venv}"
ensure_packages demo "${RUNTIME_PACKAGES[@]}"
build_runtime_venv "$VENV" >/dev/null
export PATH="$VENV/bin:$PATH"

DEMO="$(mktemp -d /tmp/agent-supervisor-demo.XXXXXX)"
chmod 755 "$DEMO"
export AGENT_SUPERVISOR_SOCKET="$DEMO/run/control.sock"
cat > "$DEMO/daemon.toml" <<TOML
[daemon]
state_dir = "$DEMO/state"
runtime_dir = "$DEMO/run"
[sandbox]
cgroup_parent = "/agent-supervisor-demo"
name_prefix = "asdemo"
TOML

agent-supervisord --config "$DEMO/daemon.toml" 2>"$DEMO/daemon.log" &
DAEMON=$!
cleanup() {
    kill -TERM "$DAEMON" 2>/dev/null && wait "$DAEMON" 2>/dev/null || true
    rmdir /sys/fs/cgroup/unified/agent-supervisor-demo /sys/fs/cgroup/agent-supervisor-demo \
        /sys/fs/cgroup/*/agent-supervisor-demo 2>/dev/null || true
    rm -rf "$DEMO"
}
trap cleanup EXIT
for _ in $(seq 200); do [[ -S "$AGENT_SUPERVISOR_SOCKET" ]] && break; sleep 0.1; done
[[ -S "$AGENT_SUPERVISOR_SOCKET" ]] || { cat "$DEMO/daemon.log"; exit 1; }

echo "== agent-supervisord is up (self-test passed); launching an agent that forks 200 processes"
agentctl run --detach --name demo-agent --class demo -- /bin/sh -c \
    'for i in $(seq 199); do sleep 1000 & done; echo forked; wait'
# The run's cgroup on the v2 tree: /sys/fs/cgroup/unified on hybrid hosts, else /sys/fs/cgroup.
V2=/sys/fs/cgroup; [[ -d $V2/unified ]] && V2=$V2/unified
n=0
for _ in $(seq 100); do
    n=$(cat "$V2"/agent-supervisor-demo/asdemo-*/cgroup.procs 2>/dev/null | wc -l || true)
    (( n >= 200 )) && break
    sleep 0.1
done
echo "== the agent's cgroup holds $n processes"
agentctl ls
echo "== kill"
agentctl kill demo-agent --reason "demo: kill switch"
agentctl inspect demo-agent
echo "== audit"
agentctl audit
agentctl audit verify
