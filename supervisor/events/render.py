"""An event's delivery body: the event as JSON, or a Slack message with a state badge.
No I/O, no privilege."""

from __future__ import annotations

import json
from typing import Any, Literal

from supervisor.events.mapping import Event

_SLACK_BADGE = {
    "agent.launched": ":large_green_circle:",
    "agent.paused": ":large_yellow_circle:",
    "agent.resumed": ":large_green_circle:",
    "agent.killed": ":red_circle:",
    "agent.reactivated": ":large_blue_circle:",
    "agent.exited": ":white_circle:",
    "tripwire.fired": ":rotating_light:",
    "drill.completed": ":fire_engine:",
    "approval.requested": ":raised_hand:",
}


def _mrkdwn(text: str) -> str:
    """Slack's three control characters; everything else is literal."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# How the summary line says what happened, by audit verb (default: the event type's verb).
_PHRASE = {"stop": "stopped", "shutdown": "stopped", "kill_confirmed": "kill confirmed"}


def summary(event: Event) -> str:
    """One readable line, e.g. ":red_circle: agent `x` killed by alice(uid=1000) (runaway)
    in 12.3 ms on host1"."""
    subject = f"agent `{_mrkdwn(event.agent)}`" if event.agent else _mrkdwn(event.scope)
    if event.type.startswith("agent."):
        line = f"{subject} {_PHRASE.get(event.verb, event.type.partition('.')[2])}"
    else:
        line = f"{event.type.replace('.', ' ')}: {subject}"
    if event.verb == "exit":
        code = event.detail.get("exit_code")
        line += f" with status {code}" if code is not None else ""
    else:
        line += f" by {_mrkdwn(event.actor)}"
    if event.reason:
        line += f" ({_mrkdwn(event.reason)})"
    if event.time_to_halt_ms is not None:
        line += f" in {event.time_to_halt_ms:.1f} ms"
    if event.outcome != "ok":
        line += f" [{_mrkdwn(event.outcome)}]"
    return f"{_SLACK_BADGE.get(event.type, ':grey_question:')} {line} on {_mrkdwn(event.host)}"


def slack_message(event: Event) -> dict[str, Any]:
    """A Slack incoming-webhook message: `text` for notifications, `blocks` for the channel."""
    text = summary(event)
    facts = [f"`{event.type}`", f"id `{event.id}`", f"audit #{event.audit_seq}"]
    if event.run:
        facts.append(f"run `{event.run}`")
    if event.previous_state or event.new_state:
        facts.append(f"{event.previous_state or '?'} → {event.new_state or '?'}")
    return {
        "text": text,
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": text}},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": " · ".join(facts)}]},
        ],
    }


def render(event: Event, fmt: Literal["json", "slack"]) -> bytes:
    if fmt == "slack":
        return json.dumps(slack_message(event), ensure_ascii=False).encode()
    return event.model_dump_json().encode()
