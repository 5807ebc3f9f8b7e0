# shellcheck shell=bash
# Sourced by scripts/install.sh, scripts/install-ci.sh and scripts/demo.sh: the venv a service,
# a CI job or the demo runs from, with this checkout's wheel and its runtime dependencies only
# (no pytest, ruff, mypy: those are scripts/install-deps.sh's, for the test tiers).
#   build_runtime_venv VENV
build_runtime_venv() {
    local venv="$1" wheels
    wheels="$(mktemp -d)"
    [[ -x "$venv/bin/python" ]] || { mkdir -p "$(dirname "$venv")"; /usr/bin/python3 -m venv "$venv"; }
    "$venv/bin/pip" wheel -q --disable-pip-version-check --no-deps -w "$wheels" .
    "$venv/bin/pip" install -q --disable-pip-version-check "$wheels"/*.whl
    # An upgrade from the same version number must still replace the code.
    "$venv/bin/pip" install -q --disable-pip-version-check --no-deps --force-reinstall "$wheels"/*.whl
    rm -rf "$wheels"
    # A venv an earlier install-deps.sh or pip filled with more keeps runtime dependencies only.
    "$venv/bin/python" scripts/lib/prune_venv.py agent-supervisor-killswitch
    # agentctl's launcher over pip's console script: SIGINT blocked until agentctl takes it.
    "$venv/bin/python" -m supervisor.cli.launcher "$venv"
}
