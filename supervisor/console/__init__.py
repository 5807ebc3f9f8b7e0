"""The web console: a loopback web UI that forwards every action to the control socket as the
operator who started it. No privilege of its own beyond that operator's access to the socket."""

from __future__ import annotations

__all__ = ["ConsoleConfig", "serve"]

from supervisor.console.app import ConsoleConfig, serve
