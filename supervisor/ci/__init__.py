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
# Where copies of checkouts owned by root or a system user go (ci/checkout_copy.py): on disk (a
# checkout can be far larger than /run's tmpfs, and a reflink copy needs the checkout's file
# system, which /var shares more often than /run), reached through root's directories alone.
# Not in /var/tmp, where any local user could make the directory first, and runs were then
# refused until root removed it; nor in the daemon's state directory, which uninstalling keeps
# (its audit log), where copies are what a crashed run left.
COPY_ROOT_ENV_VAR = "AGENT_SUPERVISOR_CI_COPY_ROOT"
DEFAULT_COPY_ROOT = "/var/lib/agent-supervisor-ci"


def printable(text: str) -> str:
    """`text` as UTF-8 can carry it to the job's log, a summary or an annotation: each byte of
    a name that is not UTF-8 (a lone surrogate, as `os.fsdecode` gives it) written as `\\xff`.
    The report keeps the name whole (its JSON escapes the surrogate, `ci/report.py`)."""
    try:
        text.encode()
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
