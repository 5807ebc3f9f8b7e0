#!/usr/bin/env bash
# Install what agent-supervisor needs on a Debian 12 host (run as root) and build its venv.
#   scripts/install-deps.sh [VENV]      default VENV: /opt/agent-supervisor/venv
# The venv is made from Debian's /usr/bin/python3 and the package is installed into it (not
# editable), so unprivileged operators can run agentctl wherever this checkout lives.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/apt.sh
source scripts/lib/apt.sh
# shellcheck source=scripts/lib/cli-extras.sh
source scripts/lib/cli-extras.sh
# shellcheck source=scripts/lib/packages.sh
source scripts/lib/packages.sh
VENV="${1:-/opt/agent-supervisor/venv}"

if [[ $EUID -ne 0 ]]; then
    echo "install-deps: run as root (it installs packages and the daemon needs root)" >&2
    exit 1
fi

# The service's and CI mode's packages (scripts/lib/packages.sh), and the test tiers' own:
# docker.io: the engine for the docker runtime (dockerd, containerd and the CLI).
# chromium, chromium-driver: the web console's tests drive a real headless browser.
# etcd-server, etcd-client: the fleet store (tests/fleet start their own etcd; docs/fleet.md).
# mmdebstrap: the systemd tier builds its Debian root with it (tests/systemd/machine.py).
# zsh, fish: the unit tier runs agentctl's completion scripts in each real shell.
# sudo: tests/e2e/test_ci_action.py runs action.yml's step, which goes through sudo as on
# GitHub's runners.
packages=("${SERVICE_PACKAGES[@]}" "${CI_PACKAGES[@]}" tmux stress-ng docker.io chromium
          chromium-driver etcd-server etcd-client mmdebstrap zsh fish sudo)
ensure_packages install-deps "${packages[@]}"
# node and npm: the CI-mode e2e test installs a real agent CLI (Claude Code) from npm. Kept
# when present (a runner image's node 20 brings its own npm); Debian's otherwise.
if ! command -v npm >/dev/null || ! command -v node >/dev/null; then
    echo "install-deps: installing nodejs npm"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi

# promtool: the metrics tests check the daemon's exposition with `promtool check metrics`. Only
# that binary is taken from Debian's prometheus package (19 MB download): installing the package
# would bring a Prometheus server, its service and a dozen JavaScript libraries.
if ! command -v promtool >/dev/null; then
    echo "install-deps: installing promtool from Debian's prometheus package"
    scratch="$(mktemp -d)"
    (cd "$scratch" && chmod 0755 . && apt-get download -qq prometheus 2>/dev/null \
        || { apt-get update -qq && apt-get download -qq prometheus; })
    dpkg-deb --fsys-tarfile "$scratch"/prometheus_*.deb | tar -x -C "$scratch" ./usr/bin/promtool
    install -m 0755 "$scratch/usr/bin/promtool" /usr/local/bin/promtool
    rm -rf "$scratch"
fi

if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
    mkdir -p "$(dirname "$VENV")"
    /usr/bin/python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --disable-pip-version-check --upgrade pip >/dev/null
"$VENV/bin/pip" install -q --disable-pip-version-check ".[dev]"
# Always reinstall this checkout's code (the version number does not change between commits).
"$VENV/bin/pip" install -q --disable-pip-version-check --no-deps --force-reinstall .
# agentctl's launcher over pip's console script: SIGINT blocked until agentctl takes it.
"$VENV/bin/python" -m supervisor.cli.launcher "$VENV"
# agentctl's shell completions and man page (scripts/lib/cli-extras.sh).
install_cli_extras "$VENV/bin/agentctl"
echo "install-deps: $VENV ready ($("$VENV/bin/python" --version), runc $(runc --version | head -1 | awk '{print $3}'))"
