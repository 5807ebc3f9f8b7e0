"""Limits of the control API that both sides state: the models validate them, agentctl checks
them before sending. Import-free, so agentctl need not build the pydantic models to start."""

REASON_MAX = 500  # characters of an operator's reason, recorded in the audit log
