"""The service under real systemd (PID 1 in a container built from Debian packages, see
tests/systemd/machine.py), installed by the README's own commands: start through READY=1,
agentctl for operators, reload, a restart that keeps the agents (one behind the egress
gateway calling an upstream in the machine among them), stop and SIGKILL and a hung
daemon each leave no agent, and uninstall leaves nothing. Needs root, mmdebstrap and dockerd.

The tests share one machine and run in file order: each leaves the service active."""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.support.upstream import make_ca
from tests.systemd.conftest import OPERATOR, OUTSIDER, SECRET, follow_readme
from tests.systemd.machine import SERVICE_CGROUPS, Machine, cgroup_layout

UNIT = "agent-supervisor.service"
AGENTCTL = "agentctl"
# The host's layout (hybrid here, pure v2 on a fresh Debian 12): the machine shares its tree.
LAYOUT = cgroup_layout()
CGROUP_PARENT = LAYOUT.agents("/agent-supervisor")
WATCHDOG_CGROUP = "agent-supervisor-watchdog"


def agent_pids(machine: Machine) -> list[int]:
    """Every process in the agents' cgroups (the daemon's [sandbox] cgroup_parent)."""
    out = machine.sh(f"find {CGROUP_PARENT} -name cgroup.procs -exec cat {{}} + "
                     f"2>/dev/null || true").stdout
    return [int(pid) for pid in out.split()]


def start_agent(machine: Machine, name: str) -> None:
    machine.run(AGENTCTL, "run", "--detach", "--name", name, "--", "sleep", "3600")
    machine.wait_for(f"agent {name} running", lambda: bool(agent_pids(machine)), timeout=60)


def audit_rows(machine: Machine) -> list[dict[str, object]]:
    """Newest first."""
    out = machine.run(AGENTCTL, "audit", "--limit", "500", "--json").stdout
    rows: list[dict[str, object]] = json.loads(out)["entries"]
    return rows[::-1]


def main_pid(machine: Machine) -> int:
    return int(machine.unit("MainPID")["MainPID"])


def wait_active(machine: Machine, timeout: float = 120) -> None:
    machine.wait_for("the unit to be active", lambda: machine.unit("ActiveState")[
        "ActiveState"] == "active", timeout=timeout)


def test_start_reaches_active_through_ready(machine: Machine) -> None:
    state = machine.unit("Type", "NotifyAccess", "ActiveState", "SubState", "StatusText",
                         "WatchdogUSec", "Result")
    assert state["Type"] == "notify"
    assert (state["ActiveState"], state["SubState"]) == ("active", "running"), state
    # Only the READY=1 datagram carries this status: the unit went active through it, after
    # the self-test (which runs agents in runc, nested here) passed.
    assert state["StatusText"].startswith("accepting runs"), state
    assert state["WatchdogUSec"] == "8s"  # the unit has one (the test's drop-in shortens it)
    journal = machine.journal()
    assert "self-test passed" in journal
    # The README's example configuration is in place and is what the daemon runs with.
    config = machine.run("cat", "/etc/agent-supervisor/daemon.toml").stdout
    assert config.startswith("# /etc/agent-supervisor/daemon.toml")


def test_versions_come_from_the_installed_distribution(machine: Machine) -> None:
    version = machine.run("/opt/agent-supervisor/venv/bin/python", "-c",
                          "import importlib.metadata as m;"
                          "print(m.version('agent-supervisor-killswitch'))").stdout.strip()
    assert machine.run(AGENTCTL, "--version").stdout.split() == ["agentctl,", "version",
                                                                  version]
    # The operator's agentctl is agentctl's launcher (supervisor/cli/launcher.py): SIGINT is
    # blocked from its exec until agentctl takes it.
    launcher = machine.run("head", "-1", "/usr/local/bin/agentctl").stdout
    assert launcher == ("#!/usr/bin/env -S --block-signal=INT "
                        "/opt/agent-supervisor/venv/bin/python3\n")
    daemon = machine.run("/opt/agent-supervisor/venv/bin/agent-supervisord", "--version")
    assert daemon.stdout.split() == ["agent-supervisord,", "version", version]
    # The service venv holds runtime dependencies only.
    tools = machine.run("/opt/agent-supervisor/venv/bin/python", "-c",
                        "import importlib.util as u; print([n for n in ('pytest', 'ruff', "
                        "'mypy', 'hypothesis') if u.find_spec(n)])").stdout.strip()
    assert tools == "[]"


def test_operator_uses_agentctl_and_outsider_cannot(machine: Machine) -> None:
    # The group lets alice reach the socket; a role lets her act (README: [roles], reload).
    before = machine.as_user(OPERATOR, AGENTCTL, "status", "--json", check=False)
    assert json.loads(before.stdout)["error"]["code"] == "forbidden"
    machine.sh("cat >> /etc/agent-supervisor/daemon.toml <<'EOF'\n\n[roles]\n"
               "admin = [\"group:agent-operators\"]\nEOF")
    machine.run("systemctl", "reload", UNIT)
    ok = machine.as_user(OPERATOR, AGENTCTL, "status", "--json")
    assert json.loads(ok.stdout)
    machine.as_user(OPERATOR, AGENTCTL, "run", "--name", "alices", "--", "true")
    refused = machine.as_user(OUTSIDER, AGENTCTL, "status", check=False)
    assert refused.returncode != 0
    assert "permission" in (refused.stdout + refused.stderr).lower()


def test_install_puts_completions_and_the_man_page_in_place(machine: Machine) -> None:
    """scripts/install.sh installs agentctl's completions where Debian's shells look for them
    and its man page; bash completes an agent's name for an operator (alice's agent, above)."""
    for path in ("/usr/share/bash-completion/completions/agentctl",
                 "/usr/share/zsh/vendor-completions/_agentctl",
                 "/usr/share/fish/vendor_completions.d/agentctl.fish",
                 "/usr/share/man/man1/agentctl.1"):
        machine.run("test", "-s", path)
    completed = machine.as_user(
        OPERATOR, "bash", "--norc", "-c",
        "source /usr/share/bash-completion/completions/agentctl; "
        "COMP_WORDS=(agentctl inspect ali); COMP_CWORD=2; _agentctl_completion agentctl; "
        "printf '%s\\n' \"${COMPREPLY[@]}\"")
    assert completed.stdout.split() == ["alices"], completed.stderr


def test_no_daemon_environment_reaches_a_sandbox(machine: Machine) -> None:
    out = machine.run(AGENTCTL, "run", "--name", "environ", "--", "cat",
                      "/proc/self/environ").stdout
    names = {item.split("=", 1)[0] for item in out.split("\0") if "=" in item}
    assert "AGENT_SUPERVISOR_RUN" in names  # the output is really the agent's environment
    leaked = names & {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "INVOCATION_ID",
                      "JOURNAL_STREAM", "LISTEN_FDS", "LISTEN_PID", SECRET}
    assert not leaked
    # The daemon itself did have them (the unit's drop-in and systemd's own).
    environ = machine.run("cat", f"/proc/{main_pid(machine)}/environ").stdout
    assert f"{SECRET}=" in environ
    assert "JOURNAL_STREAM=" in environ


