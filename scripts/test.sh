#!/usr/bin/env bash
# Run the whole test suite on a fresh Debian 12 machine, as root:
#   sudo bash scripts/test.sh [pytest args]
# Installs runc, iproute2, nftables and the rest, builds a venv, checks ruff and mypy, then runs
# the unit (no root), privileged (real kernel) and e2e (real daemon) tiers. In CI (CI=true) a
# privileged or e2e test that cannot run fails instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${AGENT_SUPERVISOR_TEST_VENV:-/opt/agent-supervisor-test/venv}"

bash scripts/install-deps.sh "$VENV"
export PATH="$VENV/bin:$PATH"

echo "== ruff"
ruff check supervisor tests bench
echo "== mypy"
mypy
echo "== pytest"
# The tests import this checkout (python -m puts it first on sys.path); processes started as
# unprivileged users import the copy installed into the venv, built from the same tree.
exec python -m pytest -W error -p no:cacheprovider -ra "$@" tests
