# shellcheck shell=bash
# The Debian packages agent-supervisor runs with: one list for every installer, so that the
# service (scripts/install.sh), CI mode (scripts/install-ci.sh: the GitHub Action and the GitLab
# template), the demo and the test tiers (scripts/install-deps.sh) cannot drift apart.
# tests/unit/test_ci_install.py checks the lists against what the code executes.
#   source scripts/lib/packages.sh        # the arrays below
#   bash scripts/lib/packages.sh KIND     # prints KIND's packages, one a line (runtime, service, ci)

# What every run needs, under the daemon or embedded (agentctl run --embedded):
# runc: the sandbox runtime; tini: every sandbox's PID 1 (its static build, /usr/bin/tini-static,
# bound at /dev/init; supervisor/runtime/init.py); iproute2 and nftables: the egress gateway's
# network (`nft`); python3, python3-venv: the venv; util-linux (`nsenter`, the run's user
# namespace limits), passwd and procps: host tools the install and the daemon call; gosu: the
# docker runtime's drop from root to the agent's uid (its static /usr/sbin/gosu, bound into the
# container; supervisor/runtime/uid_drop.py); busybox-static: a docker gateway run's network gate
# (its static /bin/busybox, bound into the container; supervisor/runtime/network_gate.py).
RUNTIME_PACKAGES=(runc tini iproute2 nftables python3 python3-venv util-linux passwd procps gosu
                  busybox-static)
# The service adds systemd (Type=notify, sysusers.d, tmpfiles.d).
SERVICE_PACKAGES=("${RUNTIME_PACKAGES[@]}" systemd)
# CI mode adds git (the report's provenance and the checkout copy read the repository) and
# ca-certificates (pip and git over https on a bare debian:12 image).
CI_PACKAGES=("${RUNTIME_PACKAGES[@]}" git ca-certificates)

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    case "${1:-}" in
        runtime) printf '%s\n' "${RUNTIME_PACKAGES[@]}" ;;
        service) printf '%s\n' "${SERVICE_PACKAGES[@]}" ;;
        ci) printf '%s\n' "${CI_PACKAGES[@]}" ;;
        *) echo "usage: packages.sh runtime|service|ci" >&2; exit 2 ;;
    esac
fi
