"""agentctl, the operator CLI."""
