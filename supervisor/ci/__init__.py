"""CI mode's evidence of one embedded run: the workspace manifest and scope guard, the signed
report and its summary. File I/O and Ed25519 signing only; no privilege of its own."""

# How `agentctl run --embedded` hands its run to the one-shot supervisor (supervisor/ci/spec.py
# has the schema). Here, import-free, because agentctl reads them and must start fast.
ENV_VAR = "AGENT_SUPERVISOR_EMBEDDED_RUN"
# Where embedded runs keep their state (one directory per slot, removed at the end).
ROOT_ENV_VAR = "AGENT_SUPERVISOR_CI_ROOT"
DEFAULT_ROOT = "/run/agent-supervisor-ci"
# The signed report's schema (ci/report.py), which every run's report names; here so that a run
# without --report or --summary does not load the signing module.
REPORT_SCHEMA = "agent-supervisor/ci-report/v1"
# Where copies of checkouts owned by root or a system user go (ci/checkout_copy.py).
COPY_ROOT_ENV_VAR = "AGENT_SUPERVISOR_CI_COPY_ROOT"
DEFAULT_COPY_ROOT = "/var/tmp/agent-supervisor-ci"
