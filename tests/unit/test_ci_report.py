"""The signed CI report (supervisor/ci/report.py), its summary, the run's ending and the exit
statuses of embedded runs (supervisor/ci/outcome.py). Real Ed25519 keys; no root."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest

from supervisor import errors
from supervisor.ci import outcome, report
from supervisor.ci.outcome import ENDING_OF_CAUSE, Ending, ending_of, exit_status
from supervisor.errors import SigningKeyInvalid
from supervisor.states import EndCause


def sample_report() -> dict[str, Any]:
    return {
        "schema": report.SCHEMA, "ending": "exited", "end_reason": "exited",
        "exit_status": 83, "agent_exit_status": 0, "duration_ms": 1234.5,
        "run": {"id": "abc", "command": ["sh", "-c", "edit"], "profile": "coding-agent"},
        "resources": {"peak_memory_bytes": 3 * 1024**2, "peak_processes": 4,
                      "cpu_seconds": 0.5},
        "denied_syscalls": {"count": 2, "by_syscall": {"unshare": 2}},
        "network": {"mode": "none"}, "egress": None,
        "manifest": {"changes": [{"path": "loot.txt", "change": "created"}]},
        "scope": {"allowed": ["src/**"], "violations": [
            {"path": "loot.txt", "why": "created outside --allow-changes"}]},
        "audit": {"head_hash": "f" * 64, "rows": 5, "intact": True},
        "teardown": {"clean": True, "residue": {}},
    }


def with_calls(data: dict[str, Any], count: int = 2) -> dict[str, Any]:
    """A gateway run's egress with its model calls, as the gateway lists them."""
    call = {"ts": 1_767_225_600.0, "method": "POST", "route": "anthropic",
            "path": "/v1/messages", "status": 200, "request_bytes": 2048,
            "reply_bytes": 900, "tokens": 150, "duration_ms": 812.4}
    data["network"] = {"mode": "gateway"}
    data["egress"] = {"calls": count, "bytes": 5896, "tokens": 150 * count,
                      "model_calls": {"calls": [dict(call) for _ in range(count)],
                                      "unrecorded": 0}}
    return data


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    private, public = tmp_path / "k", tmp_path / "k.pub"
    report.write_key_pair(report.generate_key(), private, public)
    return private, public


def test_a_signed_report_verifies_with_its_key_only(keys: tuple[Path, Path],
                                                    tmp_path: Path) -> None:
    private, public = keys
    assert os.stat(private).st_mode & 0o777 == 0o600
    signed = report.sign(sample_report(), report.load_private_key(private), ephemeral=False)
    assert report.verify(signed, report.load_public_key(public))["ok"]
    other_private, other_public = tmp_path / "o", tmp_path / "o.pub"
    report.write_key_pair(report.generate_key(), other_private, other_public)
    wrong = report.verify(signed, report.load_public_key(other_public))
    assert not wrong["ok"] and wrong["problem"] == "signed by another key"
    # Re-signing with another key and keeping the embedded public key does not help.
    forged = report.sign(sample_report(), report.load_private_key(other_private),
                         ephemeral=False)
    assert not report.verify(forged, report.load_public_key(public))["ok"]


@pytest.mark.parametrize("edit", [
    lambda r: r.__setitem__("exit_status", 0),
    lambda r: r["scope"]["violations"].clear(),
    lambda r: r["manifest"]["changes"].append({"path": "x", "change": "created"}),
    lambda r: r.pop("teardown"),
    lambda r: r["egress"]["model_calls"]["calls"][0].__setitem__("tokens", 1),
    lambda r: r["egress"]["model_calls"]["calls"].pop(),
])
def test_any_edit_after_signing_is_detected(keys: tuple[Path, Path], edit: Any) -> None:
    private, public = keys
    signed = report.sign(with_calls(sample_report()), report.load_private_key(private),
                         ephemeral=True)
    tampered = copy.deepcopy(signed)
    edit(tampered)
    result = report.verify(tampered, report.load_public_key(public))
    assert not result["ok"] and result["problem"] == "the report was changed after it was signed"


def test_an_unsigned_report_fails(keys: tuple[Path, Path]) -> None:
    result = report.verify(sample_report(), report.load_public_key(keys[1]))
    assert not result["ok"] and "no Ed25519 signature" in result["problem"]


