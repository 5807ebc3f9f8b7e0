"""Reload of a real daemon (`agentctl reload`, the API behind `systemctl reload`): each
reloadable section is applied with a running agent kept running, each reload is audited with
what changed (never a value), and a configuration with errors is refused whole, every error
listed, the running configuration unchanged. Needs root and runc."""

from __future__ import annotations

import json
import os
import shutil
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require, require_docker
from tests.e2e.test_roles import as_user, role_users
from tests.support.daemon import TEST_HOST_ROOT_IMAGE, Daemon, running_daemon, wait_for
from tests.support.egress import LLM_ROUTE, gateway_rig, host_request, open_tunnel
from tests.support.webhooks import Receiver, ThreadedReceiver

SECRET = "reload-webhook-secret"


@pytest.fixture
def receiver() -> Iterator[ThreadedReceiver]:
    threaded = ThreadedReceiver(Receiver(SECRET.encode(), fail_first=0))
    threaded.start()
    yield threaded
    threaded.stop()


def reload(daemon: Daemon, **sections: Any) -> dict[str, Any]:
    """Rewrite the daemon's configuration with `sections` changed, then reload."""
    daemon.extra_config.update(sections)
    daemon.write_config()
    result: dict[str, Any] = daemon.agentctl_json("reload", "--reason", "test")
    return result


