#!/usr/bin/env bash
# Run the whole test suite on a fresh Debian 12 machine, as root:
#   sudo bash scripts/test.sh [pytest args]
# Installs runc, docker.io, iproute2, nftables and the rest, starts dockerd if none runs,
# builds a venv, checks ruff and mypy, runs the unit tier as an unprivileged user (proving it
# needs no root), then the privileged (real kernel) and e2e (real daemon) tiers as root. In CI (CI=true) a privileged or e2e test that
# cannot run fails instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${AGENT_SUPERVISOR_TEST_VENV:-/opt/agent-supervisor-test/venv}"
UNIT_USER="${AGENT_SUPERVISOR_TEST_USER:-nobody}"

bash scripts/install-deps.sh "$VENV"
# The core behavioural suites also run on the docker runtime: they need an engine.
bash scripts/start-dockerd.sh
export PATH="$VENV/bin:$PATH"

echo "== ruff"
ruff check supervisor tests bench
echo "== mypy"
mypy

echo "== unit tier as $UNIT_USER"
# A copy the unprivileged user can read, wherever this checkout lives.
UNIT_TREE="$(mktemp -d /tmp/agent-supervisor-unit.XXXXXX)"
trap 'rm -rf "$UNIT_TREE"' EXIT
# The whole checkout but .git: unit tests read docs (the man page), action.yml, templates.
tar --exclude=./.git -cf - . | tar -C "$UNIT_TREE" -xf -
chmod -R a+rX "$UNIT_TREE"
chown -R "$UNIT_USER" "$UNIT_TREE"
(cd "$UNIT_TREE" && setpriv --reuid="$UNIT_USER" --regid="$(id -g "$UNIT_USER")" \
    --clear-groups --reset-env env PATH="$VENV/bin:/usr/bin:/bin" CI="${CI:-}" \
    HOME="$UNIT_TREE" python -m pytest -W error -p no:cacheprovider -q -rs \
    --basetemp="$UNIT_TREE/.pytest-tmp" tests/unit)

echo "== privileged, e2e and fleet tiers as root"
# python -m puts this checkout first on sys.path; processes started as other users import the
# copy installed into the venv, built from the same tree.
python -m pytest -W error -p no:cacheprovider -ra "$@" tests/privileged tests/e2e tests/fleet

echo "== systemd tier (the service under systemd as PID 1, installed as the README says)"
python -m pytest -W error -p no:cacheprovider -ra "$@" tests/systemd