def test_reload_applies_a_config_change_and_keeps_agents(machine: Machine) -> None:
    start_agent(machine, "kept-over-reload")
    before = sorted(agent_pids(machine))
    pid = main_pid(machine)
    machine.sh("cat >> /etc/agent-supervisor/daemon.toml <<'EOF'\n\n[drill]\nprocesses = 7\nEOF")
    machine.run("systemctl", "reload", UNIT)
    assert main_pid(machine) == pid
    assert sorted(agent_pids(machine)) == before
    rows = [r for r in audit_rows(machine) if r["verb"] == "config_reload"]
    assert rows and rows[0]["outcome"] == "ok"
    detail = rows[0]["detail"]
    assert isinstance(detail, dict) and "drill" in detail["changed"]
    machine.run(AGENTCTL, "kill", "kept-over-reload", "--reason", "test done")
    machine.wait_for("no agent left", lambda: not agent_pids(machine), timeout=60)


def test_a_bad_reload_fails_says_why_and_keeps_the_running_config(machine: Machine) -> None:
    """`systemctl reload` with a configuration error exits non-zero (ExecReload= is agentctl
    reload, which waits for the daemon's answer), the error is in its output, `systemctl
    status` and the journal, the daemon and its agents go on with the old configuration, and
    the refusal is audited."""
    start_agent(machine, "kept-over-bad-reload")
    before = sorted(agent_pids(machine))
    pid = main_pid(machine)
    good = machine.run("cat", "/etc/agent-supervisor/daemon.toml").stdout
    machine.sh("cat >> /etc/agent-supervisor/daemon.toml <<'EOF'\n\n[telemetry]\n"
               "rate_hz = -3\nEOF")
    try:
        refused = machine.run("systemctl", "reload", UNIT, check=False)
        assert refused.returncode != 0, refused
        status = machine.run("systemctl", "status", "--no-pager", "--lines=50", UNIT,
                             check=False).stdout
        assert "telemetry.rate_hz" in status, status
        assert "telemetry.rate_hz" in machine.journal()
    finally:
        put(machine, "/etc/agent-supervisor/daemon.toml", good)
    state = machine.unit("ActiveState", "SubState")
    assert (state["ActiveState"], state["SubState"]) == ("active", "running"), state
    assert main_pid(machine) == pid and sorted(agent_pids(machine)) == before
    rows = [r for r in audit_rows(machine) if r["verb"] == "config_reload"]
    assert rows[0]["outcome"].startswith("refused"), rows[0]
    assert "telemetry.rate_hz" in json.dumps(rows[0]["detail"])
    machine.run("systemctl", "reload", UNIT)  # the good file again: applies
    machine.run(AGENTCTL, "kill", "kept-over-bad-reload", "--reason", "test done")
    machine.wait_for("no agent left", lambda: not agent_pids(machine), timeout=60)


def test_reload_reaches_a_configured_socket_path(machine: Machine) -> None:
    """With [daemon] socket_path set, `systemctl reload` (ExecReload= is the daemon's own
    --reload, which reads the same configuration) reaches the daemon on that socket, and
    agentctl does with --socket; before, ExecReload= asked the default socket and failed."""
    good = machine.run("cat", "/etc/agent-supervisor/daemon.toml").stdout
    ctl = "/run/agent-supervisor/ctl.sock"
    header = re.compile(r"^\[daemon\][ \t]*$", re.M)  # a table, not the example's comment
    put(machine, "/etc/agent-supervisor/daemon.toml",
        header.sub(f'[daemon]\nsocket_path = "{ctl}"', good, count=1)
        if header.search(good) else f'{good}\n[daemon]\nsocket_path = "{ctl}"\n')
    try:
        machine.run("systemctl", "restart", UNIT, timeout=180)
        wait_active(machine)
        machine.run("test", "-S", ctl)
        machine.run("systemctl", "reload", UNIT)
        rows = machine.run(AGENTCTL, "--socket", ctl, "audit", "--limit", "50", "--json").stdout
        reloads = [r for r in json.loads(rows)["entries"] if r["verb"] == "config_reload"]
        assert reloads and reloads[-1]["outcome"] == "ok", reloads
    finally:
        put(machine, "/etc/agent-supervisor/daemon.toml", good)
        machine.run("systemctl", "restart", UNIT, timeout=180)
        wait_active(machine)


# The egress gateway inside the machine: an HTTPS upstream on its loopback (Python's own
# http.server, under a transient unit), a route to it with a secret, a run budget of three
# requests that only counts right if a restart carries the count on.
UPSTREAM_PORT = 8443
UPSTREAM_DIR = "/run/as-test-upstream"
UPSTREAM_UNIT = "as-test-upstream"
GATEWAY_WORKSPACE = "/var/tmp/as-test-gateway"
EXIT_WORKSPACE = "/var/tmp/as-test-exit"
ROUTE_SECRET = f"sk-machine-{secrets.token_hex(8)}"
UPSTREAM = f"""
import http.server, ssl
class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with open("{UPSTREAM_DIR}/seen", "a") as seen:
            seen.write(self.headers.get("Authorization", "") + "\\n")
        body = b'{{"usage": {{"total_tokens": 1}}}}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
server = http.server.ThreadingHTTPServer(("127.0.0.1", {UPSTREAM_PORT}), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain("{UPSTREAM_DIR}/server.pem", "{UPSTREAM_DIR}/server.key")
server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"""
GATEWAY_PROFILE = f"""
[network]
mode = "gateway"
[[network.gateway.routes]]
name = "llm"
host = "llm.gateway"
upstream = "https://api.upstream.test:{UPSTREAM_PORT}"
secret = "file:llm-key"
header = "Authorization"
format = "Bearer {{secret}}"
[network.gateway.budget]
action = "alert"
[network.gateway.budget.run]
requests = 3
"""
# The agent: two calls through the gateway when /workspace/go1 appears, two more at go2;
# each printed. A call that finds no gateway listening (a handover's gap) is tried again.
CALLER = """
import os, time, urllib.error, urllib.request
def call():
    deadline = time.monotonic() + 120
    while True:
        request = urllib.request.Request("http://llm.gateway/v1/chat", data=b"{}")
        try:
            with urllib.request.urlopen(request, timeout=30) as reply:
                return reply.status
        except urllib.error.HTTPError as refused:
            return refused.code
        except OSError:
            if time.monotonic() > deadline:
                return "unreachable"
            time.sleep(0.2)
for phase in ("go1", "go2"):
    while not os.path.exists("/workspace/" + phase):
        time.sleep(0.1)
    print(phase, [call() for _ in range(2)], flush=True)
time.sleep(3600)
"""


