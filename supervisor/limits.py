"""Limits of the control API that both sides state: the models validate them, agentctl checks
them before sending. Import-free, so agentctl need not build the pydantic models to start."""

REASON_MAX = 500  # characters of an operator's reason, recorded in the audit log


def reason_text(text: str) -> str:
    """An operator's reason as UTF-8 can carry it: each unpaired UTF-16 surrogate becomes
    U+FFFD, the rest is unchanged (so is the length). Argv bytes that are not UTF-8 reach
    Python as such surrogates (surrogateescape); sent as they are, the daemon refused the
    request (invalid_request), and a kill must never fail on its reason. agentctl sends a
    reason this way and the daemon reads one this way (a client's JSON "\\udcff" too)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "".join("\ufffd" if "\ud800" <= char <= "\udfff" else char for char in text)
    return text
