#!/usr/bin/env bash
# Install agent-supervisor for CI mode (`agentctl run --embedded`, docs/ci.md) on a Debian or
# Ubuntu runner, from this checkout (run as root):   bash scripts/install-ci.sh [VENV]
# The GitHub Action (action.yml) and the GitLab template (ci-templates/) both run it: the
# Debian packages every sandbox needs (scripts/lib/packages.sh, `ci`: runc, tini, nftables,
# iproute2, git, ...) and a venv (default /opt/agent-supervisor/venv) with this checkout's wheel
# and its runtime dependencies only. Never a PyPI package by this project's name.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/apt.sh
source scripts/lib/apt.sh
# shellcheck source=scripts/lib/packages.sh
source scripts/lib/packages.sh
# shellcheck source=scripts/lib/venv.sh
source scripts/lib/venv.sh
VENV="${1:-/opt/agent-supervisor/venv}"

if [[ $EUID -ne 0 ]]; then
    echo "install-ci: run as root (CI mode creates namespaces and cgroups)" >&2
    exit 1
fi
ensure_packages install-ci "${CI_PACKAGES[@]}"
build_runtime_venv "$VENV"
# The embedded runner's code cache (supervisor/ci/codecache.py) filled here, so that the job's
# first run does not compile what its imports generate (~35 ms of its start) nor look for its
# modules one by one (~8 ms): the runner's entry point started without a run loads its modules,
# writes the cache and refuses (status 6).
env -u AGENT_SUPERVISOR_EMBEDDED_RUN "$VENV/bin/python" -I -m supervisor.ci 2>/dev/null \
    || [[ $? -eq 6 ]] || { echo "install-ci: $VENV cannot start the embedded runner" >&2; exit 1; }
echo "install-ci: $("$VENV/bin/agentctl" --version) in $VENV"