def put(machine: Machine, path: str, text: str, mode: str = "0644") -> None:
    machine.run("sh", "-c", f"umask 077 && cat > {path} && chmod {mode} {path}", input=text)


def configure_gateway(machine: Machine) -> None:
    """[egress] with a route secret, the upstream's CA and its name on loopback, and a gateway
    profile. [egress] takes a restart (a reload names it under restart_required)."""
    with tempfile.TemporaryDirectory() as scratch:
        ca = make_ca(Path(scratch))
        machine.run("mkdir", "-p", UPSTREAM_DIR, "/etc/agent-supervisor/secrets",
                    "/etc/agent-supervisor/profiles")
        put(machine, "/etc/agent-supervisor/egress-ca.pem", ca.ca_pem.read_text())
        put(machine, f"{UPSTREAM_DIR}/server.pem", ca.cert_pem.read_text())
        put(machine, f"{UPSTREAM_DIR}/server.key", ca.key_pem.read_text(), "0600")
    put(machine, "/etc/agent-supervisor/secrets/llm-key", ROUTE_SECRET + "\n", "0600")
    put(machine, "/etc/agent-supervisor/profiles/gw.toml", GATEWAY_PROFILE)
    machine.sh("cat >> /etc/agent-supervisor/daemon.toml <<'EOF'\n\n[egress]\n"
               "ca_file = \"/etc/agent-supervisor/egress-ca.pem\"\n"
               "hosts = { \"api.upstream.test\" = \"127.0.0.1\" }\nEOF")
    put(machine, f"{UPSTREAM_DIR}/upstream.py", UPSTREAM)
    machine.run("systemd-run", f"--unit={UPSTREAM_UNIT}", "/usr/bin/python3",
                f"{UPSTREAM_DIR}/upstream.py")


def test_stop_kills_every_agent_audited(machine: Machine) -> None:
    # This test's stop and start also apply [egress] for the gateway agent's restart below.
    configure_gateway(machine)
    start_agent(machine, "stopped-with-service")
    machine.run("systemctl", "stop", UNIT, timeout=120)
    assert agent_pids(machine) == []
    machine.run("systemctl", "start", UNIT, timeout=180)
    wait_active(machine)
    rows = audit_rows(machine)
    stops = [r for r in rows if r["verb"] == "shutdown"
             and "stopped-with-service" in json.dumps(r)]
    assert stops, [r["verb"] for r in rows[:30]]
    # The daemon asked systemd why it was stopped: a stop job, not a restart.
    daemon_stop = next(r for r in rows if r["verb"] == "daemon_stop")
    assert daemon_stop["detail"] == {"unit": UNIT, "systemd_job": "stop"}, daemon_stop


def agent_view(machine: Machine, name: str) -> dict[str, Any]:
    view: dict[str, Any] = json.loads(machine.run(AGENTCTL, "inspect", name, "--json").stdout)
    return view


def ticks(machine: Machine, name: str) -> list[int]:
    out = machine.run(AGENTCTL, "logs", name).stdout
    return [int(line[5:]) for line in out.splitlines() if line.startswith("tick-")]


def restart_keeping(machine: Machine, name: str) -> dict[str, Any]:
    """`systemctl restart` with agent `name` running: a new daemon, and the agent still active
    with the same run and init. The run's view from before the restart."""
    run: dict[str, Any] = agent_view(machine, name)["run"]
    pid = main_pid(machine)
    machine.run("systemctl", "restart", UNIT, timeout=180)
    wait_active(machine)
    assert main_pid(machine) != pid
    after = agent_view(machine, name)
    assert after["state"] == "active", after
    assert after["run"]["id"] == run["id"] and after["run"]["pid"] == run["pid"]
    return run


def test_restart_keeps_every_agent_running(machine: Machine) -> None:
    """`systemctl restart` hands the agents to the next daemon (docs/runbook.md, "Restarting
    or upgrading the daemon"): the same processes run on, their output goes on into the same
    log without a gap, the restart is audited as a handover and an adoption, and the next
    daemon kills them as its own."""
    name = "across-restart"
    machine.run(AGENTCTL, "run", "--detach", "--name", name, "--", "/bin/sh", "-c",
                "i=0; while true; do i=$((i+1)); echo tick-$i; sleep 0.2; done")
    machine.wait_for("output", lambda: len(ticks(machine, name)) >= 3, timeout=60)
    run = restart_keeping(machine, name)
    assert run["pid"] in agent_pids(machine)  # the same init, in the run's cgroup
    seen = len(ticks(machine, name))
    machine.wait_for("output to go on", lambda: len(ticks(machine, name)) > seen + 3,
                     timeout=60)
    numbers = ticks(machine, name)
    assert numbers == list(range(1, len(numbers) + 1)), numbers  # nothing lost

    rows = audit_rows(machine)
    daemon_stop = next(r for r in rows if r["verb"] == "daemon_stop")
    assert daemon_stop["detail"] == {"unit": UNIT, "systemd_job": "restart",
                                     "handover": True}, daemon_stop
    handover = next(r for r in rows if r["verb"] == "daemon_handover")
    assert [r["run_id"] for r in handover["detail"]["runs"]] == [run["id"]], handover
    adopted = next(r for r in rows if r["verb"] == "adopt")
    assert adopted["outcome"] == "ok" and adopted["detail"]["run"] == run["id"], adopted
    assert not any(r["verb"] in ("shutdown", "reap", "watchdog_kill") and name in json.dumps(r)
                   for r in rows)
    # Nor does the log say they were: a handover is not a restart sent SIGTERM.
    assert "sent SIGTERM, not SIGUSR2" not in machine.journal()

    machine.run(AGENTCTL, "kill", name, "--reason", "test done")
    machine.wait_for("no agent left", lambda: not agent_pids(machine), timeout=60)
    assert agent_view(machine, name)["state"] == "killed"


