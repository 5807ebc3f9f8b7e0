# shellcheck shell=bash
# agentctl's shell completions (agent and class names complete from the daemon) and its man
# page, installed where Debian's bash-completion, zsh and fish look for them, and removed again.
# Sourced by scripts/install.sh, scripts/install-deps.sh and scripts/uninstall.sh.
CLI_EXTRAS=("bash /usr/share/bash-completion/completions/agentctl"
            "zsh /usr/share/zsh/vendor-completions/_agentctl"
            "fish /usr/share/fish/vendor_completions.d/agentctl.fish"
            "man /usr/share/man/man1/agentctl.1")

# install_cli_extras AGENTCTL: write each completion script as AGENTCTL prints it, and the man
# page from docs/agentctl.1 (generated from the CLI; tests/unit/test_cli_incident.py).
install_cli_extras() {
    local agentctl="$1" target shell path
    for target in "${CLI_EXTRAS[@]}"; do
        read -r shell path <<<"$target"
        if [[ "$shell" == man ]]; then
            install -D -m 0644 docs/agentctl.1 "$path"
            continue
        fi
        mkdir -p "$(dirname "$path")"
        "$agentctl" completion "$shell" >"$path.tmp" && mv "$path.tmp" "$path"
    done
}

remove_cli_extras() {
    local target shell path
    for target in "${CLI_EXTRAS[@]}"; do
        read -r shell path <<<"$target"
        rm -f "$path"
    done
}
