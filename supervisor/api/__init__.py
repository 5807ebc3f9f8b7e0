"""The control plane's HTTP surface: `server` (in the daemon) and `client` (in agentctl)."""