def test_bad_keys_are_structured_errors(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    (tmp_path / "junk").write_text("not a key\n")
    with pytest.raises(SigningKeyInvalid):
        report.load_private_key(tmp_path / "junk")
    with pytest.raises(SigningKeyInvalid):
        report.load_public_key(tmp_path / "missing.pub")
    with pytest.raises(SigningKeyInvalid):  # a public key where the private one belongs
        report.load_private_key(keys[1])


def test_the_summary_names_the_verdict_violations_and_egress() -> None:
    text = report.summary_markdown(sample_report())
    assert "FAILED" in text and "`loot.txt`: created outside --allow-changes" in text
    assert "unshare x2" in text and "none possible (network mode `none`)" in text
    assert "3.0 MiB" in text


def test_exit_statuses_do_not_collide_with_agentctl_errors() -> None:
    # 84 is the supervisor error's, and its kinds' (watchdog_lost): a run that ended so.
    taken = {cls.exit_status for cls in errors.error_classes()
             if not issubclass(cls, errors.EmbeddedRunFailed)}
    assert errors.WatchdogLost.exit_status == outcome.EXIT_SUPERVISOR_ERROR
    ours = {outcome.EXIT_KILLED, outcome.EXIT_TRIPWIRE, outcome.EXIT_TIMEOUT,
            outcome.EXIT_SCOPE_VIOLATION, outcome.EXIT_SUPERVISOR_ERROR}
    assert len(ours) == 5 and ours.isdisjoint(taken | {0, 1, 126, 127, 137})


def test_precedence_of_exit_statuses() -> None:
    assert exit_status(Ending.EXITED, 3, scope_violation=False, supervisor_error=False) == 3
    assert exit_status(Ending.EXITED, 0, scope_violation=True, supervisor_error=False) == 83
    assert exit_status(Ending.TRIPWIRE, 137, scope_violation=False,
                       supervisor_error=False) == 81
    assert exit_status(Ending.TIMEOUT, 137, scope_violation=True, supervisor_error=False) == 83
    assert exit_status(Ending.KILLED, 137, scope_violation=True, supervisor_error=True) == 84
    assert exit_status(Ending.NOT_STARTED, None, scope_violation=False, supervisor_error=False,
                       launch_error_status=10) == 10


def test_endings_come_from_the_run_end_cause_never_from_its_reason() -> None:
    assert ending_of(EndCause.TRIPWIRE) is Ending.TRIPWIRE
    assert ending_of(EndCause.TIMEOUT) is Ending.TIMEOUT
    assert ending_of(EndCause.EXITED) is Ending.EXITED
    for cause in (EndCause.KILLED, EndCause.BREAK_GLASS, EndCause.SHUTDOWN, EndCause.REAPED):
        assert ending_of(cause) is Ending.KILLED
    # An operator whose reason reads like a timeout did not make the run time out.
    assert ending_of("killed") is Ending.KILLED
    assert ending_of(None) is Ending.KILLED and ending_of("no such cause") is Ending.KILLED
    assert set(EndCause) >= set(ENDING_OF_CAUSE)


def test_the_summary_lists_the_model_calls_and_says_how_many_it_left_out() -> None:
    text = report.summary_markdown(with_calls(sample_report()))
    assert "**Model calls (2)**" in text
    assert text.count("| 00:00:00 | `POST anthropic /v1/messages` | 200 | 2.0 KiB / 900 B | "
                      "150 | 812 |") == 2
    many = with_calls(sample_report(), count=25)
    many["egress"]["model_calls"]["unrecorded"] = 3
    text = report.summary_markdown(many)
    assert "**Model calls (28)**" in text and text.count("`POST anthropic") == 20
    assert "5 more listed in the report, 3 beyond its list" in text
    assert "Model calls" not in report.summary_markdown(sample_report())


def test_names_that_are_not_utf8_are_signed_as_the_reports_file_holds_them(
        keys: tuple[Path, Path], tmp_path: Path) -> None:
    """A path with bytes that are not UTF-8 reaches the report as `os.fsdecode` gives it (lone
    surrogates): signing it raised UnicodeEncodeError, and the run wrote no report at all. Its
    canonical form escapes each surrogate as the report's JSON file does, the signature
    survives the file's round trip, another byte is another signature, and a report without
    such a name is signed over the same bytes as before."""
    import json

    private, public = keys
    plain = sample_report()
    assert report.canonical(plain) == json.dumps(
        plain, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    odd = sample_report()
    name = os.fsdecode(b"caf\xc3\xa9/loot_\xff.txt")  # é is UTF-8; \xff is not
    odd["scope"]["violations"][0]["path"] = name
    body = report.canonical(odd)
    assert "café/loot_\\udcff.txt".encode() in body  # valid UTF-8, é kept raw
    body.decode()
    signed = report.sign(odd, report.load_private_key(private), ephemeral=False)
    on_disk = tmp_path / "report.json"
    on_disk.write_text(json.dumps(signed, indent=2, sort_keys=True))
    read_back = json.loads(on_disk.read_text())
    assert read_back["scope"]["violations"][0]["path"] == name
    assert report.verify(read_back, report.load_public_key(public))["ok"]
    read_back["scope"]["violations"][0]["path"] = os.fsdecode(b"caf\xc3\xa9/loot_\xfe.txt")
    assert not report.verify(read_back, report.load_public_key(public))["ok"]
    summary = report.summary_markdown(signed)
    assert "loot_\\xff.txt" in summary
    summary.encode()
