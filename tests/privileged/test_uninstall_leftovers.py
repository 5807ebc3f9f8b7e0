"""scripts/uninstall.sh removes what CI mode (`agentctl run --embedded`) and a crashed daemon
left, and nothing else: a slot's state, checkout copy, cgroups, asciN-* network namespace and
asciN.* nft table go, the project's own `as.*` table too; a slot whose lock a running embedded
run holds keeps its cgroups; a foreign nft table stays; and a user's checkout still bound into
a crashed run's bundle is unmounted, never deleted through.

The script runs for real (bash, ip, nft, flock, mount) in a mount and network namespace of
its own, over a copy-on-write view of /etc, /usr and /var, with fresh /opt, /run and
/sys/fs/cgroup, so it can touch nothing of this host: not the shared cgroup tree (other suites'
daemons live there), nor the operators' group, nor the completions. systemctl is a stub (the
host runs no systemd); the systemd tier runs it under real systemd. Needs root."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SANDBOX = r"""
set -euo pipefail
scratch="$1"; repo="$2"; checkout="$3"
mount --make-rprivate /
for d in etc usr var; do
    mkdir -p "$scratch/$d/upper" "$scratch/$d/work"
    mount -t overlay overlay \
        -o "lowerdir=/$d,upperdir=$scratch/$d/upper,workdir=$scratch/$d/work" "/$d"
done
mount -t tmpfs none /opt
mount -t tmpfs none /run
mount -t tmpfs none /sys/fs/cgroup
mkdir -p /run/bin /run/netns
printf '#!/bin/sh\n[ "$1" = cat ] && exit 1\nexit 0\n' > /run/bin/systemctl
chmod +x /run/bin/systemctl
V2=/sys/fs/cgroup/unified
bundle=/run/agent-supervisor-ci/slot3/bundles/r1/rootfs/workspace
mkdir -p /run/agent-supervisor-ci/locks /var/lib/agent-supervisor-ci/slot3/src \
    /var/tmp/agent-supervisor-ci/slot3/src "$bundle" \
    "$V2/agent-supervisor-ci/slot3/r1" "$V2/agent-supervisor-ci/slot3-watchdog" \
    "$V2/agent-supervisor-ci/slot4/r2" /sys/fs/cgroup/memory/agent-supervisor-ci/slot3/r1
touch /run/agent-supervisor-ci/locks/slot3 /run/agent-supervisor-ci/locks/slot4
mount --bind "$checkout" "$bundle"
ip netns add asci3-r1
nft add table ip asci3.r1
nft add table inet as.r9
nft add table ip someone.else
# A live embedded run in slot 4 holds its lock.
(flock -x 9; exec sleep 600) 9</run/agent-supervisor-ci/locks/slot4 >/dev/null 2>&1 &
holder=$!
for _ in $(seq 50); do
    flock -n /run/agent-supervisor-ci/locks/slot4 true 2>/dev/null || break
    sleep 0.1
done
PATH=/run/bin:$PATH bash "$repo/scripts/uninstall.sh" 2>&1
kill "$holder"
wait "$holder" 2>/dev/null || true
echo "== left"
for path in /run/agent-supervisor-ci /var/lib/agent-supervisor-ci /var/tmp/agent-supervisor-ci \
        "$V2/agent-supervisor-ci/slot3" "$V2/agent-supervisor-ci/slot3-watchdog" \
        /sys/fs/cgroup/memory/agent-supervisor-ci/slot3 "$V2/agent-supervisor-ci/slot4/r2"; do
    [[ -e "$path" ]] && echo "exists $path"
done
ls /run/netns | sed 's/^/netns /'
nft list tables | sed 's/^/nft /'
"""


def test_uninstall_removes_ci_leftovers_and_spares_the_checkout_and_live_runs(
        tmp_path: Path) -> None:
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / "main.py").write_text("keep\n")
    done = subprocess.run(["unshare", "--mount", "--net", "--fork", "bash", "-c", SANDBOX,
                           "sandbox", str(tmp_path / "cow"), str(REPO), str(checkout)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "uninstall: done" in out, out
    assert "an embedded run holds slot4; its leftovers stay" in out, out
    left = out.split("== left\n", 1)[1].splitlines()
    assert left == ["exists /sys/fs/cgroup/unified/agent-supervisor-ci/slot4/r2",
                    "nft table ip someone.else"], out
    assert (checkout / "main.py").read_text() == "keep\n"