def test_a_restart_while_the_unit_is_still_starting_keeps_every_agent(machine: Machine) -> None:
    """Two restarts in a row: the second restart job's SIGUSR2 reaches the next daemon after
    it adopted the agents and before it is ready. It waits, pending, until the daemon's
    handlers exist, and hands the agents on; before, the daemon died of it (status=12/USR2),
    its watchdog killed every agent it had adopted, and `systemctl restart` said success."""
    name = "restarted-twice"
    start_agent(machine, name)
    before = sorted(agent_pids(machine))
    adopted = f"adopted agent {name} "
    machine.run("systemctl", "restart", "--no-block", UNIT)
    deadline = time.monotonic() + 120
    while adopted not in machine.journal():
        assert time.monotonic() < deadline, machine.journal()[-4000:]
        time.sleep(0.1)
    machine.run("systemctl", "restart", UNIT, timeout=180)
    wait_active(machine)
    journal = machine.journal()
    assert "SIGUSR2 arrived while the daemon was starting" in journal, journal[-4000:]
    assert "status=12/USR2" not in journal
    assert sorted(agent_pids(machine)) == before
    assert agent_view(machine, name)["state"] == "active"
    assert not any(r["verb"] in ("shutdown", "reap", "watchdog_kill") and name in json.dumps(r)
                   for r in audit_rows(machine))
    machine.run(AGENTCTL, "kill", name, "--reason", "test done")
    machine.wait_for("no agent left", lambda: not agent_pids(machine), timeout=60)


def test_an_adopted_run_that_exits_by_itself_has_its_real_exit_status(
        machine: Machine) -> None:
    """This machine refuses the kernel's process exit events (the proc connector answers
    only the initial namespaces), so an adopted run's status comes from its init's pidfd
    (docs/runbook.md, "What happens at a restart"): a run that exits 7 after the restart is
    recorded exited with 7, not unknown."""
    name = "exits-after-restart"
    machine.run("install", "-d", "-o", "4242", "-g", "4242", EXIT_WORKSPACE)
    machine.run(AGENTCTL, "run", "--detach", "--name", name, "--workspace", EXIT_WORKSPACE,
                "--", "/bin/sh", "-c",
                "while [ ! -e /workspace/go ]; do sleep 0.1; done; exit 7")
    machine.wait_for(f"agent {name} running", lambda: bool(agent_pids(machine)), timeout=60)
    run = restart_keeping(machine, name)
    rows = audit_rows(machine)
    handover = next(r for r in rows if r["verb"] == "daemon_handover")
    assert "proc connector" in handover["detail"]["exit_events"], handover  # the fallback
    machine.run("touch", f"{EXIT_WORKSPACE}/go")
    machine.wait_for("the run to end", lambda: agent_view(machine, name)["run"].get(
        "ended_at") is not None, timeout=60)
    ended = agent_view(machine, name)["run"]
    assert ended["id"] == run["id"] and ended["exit_code"] == 7, ended
    exit_row = next(r for r in audit_rows(machine) if r["verb"] == "exit"
                    and r["target"] == name)
    assert exit_row["detail"]["exit_code"] == 7, exit_row
    assert "unknown" not in json.dumps(exit_row["detail"]), exit_row
    assert not agent_pids(machine)


def phase(machine: Machine, name: str, go: str) -> list[object]:
    """Let the gateway agent make its calls of phase `go`; the statuses it saw."""
    machine.run("touch", f"{GATEWAY_WORKSPACE}/{go}")
    found: list[list[object]] = []

    def printed() -> bool:
        lines = [line for line in machine.run(AGENTCTL, "logs", name).stdout.splitlines()
                 if line.startswith(f"{go} ")]
        found[:] = [json.loads(line.split(" ", 1)[1].replace("'", '"')) for line in lines]
        return bool(found)

    machine.wait_for(f"the agent's calls of {go}", printed, timeout=120)
    return found[0]


def test_restart_keeps_a_gateway_agent_calling_through_the_gateway(machine: Machine) -> None:
    """An agent behind the egress gateway is kept across `systemctl restart`: the next
    daemon's gateway serves it at the same address for the same token (the agent's
    HTTP_PROXY never changes), the route and its secret work, and its counts go on: the run
    budget of three requests refuses the fourth call only because the two before the restart
    were carried over."""
    name = "gateway-across-restart"
    machine.run("install", "-d", "-o", "4242", "-g", "4242", GATEWAY_WORKSPACE)
    machine.run(AGENTCTL, "run", "--detach", "--name", name, "--profile", "gw",
                "--workspace", GATEWAY_WORKSPACE, "--", "/usr/bin/python3", "-u", "-c",
                CALLER)
    assert phase(machine, name, "go1") == [200, 200]
    run = restart_keeping(machine, name)
    adopted = next(r for r in audit_rows(machine) if r["verb"] == "adopt")
    assert adopted["outcome"] == "ok" and adopted["detail"]["run"] == run["id"], adopted
    assert adopted["detail"]["gateway"]["usage"]["requests"] == 2, adopted

    # The same token through the next daemon's gateway; the budget counted the first two.
    assert phase(machine, name, "go2") == [200, 429]
    usage = json.loads(machine.run(AGENTCTL, "egress", name, "--json").stdout)["usage"]
    assert usage["requests"] == 3, usage
    seen = machine.run("cat", f"{UPSTREAM_DIR}/seen").stdout.splitlines()
    assert seen == [f"Bearer {ROUTE_SECRET}"] * 3, seen

    machine.run(AGENTCTL, "kill", name, "--reason", "test done")
    machine.wait_for("no agent left", lambda: not agent_pids(machine), timeout=60)
    machine.run("systemctl", "stop", UPSTREAM_UNIT)


def test_sigusr2_restarts_the_service_and_keeps_the_agents(machine: Machine) -> None:
    """A bare SIGUSR2 under systemd is a restart, not a stop that leaves the unit inactive:
    the daemon hands the agents over and exits 75, on which the unit always starts the next
    daemon (RestartForceExitStatus=), which adopts them."""
    name = "across-usr2"
    start_agent(machine, name)
    run = agent_view(machine, name)["run"]
    pid = main_pid(machine)
    restarts = int(machine.unit("NRestarts")["NRestarts"])
    machine.run("systemctl", "kill", "--signal", "USR2", UNIT)
    machine.wait_for("systemd to start the next daemon", lambda: int(
        machine.unit("NRestarts")["NRestarts"]) > restarts, timeout=120)
    wait_active(machine)
    assert main_pid(machine) != pid
    after = agent_view(machine, name)
    assert after["state"] == "active", after
    assert after["run"]["id"] == run["id"] and after["run"]["pid"] == run["pid"]
    rows = audit_rows(machine)
    adopted = next(r for r in rows if r["verb"] == "adopt")
    assert adopted["outcome"] == "ok" and adopted["detail"]["run"] == run["id"], adopted
    assert "exiting 75" in machine.journal()
    machine.run(AGENTCTL, "kill", name, "--reason", "test done")
    machine.wait_for("no agent left", lambda: not agent_pids(machine), timeout=60)


TICKER = "i=0; while true; do i=$((i+1)); echo tick-$i; sleep 0.2; done"


def attach(machine: Machine, out: Path, *args: str) -> subprocess.Popen[bytes]:
    """`agentctl ARGS` in the machine, attached to the daemon, its stdout and stderr in
    `out`.out and `out`.err on this side (docker exec returns its exit status)."""
    with open(out.with_suffix(".out"), "wb") as stdout, \
            open(out.with_suffix(".err"), "wb") as stderr:
        return subprocess.Popen(["docker", "exec", machine.name, AGENTCTL, *args],
                                stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL)


