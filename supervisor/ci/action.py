"""The runner-side half of the GitHub Action (action.yml) and the GitLab template: run
`agentctl run --embedded` with the step's inputs, then turn its signed report into step outputs
($GITHUB_OUTPUT), workflow-command annotations on the offending files, and the same exit status.
Runs as root (it starts the embedded supervisor); writes only $GITHUB_OUTPUT and stdout.

    python -I -m supervisor.ci.action     # inputs from INPUT_* variables, as Actions passes them

`-I` always: it runs as root in the job's checkout, which an agent wrote, and `-m` alone puts
the current directory first on the module path.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from supervisor.ci import printable
from supervisor.ci.report import total

# At most this many annotations: GitHub shows 10 per step anyway, the report has them all.
MAX_ANNOTATIONS = 50


def _property(value: str) -> str:
    """A workflow command's property value (file=..., title=...), escaped as the runner
    expects, so a file name cannot end the command or inject another."""
    return (value.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
            .replace(":", "%3A").replace(",", "%2C"))


def _data(value: str) -> str:
    return value.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _in_repository(workspace: str | None, root: str | None) -> str:
    """The prefix that makes a report's paths (relative to the run's workspace) relative to
    the repository's root, $GITHUB_WORKSPACE, where GitHub resolves an annotation's `file`:
    "service/" for a workspace that is the repository's service/ directory; "" for the root
    itself or a workspace outside it (no file there to annotate better)."""
    if not workspace or not root:
        return ""
    relative = os.path.relpath(os.path.realpath(workspace), os.path.realpath(root))
    if relative == "." or relative == ".." or relative.startswith("../"):
        return ""
    return relative + "/"


def annotation_lines(report: dict[str, Any], repository: str | None = None) -> list[str]:
    """`::error file=PATH,title=...::why` for each scope violation, one line for a run that
    did not end well (killed, timeout, tripwire, teardown), and a `::warning` when the
    watchdog was within the OOM killer's reach where that weakens containment. `repository`:
    the repository's root ($GITHUB_WORKSPACE), which each file is named relative to."""
    lines: list[str] = []
    violations = (report.get("scope") or {}).get("violations") or []
    prefix = _in_repository((report.get("run") or {}).get("workspace"), repository)
    for item in violations[:MAX_ANNOTATIONS]:
        title = f"agent-supervisor: scope violation ({item.get('rule', 'scope')})"
        lines.append(f"::error file={_property(prefix + str(item['path']))},"
                     f"title={_property(title)}::{_data(str(item.get('why', '')))}")
    if (count := total(report.get("scope") or {}, "violations")) > MAX_ANNOTATIONS:
        lines.append(f"::error title=agent-supervisor::{count - MAX_ANNOTATIONS} "
                     f"more scope violations (see the report)")
    if report.get("ending") not in ("exited", None):
        lines.append(f"::error title={_property('agent-supervisor: run ' + report['ending'])}::"
                     f"{_data(str(report.get('end_reason') or report['ending']))}")
    if not (report.get("teardown") or {}).get("clean", True):
        lines.append("::error title=agent-supervisor::teardown left "
                     f"{_data(json.dumps(report['teardown'].get('residue')))}")
    if (report.get("watchdog") or {}).get("weakens_containment"):
        lines.append(f"::warning title={_property('agent-supervisor: kill switch exposed')}::"
                     f"{_data(str(report['watchdog'].get('why', '')))}")
    return lines


def outputs(report: dict[str, Any] | None, status: int, report_path: str) -> dict[str, str]:
    """The step's outputs, one line each."""
    if report is None:
        return {"exit-status": str(status), "ending": "not_started", "verdict": "failed",
                "report": "", "violations": "0", "changed-files": "0", "commits": "0",
                "signature-key-id": ""}
    provenance = report.get("provenance") or {}
    return {
        "exit-status": str(status),
        "ending": str(report.get("ending")),
        "verdict": "passed" if status == 0 else "failed",
        "report": report_path,
        "violations": str(total(report.get("scope") or {}, "violations")),
        "changed-files": str(total(report.get("manifest") or {}, "changes")),
        "commits": str(len(provenance.get("commits") or [])),
        "signature-key-id": str((report.get("signature") or {}).get("key_id", "")),
    }


def write_outputs(path: str, values: Mapping[str, str]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        for key, value in values.items():
            if "\n" in value:  # never: every value is one line; refuse rather than corrupt
                raise ValueError(f"output {key} spans lines")
            handle.write(f"{key}={value}\n")


def command_from_inputs(env: Mapping[str, str]) -> tuple[list[str], str]:
    """agentctl's argv from the step's inputs (INPUT_<NAME>, as the runner sets them), and the
    report path."""
    def get(name: str, default: str = "") -> str:
        return env.get(f"INPUT_{name.upper().replace('-', '_')}", default).strip() or default

    report = get("report") or str(Path(env.get("RUNNER_TEMP", "/tmp")) / "agent-report.json")
    workspace = get("workspace") or env.get("GITHUB_WORKSPACE") or env.get(
        "CI_PROJECT_DIR") or os.getcwd()
    command = get("command")
    if not command:
        raise SystemExit("agent-supervisor: the 'command' input is required")
    argv = [get("agentctl", "agentctl"), "run", "--embedded",
            "--profile", get("profile", "coding-agent"), "--workspace", workspace,
            "--report", report]
    for glob in get("allow-changes").splitlines():
        if glob.strip():
            argv += ["--allow-changes", glob.strip()]
    if timeout := get("timeout"):
        argv += ["--timeout", timeout]
    if key := get("signing-key-file"):
        argv += ["--signing-key", key]
    if summary := env.get("GITHUB_STEP_SUMMARY"):
        argv += ["--summary", summary]
    argv += shlex.split(get("args"))
    argv += ["--", "sh", "-c", command]
    return argv, report


def main() -> int:
    argv, report_path = command_from_inputs(os.environ)
    status = subprocess.run(argv, check=False).returncode
    try:
        report: dict[str, Any] | None = json.loads(Path(report_path).read_text())
    except (OSError, json.JSONDecodeError):
        report = None
    if report is not None:
        for line in annotation_lines(report, os.environ.get("GITHUB_WORKSPACE")):
            print(printable(line), flush=True)
    if github_output := os.environ.get("GITHUB_OUTPUT"):
        write_outputs(github_output, outputs(report, status, report_path))
    return status


if __name__ == "__main__":
    sys.exit(main())
