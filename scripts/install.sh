#!/usr/bin/env bash
# Install agent-supervisor as a systemd service on a Debian 12 host, from this checkout (run as
# root from anywhere):   bash scripts/install.sh
# What it does, in order (README, "Running it as a service"):
#   1. the Debian packages the daemon runs (scripts/lib/packages.sh: runc, tini, iproute2,
#      nftables, python3-venv, ...);
#   2. a wheel built from this checkout, installed with its runtime dependencies only into
#      /opt/agent-supervisor/venv (no test tools, and any an earlier install left there are
#      removed; never a PyPI package by this project's name);
#   3. the unit, sysusers.d and tmpfiles.d files; the commented example configuration as
#      /etc/agent-supervisor/daemon.toml unless one exists (never overwritten);
#   4. the agent-operators group, the directories, and `systemctl enable --now`.
# Offline hosts: point pip at a wheel directory (PIP_NO_INDEX=1 PIP_FIND_LINKS=/path).
# scripts/uninstall.sh undoes all of it.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/apt.sh
source scripts/lib/apt.sh
# shellcheck source=scripts/lib/cli-extras.sh
source scripts/lib/cli-extras.sh
# shellcheck source=scripts/lib/packages.sh
source scripts/lib/packages.sh
# shellcheck source=scripts/lib/venv.sh
source scripts/lib/venv.sh
PREFIX=/opt/agent-supervisor
VENV="$PREFIX/venv"

if [[ $EUID -ne 0 ]]; then
    echo "install: run as root" >&2
    exit 1
fi

# The service's Debian packages (scripts/lib/packages.sh); the test tiers' extra ones are in
# scripts/install-deps.sh.
ensure_packages install "${SERVICE_PACKAGES[@]}"

echo "install: building the wheel and $VENV"
# Runtime dependencies only; anything else an earlier install left in the venv is removed.
build_runtime_venv "$VENV"
# Operators run agentctl by name; it talks to the socket and needs no root.
ln -sfn "$VENV/bin/agentctl" /usr/local/bin/agentctl
# The directories this install is first to make (and their parents it makes with them), for
# uninstall.sh to remove again once empty; a directory that was there before is never listed.
for target in "${CLI_EXTRAS[@]}" "- /etc/sysusers.d/-" "- /etc/tmpfiles.d/-"; do
    read -r _ path <<<"$target"
    dir=$(dirname "$path")
    while [[ ! -e "$dir" ]]; do
        echo "$dir" >>"$PREFIX/created-dirs"
        dir=$(dirname "$dir")
    done
done
# Its shell completions (bash, zsh, fish; agent names from the daemon) and man page.
install_cli_extras "$VENV/bin/agentctl"
install -d -m 0755 "$PREFIX/share/doc"
install -m 0644 docs/runbook.md "$PREFIX/share/doc/runbook.md"

install -D -m 0644 systemd/agent-supervisor.service /etc/systemd/system/agent-supervisor.service
install -D -m 0644 systemd/agent-supervisor.sysusers.conf /etc/sysusers.d/agent-supervisor.conf
install -D -m 0644 systemd/agent-supervisor.tmpfiles.conf /etc/tmpfiles.d/agent-supervisor.conf
systemd-sysusers /etc/sysusers.d/agent-supervisor.conf
systemd-tmpfiles --create /etc/tmpfiles.d/agent-supervisor.conf
if [[ -e /etc/agent-supervisor/daemon.toml ]]; then
    echo "install: keeping the existing /etc/agent-supervisor/daemon.toml"
else
    install -m 0644 systemd/daemon.toml.example /etc/agent-supervisor/daemon.toml
fi
"$VENV/bin/agent-supervisord" --check-config --config /etc/agent-supervisor/daemon.toml >/dev/null

systemctl daemon-reload
installed=$("$VENV/bin/agent-supervisord" --version)
if systemctl is-active --quiet agent-supervisor; then
    # An upgrade: the running daemon keeps the code it started with until it restarts, and
    # `enable --now` does not restart it. Say what runs, and how the new code gets to run.
    pid=$(systemctl show --value --property=MainPID agent-supervisor)
    running=$("$VENV/bin/agentctl" status --json 2>/dev/null | "$VENV/bin/python" -c \
        'import json, sys; print(json.load(sys.stdin)["version"])' 2>/dev/null || echo "unknown")
    systemctl enable agent-supervisor
    echo "install: installed $installed; the running daemon (pid $pid, version $running) still" \
         "runs the code it started with. \`systemctl restart agent-supervisor\` starts the" \
         "installed one and keeps the running agents (handed over and adopted; docs/runbook.md," \
         "\"Restarting or upgrading the daemon\")"
else
    systemctl enable --now agent-supervisor
    echo "install: $installed is $(systemctl is-active agent-supervisor)"
fi