def test_restart_with_streams_attached_keeps_their_agents(machine: Machine) -> None:
    """`systemctl restart` while `agentctl logs -f` follows one agent and a foreground
    `agentctl run` another: both are told at once that the daemon is restarting (one line),
    the old daemon hands both agents over and records its stop before systemd's
    TimeoutStopSec, the next daemon adopts them, and both clients follow their agent again
    from where they stopped. (Before, the daemon waited for the streams into systemd's
    SIGKILL, which killed the agents with no handover.)"""
    followed, foreground = "followed-across-restart", "foreground-across-restart"
    machine.run(AGENTCTL, "run", "--detach", "--name", followed, "--", "/bin/sh", "-c",
                TICKER)
    with tempfile.TemporaryDirectory() as tmp:
        outs = {name: Path(tmp) / name for name in ("follow", "run")}

        def printed(name: str) -> list[int]:
            text = outs[name].with_suffix(".out").read_text()
            return [int(line[5:]) for line in text.splitlines() if line.startswith("tick-")]

        follow = attach(machine, outs["follow"], "logs", "-f", followed)
        run = attach(machine, outs["run"], "run", "--name", foreground, "--", "/bin/sh", "-c",
                     TICKER)
        try:
            for name in outs:
                machine.wait_for(f"{name}'s output", lambda name=name: len(printed(name)) >= 3,
                                 timeout=60)
            kept = agent_view(machine, followed)["run"]
            run_view = restart_keeping(machine, foreground)
            seen = {name: len(printed(name)) for name in outs}
            for name in outs:
                machine.wait_for(f"{name} to follow again", lambda name=name: len(
                    printed(name)) > seen[name] + 3, timeout=60)
            for name in (followed, foreground):
                machine.run(AGENTCTL, "kill", name, "--reason", "test done")
            assert follow.wait(60) == 0 and run.wait(60) == 137
        finally:
            for client in (follow, run):
                if client.poll() is None:
                    client.kill()
                    client.wait()
        for name, view in (("follow", kept), ("run", run_view)):
            lines = outs[name].with_suffix(".err").read_text().splitlines()
            assert lines[0] == (f"agentctl: the daemon is restarting; run {view['id']} keeps "
                                f"running: following it again once the daemon is back (up "
                                f"to 120s)"), lines
            assert len(lines) == (1 if name == "follow" else 2), lines
            ticks_seen = printed(name)  # nothing lost or shown twice across the restart
            assert ticks_seen == list(range(1, len(ticks_seen) + 1)), ticks_seen
    rows = audit_rows(machine)
    handover = next(r for r in rows if r["verb"] == "daemon_handover")
    assert {r["run_id"] for r in handover["detail"]["runs"]} == {kept["id"], run_view["id"]}
    assert handover["detail"]["killed"] == {}, handover
    daemon_stop = next(r for r in rows if r["verb"] == "daemon_stop")
    assert daemon_stop["seq"] > handover["seq"] and daemon_stop["detail"]["handover"] is True
    adopted = {r["detail"]["run"] for r in rows if r["verb"] == "adopt"
               and r["outcome"] == "ok" and r["seq"] > handover["seq"]}
    assert adopted == {kept["id"], run_view["id"]}, adopted
    machine.wait_for("no agent left", lambda: not agent_pids(machine), timeout=60)


CONFIG = "/etc/agent-supervisor/daemon.toml"
DAEMON = "/opt/agent-supervisor/venv/bin/agent-supervisord"


def watchdog_pids(machine: Machine) -> set[int]:
    return {int(pid) for tree in LAYOUT.tracking for pid in machine.run(
        "cat", f"{tree}/{WATCHDOG_CGROUP}/cgroup.procs").stdout.split()}


def test_a_daemon_started_by_hand_while_the_service_runs_is_refused(machine: Machine) -> None:
    """Audit F15: a second agent-supervisord on the service's configuration exits 69 at once,
    naming the service's pid; the service's daemon, watchdog and agent are untouched, and
    --check-config and --halt's config reading still work beside it."""
    name = "beside-a-second-daemon"
    start_agent(machine, name)
    pid, watchdogs = main_pid(machine), watchdog_pids(machine)
    agents = set(agent_pids(machine))
    second = machine.run(DAEMON, check=False, timeout=120)
    assert second.returncode == 69, second
    assert "daemon_already_running" in second.stderr and f"pid {pid}" in second.stderr, second
    assert main_pid(machine) == pid and watchdog_pids(machine) == watchdogs
    assert agents <= set(agent_pids(machine))
    assert machine.run(DAEMON, "--check-config", check=False).returncode == 0
    assert agent_view(machine, name)["state"] == "active"
    machine.run(AGENTCTL, "kill", name, "--reason", "test done")
    machine.wait_for("no agent left", lambda: not agent_pids(machine), timeout=60)


def test_a_restart_onto_a_bad_config_keeps_the_handed_over_agents(machine: Machine) -> None:
    """Audit F6: a broken daemon.toml written before `systemctl restart`: the next daemon
    exits 78 and the unit fails, but /run/agent-supervisor stays (RuntimeDirectoryPreserve=
    yes) with handover.sock and the agent's runc state, the agent runs on held by the
    watchdog, and a start on the fixed config within the window adopts it: no run is left
    `running` with its processes gone, none is lost."""
    name = "across-a-bad-restart"
    start_agent(machine, name)
    run = agent_view(machine, name)["run"]
    config = machine.run("cat", CONFIG).stdout
    put(machine, CONFIG, config + "\n[no_such_section]\nkey = 1\n")
    try:
        failed = machine.run("systemctl", "restart", UNIT, check=False, timeout=180)
        assert failed.returncode != 0, failed
        machine.wait_for("the unit to fail", lambda: machine.unit(
            "ActiveState", "ExecMainStatus") == {"ActiveState": "failed",
                                                 "ExecMainStatus": "78"}, timeout=120)
        # What the next daemon needs to adopt the agent is still there, and so is the agent.
        machine.run("test", "-S", "/run/agent-supervisor/handover.sock")
        machine.run("test", "-d", f"/run/agent-supervisor/runc/as-{run['id']}")  # name_prefix
        assert run["pid"] in agent_pids(machine)
        assert len(watchdog_pids(machine)) == 1
    finally:
        put(machine, CONFIG, config)
    machine.run("systemctl", "start", UNIT, timeout=180)
    wait_active(machine)
    after = agent_view(machine, name)
    assert after["state"] == "active", after
    assert after["run"]["id"] == run["id"] and after["run"]["pid"] == run["pid"], after
    rows = audit_rows(machine)
    adopted = next(r for r in rows if r["verb"] == "adopt")
    assert adopted["outcome"] == "ok" and adopted["detail"]["run"] == run["id"], adopted
    assert not any(r["verb"] in ("reap", "watchdog_kill") and (
        name in json.dumps(r) or run["id"] in json.dumps(r)) for r in rows)
    machine.run(AGENTCTL, "kill", name, "--reason", "test done")
    machine.wait_for("no agent left", lambda: not agent_pids(machine), timeout=60)
    assert agent_view(machine, name)["run"]["state"] == "killed"


