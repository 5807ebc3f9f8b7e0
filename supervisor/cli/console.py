"""agentctl console: serve the web console on loopback for the operator who runs it. The
server (aiohttp) is imported only when the command runs, so agentctl's start stays fast.
Privilege: that of the operator; the console is one more client of the control socket."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="Loopback port to listen on (0: any free port).")
@click.option("--max-clients", type=click.IntRange(1, 64), default=8, show_default=True,
              help="Live pages (server-sent-event streams) served at once.")
@click.option("--poll", "poll_period", type=click.FloatRange(0.2, 60.0), default=1.0,
              show_default=True, help="Seconds between reads of the daemon's state.")
@click.option("--fleet/--no-fleet", default=None,
              help="Show the fleet view, read with your AGENT_SUPERVISOR_FLEET_* credentials "
                   "(default: when AGENT_SUPERVISOR_FLEET_ENDPOINTS is set).")
@click.pass_context
def console(ctx: click.Context, port: int, max_clients: int, poll_period: float,
            fleet: bool | None) -> None:
    """Serve the web console on 127.0.0.1 and print its URL once.

    The URL carries a one-time token: the first browser that opens it gets a session cookie
    (HttpOnly, SameSite=Strict) and the token is spent. Every action goes to the daemon's
    control socket as you, so your role decides what the console may do."""
    import os

    from supervisor.console import ConsoleConfig, serve

    if fleet is None:
        fleet = bool(os.environ.get("AGENT_SUPERVISOR_FLEET_ENDPOINTS"))
    missing = [f"AGENT_SUPERVISOR_FLEET_{name}" for name in
               ("ENDPOINTS", "CA", "CERT", "KEY", "USER", "PASSWORD_FILE")
               if fleet and not os.environ.get(f"AGENT_SUPERVISOR_FLEET_{name}")]
    if missing:
        raise click.UsageError(f"the fleet view needs {', '.join(missing)} (docs/fleet.md), "
                               f"as agentctl fleet does; or --no-fleet")

    socket_path = Path(ctx.find_root().params["socket_path"])
    serve(ConsoleConfig(socket_path=str(socket_path), port=port, max_streams=max_clients,
                        poll_period=poll_period, fleet=fleet))
