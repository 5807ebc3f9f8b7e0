"""The CI report: one JSON document signed with Ed25519 over its canonical form, and its
Markdown summary for $GITHUB_STEP_SUMMARY. `cryptography` is imported only to sign or verify,
so agentctl's other commands do not pay for it. No privilege."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from supervisor.ci import REPORT_SCHEMA, printable
from supervisor.errors import ReportInvalid, SigningKeyInvalid

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

SCHEMA = REPORT_SCHEMA
ALGORITHM = "ed25519"


def canonical(report: dict[str, Any]) -> bytes:
    """What the signature covers: every field but `signature`, keys sorted, no whitespace,
    UTF-8. A path whose bytes are not UTF-8 reaches the report as Python decodes it
    (`os.fsdecode`: each such byte a lone surrogate, U+DC80-U+DCFF), which no UTF-8 text
    holds: each lone surrogate is written as its JSON escape (`\\udcff`), as the report's
    file holds it, so such a report is signed and verified like any other, and a report
    without one is the same bytes as ever."""
    body = {k: v for k, v in report.items() if k != "signature"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    try:
        return text.encode()
    except UnicodeEncodeError:  # lone surrogates appear only inside strings: escaped there
        return _LONE_SURROGATE.sub(lambda found: f"\\u{ord(found[0]):04x}", text).encode()


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def key_id(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()[:16]


def _public_raw(key: Ed25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives import serialization
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def generate_key() -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    return Ed25519PrivateKey.generate()


def write_key_pair(key: Ed25519PrivateKey, private_path: Path, public_path: Path) -> None:
    """Private key PKCS#8 PEM created 0600 (never world-readable, not even for a moment)."""
    from cryptography.hazmat.primitives import serialization
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private_pem)
    public_path.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