def test_a_bad_egress_pool_fails_the_start_with_78_and_no_traceback(machine: Machine) -> None:
    """Audit M1: an [egress] pool that is not a network passed --check-config, and the start
    died in the gateway's setup with a traceback, exit 1, restarted by systemd until its start
    limit. Now both refuse it by key, exit 78, and systemd does not restart it."""
    config = machine.run("cat", CONFIG).stdout
    bad = '\n[egress]\npool = "10.0.0.0/33"\nworker_user = "as-no-such-user"\n'
    # An earlier test's [egress] (configure_gateway) names neither key: the two join it.
    put(machine, CONFIG, config.replace("\n[egress]\n", bad, 1) if "\n[egress]\n" in config
        else config + bad)
    try:
        check = machine.run("/opt/agent-supervisor/venv/bin/agent-supervisord",
                            "--check-config", check=False)
        assert check.returncode == 78, check
        assert "egress.pool" in check.stderr and "egress.worker_user" in check.stderr
        before = machine.journal()
        failed = machine.run("systemctl", "restart", UNIT, check=False, timeout=180)
        assert failed.returncode != 0, failed
        machine.wait_for("the unit to fail", lambda: machine.unit(
            "ActiveState", "ExecMainStatus") == {"ActiveState": "failed",
                                                 "ExecMainStatus": "78"}, timeout=120)
        assert machine.unit("NRestarts")["NRestarts"] == "0"
        journal = machine.journal()[len(before):]
        assert "egress.pool" in journal and "is not a network" in journal, journal
        assert "Traceback" not in journal, journal
    finally:
        put(machine, CONFIG, config)
    machine.run("systemctl", "start", UNIT, timeout=180)
    wait_active(machine)


GATE = "/run/as-test-gate"
GATE_DROP_IN = "/etc/systemd/system/agent-supervisor.service.d/gate.conf"
HALT_FILE = "/run/agent-supervisor/HALT"


def unit_pids(machine: Machine) -> set[int]:
    """Every process in the unit's cgroup (and below it), in each tree systemd tracks it by:
    what `systemctl kill --kill-whom=all` signals."""
    group = machine.run("systemctl", "show", "--value", "--property=ControlGroup",
                        UNIT).stdout.strip()
    out = machine.sh(" ; ".join(f"find {tree}{group} -name cgroup.procs -exec cat {{}} + "
                                f"2>/dev/null" for tree in LAYOUT.tracking) + " ; true").stdout
    return {int(pid) for pid in out.split()}


def test_break_glass_in_a_restarts_gap_is_the_halt_file(machine: Machine) -> None:
    """The runbook's story for break-glass during a restart: between the old daemon's exit
    and the next one's start (held open here by an ExecStartPre that waits for a file, and
    ignores SIGUSR1), the agents and the watchdog holding them are outside the unit's cgroup,
    so `systemctl kill --kill-whom=all -s USR1` reaches neither; `agent-supervisord --halt`
    is taken by the watchdog, which kills the agents, and the next daemon applies the file as
    a global halt."""
    name = "halted-in-the-gap"
    start_agent(machine, name)
    run = agent_view(machine, name)["run"]
    machine.run("rm", "-f", GATE)
    put(machine, GATE_DROP_IN, "[Service]\nExecStartPre=/bin/sh -c 'trap \"\" USR1; "
        f"while [ ! -e {GATE} ]; do sleep 0.1; done'\n")
    try:
        machine.run("systemctl", "daemon-reload")
        machine.run("systemctl", "restart", "--no-block", UNIT)
        machine.wait_for("the restart held in its gap", lambda: machine.unit(
            "ActiveState", "SubState") == {"ActiveState": "activating",
                                           "SubState": "start-pre"}, timeout=120)
        assert main_pid(machine) == 0
        watchdogs = {int(pid) for tree in LAYOUT.tracking for pid in machine.run(
            "cat", f"{tree}/{WATCHDOG_CGROUP}/cgroup.procs").stdout.split()}
        agents = set(agent_pids(machine))
        assert len(watchdogs) == 1 and run["pid"] in agents
        in_unit = unit_pids(machine)
        assert in_unit and not in_unit & (watchdogs | agents), (in_unit, watchdogs, agents)
        machine.run("systemctl", "kill", "--kill-whom=all", "--signal=USR1", UNIT)

        halted = machine.run("/opt/agent-supervisor/venv/bin/agent-supervisord", "--halt",
                             "INC-test: during a restart", check=False)
        assert halted.returncode == 1 and "no running daemon took" in halted.stderr, halted
        machine.wait_for("the watchdog to kill the agents", lambda: not agent_pids(machine),
                         timeout=60)
    finally:
        machine.run("touch", GATE)
        wait_active(machine)
        machine.run("rm", "-f", GATE_DROP_IN, GATE)
        machine.run("systemctl", "daemon-reload")
    rows = audit_rows(machine)
    kill = next(r for r in rows if r["verb"] == "watchdog_kill")
    # The HALT file did it, not the SIGUSR1 (which would read "SIGUSR1 to the watchdog").
    assert kill["detail"]["trigger"].startswith(f"break-glass: {HALT_FILE}"), kill
    assert kill["detail"]["handed_over"] == [run["id"]], kill
    assert kill["detail"]["confirmed_empty"] is True, kill
    glass = next(r for r in rows if r["verb"] == "break_glass")
    assert "INC-test: during a restart" in json.dumps(glass), glass
    assert machine.run("test", "-e", HALT_FILE, check=False).returncode != 0  # applied
    machine.run(AGENTCTL, "reactivate", "--all", "--reason", "test done")


