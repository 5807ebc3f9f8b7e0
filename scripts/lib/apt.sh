# Sourced by scripts/install.sh and scripts/install-deps.sh: Debian packages installed only when
# missing, so a re-run on a prepared host touches nothing and needs no network.
#   ensure_packages LABEL PACKAGE...
ensure_packages() {
    local label="$1"
    shift
    local pkg missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    if ((${#missing[@]})); then
        echo "$label: apt-get install ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}