def reload_rows(daemon: Daemon) -> list[dict[str, Any]]:
    return [e for e in daemon.client.audit(limit=10_000)["entries"]
            if e["verb"] == "config_reload"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def sleeper_pids(daemon: Daemon) -> list[int]:
    return sorted(int(p) for c in daemon.cgroup_dir().rglob("cgroup.procs")
                  for p in c.read_text().split())


def test_each_reloadable_section_applies_with_agents_kept(tmp_root: Path,
                                                          receiver: ThreadedReceiver) -> None:
    with running_daemon(tmp_root) as daemon:
        daemon.agentctl("run", "--detach", "--name", "kept", "--", "sleep", "600", check=True)
        pids = wait_for(lambda: sleeper_pids(daemon), timeout=30, what="the agent running")
        assert daemon.agentctl_json("reload")["outcome"] == "unchanged"

        # Webhooks: a new endpoint receives the events that follow.
        secret = tmp_root / "hook.secret"
        secret.write_text(SECRET + "\n")
        secret.chmod(0o600)
        result = reload(daemon, webhooks=[{"url": receiver.receiver.url,
                                           "secret_file": str(secret)}],
                        webhook_delivery={"backoff_initial": "50ms"})
        assert {"webhooks", "webhook_delivery"} <= set(result["changed"])
        daemon.agentctl("pause", "kept", "--reason", "after reload", check=True)
        wait_for(lambda: any(r.event_type == "agent.paused" and r.signature_ok
                             for r in receiver.receiver.received), timeout=30,
                 what="the new endpoint to receive agent.paused")
        daemon.agentctl("resume", "kept", check=True)
        # The webhook's secret alone changes: same keys, a new secret, reported by name only.
        secret.write_text("rotated-secret\n")
        result = daemon.agentctl_json("reload")
        assert result["changed"] == ["webhooks"]

        # Metrics: the endpoint appears where the new address says, and moves.
        port = free_port()
        result = reload(daemon, metrics={"listen": f"127.0.0.1:{port}"})
        assert result["changed"] == ["metrics"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
            assert b"agent_supervisor" in page.read()

        # Drill schedule and workspaces.
        result = reload(daemon, drill={"interval": "24h", "processes": 7},
                        workspaces={"roots": {"admin": [str(tmp_root)]}})
        assert set(result["changed"]) == {"drill", "workspaces"}

        # Profiles, with their tripwires and egress routes, and the route secrets they name:
        # read at each launch, so reload checks them and names what changed.
        (daemon.root / "secrets").mkdir(mode=0o700)
        route_secret = daemon.root / "secrets" / "upstream"
        route_secret.write_text("first-token\n")
        route_secret.chmod(0o600)
        profile = daemon.root / "profiles" / "routed.toml"
        profile.write_text(
            '[network]\nmode = "gateway"\n[[network.gateway.routes]]\nname = "api"\n'
            'host = "api.internal"\nupstream = "https://api.example.com"\n'
            'secret = "file:upstream"\n'
            '[[tripwires.rules]]\nname = "mem"\nmetric = "memory_bytes"\nabove = "512M"\n'
            'action = "kill"\n')
        result = reload(daemon, egress={"secrets_dir": str(daemon.root / "secrets")})
        assert "profile:routed" in result["changed"]
        assert "secret:file:upstream" in result["changed"]
        assert result["restart_required"] == ["egress"]
        route_secret.write_text("second-token\n")
        assert daemon.agentctl_json("reload")["changed"] == ["secret:file:upstream"]

        # Not reloadable: reported, kept at its running value.
        result = reload(daemon, kill={"confirm_timeout": "7s"})
        assert "kill" in result["restart_required"] and "kill" not in result["changed"]

        # The agent ran through all of it, untouched.
        assert sleeper_pids(daemon) == pids
        rows = reload_rows(daemon)
        assert [r["outcome"] for r in rows] == ["ok"] * len(rows)
        text = json.dumps(rows)
        for value in (SECRET, "rotated-secret", "first-token", "second-token"):
            assert value not in text
        daemon.agentctl("kill", "kept", "--reason", "done", check=True)


def test_roles_reload_takes_effect_for_the_next_request(tmp_root: Path) -> None:
    with role_users() as setup:
        viewer = setup["users"]["viewer"]
        with running_daemon(tmp_root, daemon={"socket_group": setup["socket_group"]}) as daemon:
            before = as_user(daemon, viewer, "ls", "--json")
            assert json.loads(before.stdout)["error"]["code"] == "forbidden"
            result = reload(daemon, roles={"viewer": [f"user:{viewer.pw_name}"]})
            assert result["changed"] == ["roles"]
            after = as_user(daemon, viewer, "ls", "--json")
            assert after.returncode == 0, after.stderr
            # A viewer may not reload: owner only.
            refused = as_user(daemon, viewer, "reload", "--json")
            assert json.loads(refused.stdout)["error"]["code"] == "forbidden"


def test_a_bad_configuration_is_refused_whole_and_the_old_one_stays(tmp_root: Path) -> None:
    with running_daemon(tmp_root) as daemon:
        daemon.agentctl("run", "--detach", "--name", "kept", "--", "sleep", "600", check=True)
        pids = wait_for(lambda: sleeper_pids(daemon), timeout=30, what="the agent running")
        good = daemon.config_path.read_text()
        (daemon.root / "profiles" / "broken.toml").write_text("[limits]\npids = -5\n")
        daemon.config_path.write_text(
            good + '\n[drill]\nprocesses = 0\n[roles]\nowner = ["bogus"]\n[nonsense]\nx = 1\n')
        result = daemon.agentctl("reload", "--json")
        assert result.returncode == 78
        error = json.loads(result.stdout)["error"]
        assert error["code"] == "config_reload_refused"
        keys = {e["key"] for e in error["detail"]["errors"]}
        assert {"drill.processes", "roles.owner.0", "nonsense"} <= keys
        assert any(e["path"].endswith("broken.toml") for e in error["detail"]["errors"])
        # The same list from --check-config, which exits 78 too.
        check = daemon.check_config()
        assert check.returncode == 78
        for key in ("drill.processes", "roles.owner.0", "nonsense", "broken.toml"):
            assert key in check.stderr
        # Nothing changed: the running daemon serves as before, and says so in the audit.
        rows = reload_rows(daemon)
        assert rows[-1]["outcome"] == "refused"
        assert {e["key"] for e in rows[-1]["detail"]["errors"]} >= keys
        assert sleeper_pids(daemon) == pids
        drill = daemon.agentctl_json("drill", "--processes", "3")
        assert drill["processes"] == 3
        daemon.agentctl("kill", "kept", "--reason", "done", check=True)
        os.unlink(daemon.root / "profiles" / "broken.toml")
        daemon.config_path.write_text(good)


def test_a_reload_with_the_docker_engine_down_applies_and_says_so(
        tmp_root: Path, receiver: ThreadedReceiver) -> None:
    """dockerd down (its socket gone, as a stopped dockerd leaves it) must not block a change
    of roles or webhooks: nothing a reload applies talks to the engine. The daemon reaches the
    shared engine through a link of the test's own; removing the link is the engine going
    down for this daemon only (the shared dockerd is never stopped)."""
    require_docker()
    link = tmp_root / "engine.sock"
    link.symlink_to("/var/run/docker.sock")
    with running_daemon(tmp_root, docker={"enabled": True, "socket": f"unix://{link}",
                                          "host_root_image": TEST_HOST_ROOT_IMAGE}) as daemon:
        daemon.agentctl("run", "--detach", "--name", "kept", "--", "sleep", "600", check=True)
        pids = wait_for(lambda: sleeper_pids(daemon), timeout=30, what="the agent running")
        # The control: with the engine up, a reload has nothing to warn about.
        assert reload(daemon, roles={"viewer": ["user:nobody"]})["warnings"] == []

        (daemon.root / "profiles" / "boxed.toml").write_text('runtime = "docker"\n')
        link.unlink()  # the engine is down for this daemon
        refused = daemon.agentctl("run", "--name", "boxed", "--profile", "boxed", "--", "true")
        assert refused.returncode == 125 and "engine_unavailable" in refused.stderr, refused.stderr

        secret = tmp_root / "hook.secret"
        secret.write_text(SECRET + "\n")
        secret.chmod(0o600)
        result = reload(daemon, roles={"viewer": ["user:nobody", "user:daemon"]},
                        webhooks=[{"url": receiver.receiver.url, "secret_file": str(secret)}])
        assert result["outcome"] == "applied", result
        assert {"roles", "webhooks"} <= set(result["changed"]), result
        [warning] = result["warnings"]
        assert warning["key"] == "docker.socket" and str(link) in warning["reason"], warning
        assert "not needed by a reload" in warning["reason"], warning
        # The new webhook is live: the next event reaches it.
        daemon.agentctl("pause", "kept", "--reason", "engine down", check=True)
        wait_for(lambda: any(r.event_type == "agent.paused" and r.signature_ok
                             for r in receiver.receiver.received), timeout=30,
                 what="the reloaded webhook to receive agent.paused")
        daemon.agentctl("resume", "kept", check=True)
        row = reload_rows(daemon)[-1]
        assert row["outcome"] == "ok" and row["detail"]["warnings"] == [warning], row
        # Human output names it on stderr.
        plain = daemon.agentctl("reload")
        assert plain.returncode == 0 and "warning: docker.socket:" in plain.stderr, plain

        # A real error is still refused whole, and the engine is kept apart from it.
        good = daemon.config_path.read_text()
        daemon.config_path.write_text(good + '\n[drill]\nprocesses = 0\n')
        bad = daemon.agentctl("reload", "--json")
        assert bad.returncode == 78, bad
        detail = json.loads(bad.stdout)["error"]["detail"]
        assert [e["key"] for e in detail["errors"]] == ["drill.processes"], detail
        assert [w["key"] for w in detail["warnings"]] == ["docker.socket"], detail
        daemon.config_path.write_text(good)
        # A start would still refuse the engine (fail closed): --check-config says so.
        check = daemon.check_config()
        assert check.returncode == 78 and "docker.socket" in check.stderr, check.stderr

        link.symlink_to("/var/run/docker.sock")  # the engine is back
        assert daemon.agentctl_json("reload")["warnings"] == []
        assert sleeper_pids(daemon) == pids
        daemon.agentctl("kill", "kept", "--reason", "done", check=True)


def _cut(tunnel: Any, timeout: float = 10.0) -> bool:
    """The gateway closed the tunnel (a read that times out means it is still open)."""
    tunnel.settimeout(timeout)
    try:
        return bool(tunnel.recv(100) == b"")
    except TimeoutError:
        return False
    except OSError:
        return True
    finally:
        tunnel.close()


OTHER_ROUTE = """
[[network.gateway.routes]]
name = "other"
host = "other.gateway"
upstream = "https://other.upstream.test:{PORT}"
secret = "file:other-key"
header = "X-Api-Key"
format = "{secret}"
"""


def test_a_reload_pushes_changed_routes_and_secrets_to_a_running_gateway_run(
        tmp_root: Path) -> None:
    require(shutil.which("nft") is not None, "needs nft (apt-get install nftables)")
    with gateway_rig(tmp_root) as rig:
        port = rig.upstream.port
        profile = rig.profile("routed", f'[network.gateway]\nallow = ["pkg.upstream.test:{port}"]'
                              f'\n{LLM_ROUTE}')
        rig.daemon.agentctl_json("run", "--detach", "--name", "kept", "--profile", profile,
                                 "--", "sleep", "600")
        env = rig.proxy_env("kept")

        def call(host: str) -> bytes:
            return host_request(env, f"GET http://{host}/v1/chat HTTP/1.1\r\nHost: {host}\r\n"
                                f"Connection: close\r\n\r\n".encode())

        assert call("llm.gateway").startswith(b"HTTP/1.1 200")
        assert rig.upstream.headers_seen("Authorization")[-1] == f"Bearer {rig.secret}"
        assert call("other.gateway").startswith(b"HTTP/1.1 403")  # no such route yet
        tunnel = open_tunnel(env, f"pkg.upstream.test:{port}", rig.ca)

        # The operator rotates the key, adds a route and withdraws the allowed host.
        secrets_dir = tmp_root / "secrets"
        (secrets_dir / "llm-key").write_text("sk-rotated\n")
        (secrets_dir / "other-key").write_text("other-secret\n")
        (secrets_dir / "other-key").chmod(0o600)
        rig.profile("routed", f"[network.gateway]\n{LLM_ROUTE}{OTHER_ROUTE}")
        result = rig.daemon.agentctl_json("reload", "--reason", "rotate the key")
        assert {"profile:routed", "secret:file:llm-key"} <= set(result["changed"]), result
        [pushed] = result["gateway_runs"]
        assert pushed["agent"] == "kept" and pushed["routes"] == ["llm", "other"], pushed

        # Its next requests: the new secret, the new route; the tunnel judged by the old
        # policy is cut, and the host it reached is refused now. Same token throughout.
        assert _cut(tunnel), "a regrant must cut tunnels the old policy let through"
        assert call("llm.gateway").startswith(b"HTTP/1.1 200")
        assert rig.upstream.headers_seen("Authorization")[-1] == "Bearer sk-rotated"
        assert call("other.gateway").startswith(b"HTTP/1.1 200")
        assert rig.upstream.headers_seen("X-Api-Key")[-1] == "other-secret"
        refused = host_request(env, f"CONNECT pkg.upstream.test:{port} HTTP/1.1\r\nHost: "
                               f"pkg.upstream.test:{port}\r\n\r\n".encode())
        assert refused.startswith(b"HTTP/1.1 403"), refused

        # Audited by name, never by value.
        row = reload_rows(rig.daemon)[0]
        assert row["detail"]["gateway_runs"] == [{"run": pushed["run"], "agent": "kept",
                                                  "profile": "routed",
                                                  "routes": ["llm", "other"]}]
        text = json.dumps(row)
        for value in ("sk-rotated", "other-secret", rig.secret):
            assert value not in text
        rig.daemon.agentctl("kill", "kept", "--reason", "done", check=True)