def test_the_daemon_warns_at_start_when_a_restart_would_kill(machine: Machine) -> None:
    """The installed unit restarts by SIGUSR2 and the daemon says nothing; a unit whose
    restart sends SIGTERM (what a systemd older than 244 does with every unit) gets the
    warning from the daemon's own check, run in a transient service of that kind."""
    assert machine.run("systemctl", "show", "--value", "--property=RestartKillSignal",
                       UNIT).stdout.strip() == "12"  # SIGUSR2
    assert "to restart with the agents kept" not in machine.journal()  # the start's check
    check = ("import asyncio; from supervisor.daemon.stopintent import restart_warning; "
             "print(asyncio.run(restart_warning(True)))")
    said: dict[str, str] = {}
    for sig in ("SIGUSR2", "SIGTERM"):
        out = f"/run/as-test-restart-{sig}.out"
        # Type=oneshot: systemd-run returns once the check has run.
        machine.run("systemd-run", "--quiet", f"--unit=as-test-restart-{sig}",
                    "--property=Type=oneshot", f"--property=RestartKillSignal={sig}",
                    f"--property=StandardOutput=file:{out}",
                    "/opt/agent-supervisor/venv/bin/python", "-c", check)
        said[sig] = machine.run("cat", out).stdout.strip()
    assert said["SIGUSR2"] == "None", said
    assert "RestartKillSignal=SIGTERM, not SIGUSR2" in said["SIGTERM"], said
    assert "systemctl kill -s USR2 as-test-restart-SIGTERM.service" in said["SIGTERM"], said


FAKE_SYSTEMCTL = "/usr/local/lib/as-test-hung/systemctl"
HUNG_DROP_IN = "/etc/systemd/system/agent-supervisor.service.d/hung-systemctl.conf"


def test_restart_and_stop_ask_systemd_nothing_before_they_act(machine: Machine) -> None:
    """Restart or stop is told by the signal (RestartKillSignal=SIGUSR2), so the daemon asks
    systemd nothing in front of a kill or a handover: with a `systemctl` on the daemon's
    PATH that never answers, a restart still keeps the agents and a stop still kills them;
    the question (for daemon_stop's record) times out meanwhile."""
    machine.sh(f"mkdir -p {FAKE_SYSTEMCTL.rsplit('/', 1)[0]} && printf '#!/bin/sh\\nexec "
               f"sleep 3600\\n' > {FAKE_SYSTEMCTL} && chmod 755 {FAKE_SYSTEMCTL} && "
               f"printf '[Service]\\nEnvironment=PATH={FAKE_SYSTEMCTL.rsplit('/', 1)[0]}:"
               f"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\\n' "
               f"> {HUNG_DROP_IN}")
    try:
        machine.run("systemctl", "daemon-reload")
        machine.run("systemctl", "restart", UNIT, timeout=180)  # the next daemon has the PATH
        wait_active(machine)
        name = "restart-unasked"
        start_agent(machine, name)
        run = agent_view(machine, name)["run"]
        machine.run("systemctl", "restart", UNIT, timeout=180)
        wait_active(machine)
        after = agent_view(machine, name)
        assert after["state"] == "active" and after["run"]["pid"] == run["pid"], after
        daemon_stop = next(r for r in audit_rows(machine) if r["verb"] == "daemon_stop")
        assert daemon_stop["detail"] == {"unit": UNIT, "systemd_job": None,
                                         "error": "systemctl did not answer",
                                         "handover": True}, daemon_stop

        machine.run("systemctl", "stop", UNIT, timeout=120)
        assert agent_pids(machine) == []
    finally:
        machine.run("rm", "-f", HUNG_DROP_IN, FAKE_SYSTEMCTL)
        machine.run("systemctl", "daemon-reload")
        machine.run("systemctl", "start", UNIT, timeout=180)
        wait_active(machine)
    rows = audit_rows(machine)
    assert any(r["verb"] == "shutdown" and name in json.dumps(r) for r in rows)
    daemon_stop = next(r for r in rows if r["verb"] == "daemon_stop")
    assert daemon_stop["detail"] == {"unit": UNIT, "systemd_job": None,
                                     "error": "systemctl did not answer"}, daemon_stop


def test_sigkill_of_the_unit_leaves_no_agent(machine: Machine) -> None:
    start_agent(machine, "killed-with-daemon")
    pid = main_pid(machine)
    # The daemon's watchdog, outside the unit's cgroup in each tree systemd tracks it by (the
    # name=systemd hierarchy and the v2 tree on a hybrid host; the one tree on pure v2).
    for tree in LAYOUT.tracking:
        procs = machine.sh(f"cat {tree}/{WATCHDOG_CGROUP}/cgroup.procs")
        assert len(procs.stdout.split()) == 1, (tree, procs.stdout)
    machine.run("systemctl", "kill", "--signal", "KILL", UNIT)
    # systemd's SIGKILL reaches every process of the unit, but neither the agents' cgroups nor
    # the watchdog's: the watchdog sees the daemon's channel close and kills the agents at once.
    machine.wait_for("the agents killed", lambda: not agent_pids(machine), timeout=60)
    machine.wait_for("systemd to restart the daemon", lambda: main_pid(machine) not in
                     (0, pid), timeout=120)
    wait_active(machine)
    rows = audit_rows(machine)
    restart = next(i for i, r in enumerate(rows) if r["verb"] == "daemon_start")
    # The new daemon waited for that watchdog and audited what it did, right after its start:
    # it was the watchdog that killed the agent, not the next start's reaping.
    kills = [r for r in rows[:restart] if r["verb"] == "watchdog_kill"]
    assert len(kills) == 1, [r["verb"] for r in rows[:restart + 3]]
    detail = kills[0]["detail"]
    assert isinstance(detail, dict) and detail["confirmed_empty"] is True, detail
    # (It had finished before the new daemon looked: nothing of it was left to end.)
    start = rows[restart]["detail"]
    assert isinstance(start, dict) and "killed" not in start["watchdog"]["previous"], start


def test_watchdog_restarts_a_hung_daemon_and_its_agents_die(machine: Machine) -> None:
    start_agent(machine, "hung-daemon")
    pid = main_pid(machine)
    restarts = int(machine.unit("NRestarts")["NRestarts"])
    machine.run("kill", "-STOP", str(pid))
    # No heartbeat from a stopped loop: after WatchdogSec systemd aborts the daemon, its
    # watchdog process kills the agents, Restart=on-failure starts a new daemon.
    machine.wait_for("systemd to restart the hung daemon", lambda: int(
        machine.unit("NRestarts")["NRestarts"]) > restarts, timeout=120)
    machine.wait_for("the agents killed", lambda: not agent_pids(machine), timeout=60)
    wait_active(machine)
    assert main_pid(machine) != pid
    assert "Watchdog timeout" in machine.run("journalctl", "-u", UNIT, "--no-pager",
                                             check=False).stdout
    # It was the daemon's watchdog process that killed them (audited by the next daemon right
    # after its start), not the next start's reaping.
    rows = audit_rows(machine)
    restart = next(i for i, r in enumerate(rows) if r["verb"] == "daemon_start")
    kills = [r for r in rows[:restart] if r["verb"] == "watchdog_kill"]
    assert len(kills) == 1, [r["verb"] for r in rows[:restart + 3]]
    detail = kills[0]["detail"]
    assert isinstance(detail, dict) and detail["confirmed_empty"] is True, detail