def _read_key(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SigningKeyInvalid(f"cannot read {what} {path}: {exc.strerror}",
                                path=str(path)) from exc


def _parse_key(path: Path, what: str, parse: Callable[[], object], wanted: Any) -> Any:
    try:
        key = parse()
    except (ValueError, TypeError) as exc:
        raise SigningKeyInvalid(f"{path} is not a usable {what}: {exc}", path=str(path)) from exc
    if not isinstance(key, wanted):
        raise SigningKeyInvalid(f"{path} is not an Ed25519 {what}", path=str(path),
                                key_type=type(key).__name__)
    return key


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """An unencrypted PEM (PKCS#8) Ed25519 private key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    data = _read_key(path, "signing key")
    key: Ed25519PrivateKey = _parse_key(path, "private key (unencrypted PEM)",
                      lambda: serialization.load_pem_private_key(data, password=None),
                      Ed25519PrivateKey)
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """A PEM public key, or an OpenSSH `ssh-ed25519 ...` line."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    data = _read_key(path, "public key")
    key: Ed25519PublicKey = _parse_key(path, "public key (PEM or OpenSSH)",
                      lambda: (serialization.load_ssh_public_key(data) if data.startswith(b"ssh-")
                               else serialization.load_pem_public_key(data)),
                      Ed25519PublicKey)
    return key


def sign(report: dict[str, Any], key: Ed25519PrivateKey, *, ephemeral: bool) -> dict[str, Any]:
    """`report` with its `signature`. An ephemeral key (no --signing-key) proves only that the
    report was not edited after signing by someone without that key; pin a key to trust it."""
    public_raw = _public_raw(key.public_key())
    signed = {k: v for k, v in report.items() if k != "signature"}
    signed["signature"] = {
        "algorithm": ALGORITHM, "key_id": key_id(public_raw), "ephemeral_key": ephemeral,
        "public_key": base64.b64encode(public_raw).decode(),
        "value": base64.b64encode(key.sign(canonical(signed))).decode(),
    }
    return signed


def read_report(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except OSError as exc:
        raise ReportInvalid(f"cannot read report {path}: {exc.strerror}", path=str(path)) from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReportInvalid(f"{path} is not JSON: {exc}", path=str(path)) from exc
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ReportInvalid(f"{path} is not an agent-supervisor CI report ({SCHEMA})",
                            path=str(path))
    return data


def verify(report: dict[str, Any], key: Ed25519PublicKey) -> dict[str, Any]:
    """{ok, problem?, key_id}: checked against the key the reviewer trusts, never against the
    public key the report carries (anyone can re-sign with a key of their own)."""
    from cryptography.exceptions import InvalidSignature
    expected = key_id(_public_raw(key))
    signature = report.get("signature")
    if not isinstance(signature, dict) or signature.get("algorithm") != ALGORITHM:
        return {"ok": False, "key_id": expected, "problem": "the report carries no Ed25519 "
                                                            "signature"}
    try:
        value = base64.b64decode(str(signature.get("value", "")), validate=True)
        key.verify(value, canonical(report))
    except (ValueError, InvalidSignature):
        problem = ("signed by another key" if signature.get("key_id") != expected
                   else "the report was changed after it was signed")
        return {"ok": False, "key_id": expected, "problem": problem}
    return {"ok": True, "key_id": expected}


def verify_commits(report: dict[str, Any], repo: Path, rev: str) -> dict[str, Any]:
    """{ok, commits, problem?}: the report's provenance checked against `repo` (see
    supervisor/ci/provenance.py). Call only on a report whose signature holds."""
    from supervisor.ci import provenance

    recorded = report.get("provenance")
    if not isinstance(recorded, dict) or "commits" not in recorded:
        why = (recorded or {}).get("error") if isinstance(recorded, dict) else None
        return {"ok": False, "commits": None, "problem": "the report records no commits"
                + (f" ({why})" if why else " (the workspace was not a git checkout)")}
    try:
        problems = provenance.check(repo, recorded, rev)
    except provenance.GitUnavailable as exc:
        problems = [f"cannot read {repo}: {exc}"]
    result: dict[str, Any] = {"ok": not problems, "commits": len(recorded["commits"])}
    if problems:
        result.update(problem="; ".join(problems), problems=problems)
    return result


def _size(value: int | None) -> str:
    if value is None:
        return "-"
    amount = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if amount < 1024 or unit == "GiB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    return str(value)


def total(section: dict[str, Any], name: str) -> int:
    """How many entries a list of the report has in all: its `<name>_total` (the list itself
    holds the first ones only, ci/manifest.py `Listed`), or its length in a report without."""
    count = section.get(f"{name}_total")
    return count if isinstance(count, int) else len(section.get(name) or [])


def summary_markdown(report: dict[str, Any]) -> str:
    """A short Markdown summary of a report, for $GITHUB_STEP_SUMMARY or a merge request."""
    verdict = "passed" if report["exit_status"] == 0 else "FAILED"
    run = report["run"]
    peaks = report.get("resources") or {}
    scope = report.get("scope") or {}
    manifest = report.get("manifest") or {}
    lines = [
        f"### agent-supervisor: `{' '.join(run['command'])}` {verdict}",
        "",
        "| | |", "|---|---|",
        f"| ending | **{report['ending']}** ({report.get('end_reason') or '-'}) |",
        f"| agentctl exit status | {report['exit_status']} (agent: "
        f"{report.get('agent_exit_status', '-')}) |",
        f"| duration | {report['duration_ms'] / 1000:.1f} s |",
        f"| profile | {run['profile']} |",
        f"| peak memory / processes | {_size(peaks.get('peak_memory_bytes'))} / "
        f"{peaks.get('peak_processes', '-')} |",
        f"| CPU seconds | {peaks.get('cpu_seconds', '-')} |",
        f"| denied syscalls | {_denied_text(report.get('denied_syscalls'))} |",
        f"| egress | {_egress_text(report)} |",
        f"| files changed | {total(manifest, 'changes')} |",
        f"| audit chain head | `{(report.get('audit') or {}).get('head_hash', '-')[:16]}` |",
    ]
    violations = scope.get("violations") or []
    if count := total(scope, "violations"):
        lines += ["", f"**Scope violations ({count})**: changes outside "
                      f"`{', '.join(scope.get('allowed') or ['**'])}`", ""]
        lines += [f"- `{v['path']}`: {v['why']}" for v in violations[:50]]
        if count > 50:
            lines.append(f"- ... and {count - 50} more (see the report)")
    lines += _calls_table(report)
    if report.get("teardown", {}).get("residue"):
        lines += ["", f"**Teardown left things behind**: `{report['teardown']['residue']}`"]
    if (report.get("watchdog") or {}).get("weakens_containment"):
        lines += ["", f"**The kill switch is within the OOM killer's reach**: "
                      f"{report['watchdog']['why']}"]
    signature = report.get("signature") or {}
    lines += ["", f"Report signed with Ed25519 key `{signature.get('key_id', '-')}`"
                  f"{' (ephemeral)' if signature.get('ephemeral_key') else ''}; check it with "
                  f"`agentctl report verify REPORT --key PUB`.", ""]
    return printable("\n".join(lines))



def _calls_table(report: dict[str, Any], shown: int = 20) -> list[str]:
    """The model calls the agent made through the gateway's routes, first `shown` of them."""
    logged = (report.get("egress") or {}).get("model_calls") or {}
    calls = logged.get("calls") or []
    if not calls:
        return []
    lines = ["", f"**Model calls ({len(calls) + int(logged.get('unrecorded') or 0)})**", "",
             "| time (UTC) | call | status | sent / received | tokens | ms |",
             "|---|---|---|---|---|---|"]
    for call in calls[:shown]:
        when = time.strftime("%H:%M:%S", time.gmtime(call["ts"]))
        lines.append(f"| {when} | `{call['method']} {call['route']} {call['path']}` | "
                     f"{call['status'] if call['status'] is not None else '-'} | "
                     f"{_size(call['request_bytes'])} / {_size(call['reply_bytes'])} | "
                     f"{call['tokens'] if call['tokens'] is not None else '-'} | "
                     f"{call['duration_ms']:.0f} |")
    if len(calls) > shown or logged.get("unrecorded"):
        lines.append(f"| ... | {len(calls) - min(len(calls), shown)} more listed in the "
                     f"report, {logged.get('unrecorded') or 0} beyond its list | | | | |")
    return lines


def _denied_text(denied: dict[str, Any] | None) -> str:
    if denied is None:
        return "not observed (no seccomp notify on this host; still denied)"
    by_name = denied.get("by_syscall") or {}
    if not by_name:
        return "0"
    return f"{denied['count']} ({', '.join(f'{k} x{v}' for k, v in sorted(by_name.items()))})"


def _egress_text(report: dict[str, Any]) -> str:
    egress = report.get("egress")
    mode = (report.get("network") or {}).get("mode", "?")
    if egress is None:
        return f"none possible (network mode `{mode}`)"
    parts = [f"{key.replace('_', ' ')} {value}" for key, value in sorted(egress.items())
             if isinstance(value, int | float | str)]
    return f"mode `{mode}`: " + (", ".join(parts) or "-")
