"""The exit statuses the docs promise are the ones the code returns (issue 13): docs/ci.md's
"Exit statuses" table, the README's sentence on embedded runs and action.yml's `exit-status`
output name exactly the statuses of supervisor/ci/outcome.py and the errors a run is refused
with (errors.launch_exit_status: 125 for the supervisor's own failures, not the 10 an
EnforcementError has elsewhere), and every error code a row names exits with that row's status.
No root, no I/O beyond reading the files."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from supervisor.ci import outcome
from supervisor.cli.manpage import _EXIT_STATUSES
from supervisor.errors import (
    LAUNCH_FAILED_EXIT,
    CommandNotExecutable,
    CommandNotFound,
    ConfigInvalid,
    DiskSpaceLow,
    EmbeddedNeedsRoot,
    EnforcementError,
    InvalidRequest,
    error_class_for,
    launch_exit_status,
)

ROOT = Path(__file__).resolve().parents[2]

# What an embedded run exits with besides the agent's own status, from the code.
ENDINGS = {outcome.EXIT_KILLED, outcome.EXIT_TRIPWIRE, outcome.EXIT_TIMEOUT,
           outcome.EXIT_SCOPE_VIOLATION, outcome.EXIT_SUPERVISOR_ERROR}
REFUSALS = {launch_exit_status(cls("x")) for cls in (
    EnforcementError, CommandNotExecutable, CommandNotFound, EmbeddedNeedsRoot, InvalidRequest,
    DiskSpaceLow, ConfigInvalid)}


def statuses(text: str) -> set[int]:
    """Every status a text names: single numbers and ranges (80-84)."""
    found: set[int] = set()
    for low, high in re.findall(r"\b(\d{1,3})(?:-(\d{1,3}))?\b", text):
        found.update(range(int(low), int(high or low) + 1))
    return found


def table() -> list[tuple[set[int], str]]:
    text = (ROOT / "docs/ci.md").read_text()
    section = text.split("## Exit statuses", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith("| status"):
            first, meaning = line.strip("|").split("|", 1)
            if first.strip() != "the agent's own":
                rows.append((statuses(first), meaning))
    return rows


def test_the_code_refuses_with_125_to_127_not_10() -> None:
    assert {125, 126, 127, 5, 6, 13, 78} == REFUSALS
    assert LAUNCH_FAILED_EXIT == 125 and EnforcementError.exit_status == 10


def test_docs_ci_md_lists_exactly_the_codes_statuses() -> None:
    documented = set().union(*(numbers for numbers, _ in table()))
    assert documented == ENDINGS | REFUSALS


def test_each_error_code_in_the_table_exits_with_its_rows_status() -> None:
    named = 0
    for numbers, meaning in table():
        for code in re.findall(r"`([a-z]+(?:_[a-z]+)+)`", meaning):
            cls = error_class_for(code)
            assert cls.code == code, f"{code} is no error code"
            assert launch_exit_status(cls("x")) in numbers, (code, numbers)
            named += 1
    assert named >= 10


def test_the_readme_and_the_action_say_the_same() -> None:
    readme = (ROOT / "README.md").read_text()
    sentence = readme.split("Embedded runs exit with", 1)[1].split('"Exit statuses")', 1)[0]
    assert statuses(sentence) == ENDINGS | REFUSALS
    assert "owned by root)" not in sentence and "10 enforcement" not in sentence
    action = yaml.safe_load((ROOT / "action.yml").read_text())
    assert statuses(action["outputs"]["exit-status"]["description"]) == ENDINGS | REFUSALS


def test_the_man_page_lists_every_status_a_run_exits_with() -> None:
    assert statuses(" ".join(status for status, _ in _EXIT_STATUSES)) >= ENDINGS | REFUSALS