def test_installing_again_keeps_the_configuration(machine: Machine) -> None:
    """The README's steps run again (an upgrade from a newer checkout): the operator's
    daemon.toml, changed by the tests above, is kept, and the service stays active."""
    config = machine.run("cat", "/etc/agent-supervisor/daemon.toml").stdout
    assert "[roles]" in config
    pid = main_pid(machine)
    printed = follow_readme(machine)
    assert machine.run("cat", "/etc/agent-supervisor/daemon.toml").stdout == config
    wait_active(machine)
    # The running daemon is not the one installed until a restart, and the install says so
    # (not that the new version is active).
    assert main_pid(machine) == pid
    assert f"the running daemon (pid {pid}, version " in printed, printed
    assert "`systemctl restart agent-supervisor` starts the installed one and keeps the " \
        "running agents" in printed, printed
    assert " is active" not in printed, printed


# What a crashed embedded run (CI mode, slot 7: above what the host's own CI tests claim)
# leaves: its slot's lock, state, checkout copy, cgroups, network namespace and nft table, and
# a workspace bind of the user's checkout still mounted in its bundle.
CI_SLOT = "slot7"
CI_CGROUP = LAYOUT.v2 / "agent-supervisor-ci" / CI_SLOT
CI_BIND = f"/run/agent-supervisor-ci/{CI_SLOT}/bundles/r1/rootfs/workspace"


def leave_ci_leftovers(machine: Machine) -> None:
    machine.sh(
        f"mkdir -p /run/agent-supervisor-ci/locks /var/lib/agent-supervisor-ci/{CI_SLOT}/src "
        f"{CI_BIND} /root/checkout {CI_CGROUP} {CI_CGROUP}-watchdog && "
        f"touch /run/agent-supervisor-ci/locks/{CI_SLOT} && echo keep > /root/checkout/file && "
        f"mount --bind /root/checkout {CI_BIND} && "
        f"ip netns add asci7-r1 && nft add table ip asci7.r1")


# Where [audit] may move the signing key and the checkpoints: uninstall finds them there.
MOVED_AUDIT = {"key": "/srv/as-audit/audit-key", "checkpoint_file": "/srv/as-log/cp.jsonl"}


def test_uninstall_leaves_nothing(machine: Machine) -> None:
    start_agent(machine, "before-uninstall")
    leave_ci_leftovers(machine)
    # The daemon has its key and checkpoints at the defaults; the files a daemon configured
    # so (read by uninstall from daemon.toml) would have made are put there.
    machine.sh("cat >> /etc/agent-supervisor/daemon.toml <<'EOF'\n\n[audit]\n" + "".join(
        f"{key} = \"{path}\"\n" for key, path in MOVED_AUDIT.items()) + "EOF")
    key, checkpoints = MOVED_AUDIT["key"], MOVED_AUDIT["checkpoint_file"]
    moved = [key, f"{key}.pub", checkpoints, f"{checkpoints}.tmp"]
    machine.sh(" && ".join(f"mkdir -p $(dirname {path}) && echo x > {path}" for path in moved))
    machine.run("test", "-s", "/etc/agent-supervisor/audit-key.pub")
    # A drop-in with a route secret, as docs/egress.md has operators write one.
    dropins = f"/etc/systemd/system/{UNIT}.d"
    machine.sh(f"mkdir -p {dropins} && printf '[Service]\\nEnvironment=MODEL_API_KEY=sk-x\\n' "
               f"> {dropins}/secret.conf && systemctl daemon-reload")
    # The directories the install was first to make: gone after; those it found stay.
    made = machine.sh("cat /opt/agent-supervisor/created-dirs 2>/dev/null || true"
                      ).stdout.split()
    found = [d for d in ("/etc/sysusers.d", "/etc/tmpfiles.d", "/usr/share/man/man1",
                         "/usr/share/bash-completion/completions",
                         "/usr/share/zsh/vendor-completions",
                         "/usr/share/fish/vendor_completions.d") if d not in made]
    try:
        uninstalled = machine.run("bash", "/src/scripts/uninstall.sh", timeout=300)
    finally:
        for cgroup in (CI_CGROUP, CI_CGROUP.with_name(f"{CI_SLOT}-watchdog")):
            machine.run("rmdir", str(cgroup), check=False)
    assert agent_pids(machine) == []
    # CI mode's leftovers are gone, and the checkout bound into the crashed run's bundle was
    # unmounted, not deleted through.
    ci = machine.sh(f"ls -d /run/agent-supervisor-ci /var/lib/agent-supervisor-ci {CI_CGROUP} "
                    f"{CI_CGROUP}-watchdog 2>/dev/null || true").stdout.split()
    assert ci == []
    assert machine.run("cat", "/root/checkout/file").stdout == "keep\n"
    leftovers = machine.sh(
        "ls -d /opt/agent-supervisor /etc/agent-supervisor /var/lib/agent-supervisor "
        "/var/log/agent-supervisor /run/agent-supervisor /etc/systemd/system/" + UNIT +
        " /etc/sysusers.d/agent-supervisor.conf /etc/tmpfiles.d/agent-supervisor.conf "
        "/usr/local/bin/agentctl /usr/share/bash-completion/completions/agentctl "
        "/usr/share/zsh/vendor-completions/_agentctl /usr/share/man/man1/agentctl.1 "
        "/usr/share/fish/vendor_completions.d/agentctl.fish " + " ".join(moved) +
        " /srv/as-audit /srv/as-log 2>/dev/null || true").stdout.split()
    assert leftovers == []
    assert machine.run("test", "-d", "/srv").returncode == 0  # their parent stays
    assert f"removing the unit's drop-in {dropins}/secret.conf" in uninstalled.stderr
    assert machine.sh(f"ls -d {dropins} {' '.join(made)} 2>/dev/null || true"
                      ).stdout.split() == []
    assert machine.sh(f"ls -d {' '.join(found)} 2>/dev/null || true").stdout.split() == found
    assert machine.run("getent", "group", "agent-operators", check=False).returncode == 2
    # Exactly the daemon's names: the host's cgroup tree is shared (other test daemons use
    # agent-supervisor-test/...), in every tree of this host's layout, the watchdog's too.
    paths = " ".join(str(tree / name) for tree in LAYOUT.all_trees for name in SERVICE_CGROUPS)
    cgroups = machine.sh(f"ls -d {paths} 2>/dev/null || true").stdout.split()
    assert cgroups == []
    assert machine.sh("ls /run/netns 2>/dev/null || true").stdout.split() == []
    tables = machine.run("nft", "list", "tables").stdout.split("\n")
    assert [t for t in tables if " as." in t or " asci7." in t] == []
    assert machine.run("systemctl", "cat", UNIT, check=False).returncode != 0
