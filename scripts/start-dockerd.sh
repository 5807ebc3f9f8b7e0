#!/usr/bin/env bash
# Make sure a Docker engine answers on /var/run/docker.sock (run as root), for the docker
# runtime and its tests. Uses systemd where it is PID 1; elsewhere (CI containers, build
# hosts) starts dockerd itself in its own session, without a bridge or iptables rules: the
# supervisor runs every container with network "none", and other users' firewalls stay as
# they are. Log: /var/log/agent-supervisor-dockerd.log.
set -euo pipefail

engine_up() { docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

if engine_up; then
    exit 0
fi
if [[ "$(cat /proc/1/comm 2>/dev/null)" == systemd ]]; then
    systemctl start docker
else
    setsid dockerd --iptables=false --ip6tables=false --bridge=none --ip-forward=false \
        --ip-masq=false </dev/null >>/var/log/agent-supervisor-dockerd.log 2>&1 &
fi
for _ in $(seq 600); do
    engine_up && { echo "start-dockerd: engine up ($(docker version --format '{{.Server.Version}}'))"; exit 0; }
    sleep 0.1
done
echo "start-dockerd: dockerd did not answer within 60s; see /var/log/agent-supervisor-dockerd.log" >&2
exit 1
