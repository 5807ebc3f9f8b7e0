"""Provenance of the commits an agent made: which commits a run created (hash, parents, tree,
files, author and committer as git recorded them), for the signed CI report, and the check of a
report's commits against a repository (`agentctl report verify --repo`).

It runs the host's git read-only on a checkout an agent wrote: only plumbing that runs no
configured program (rev-parse, for-each-ref, rev-list, cat-file, diff-tree without textconv or
external diff), with the system and global config ignored, hooks, fsmonitor and pagers off, and
the repository named explicitly. No privilege of its own (agentctl's caller, or the one-shot
supervisor as root after every agent process is gone)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

# A run's report lists at most this many commits (each with at most MAX_FILES paths); past
# that it says how many there were, and `verify` cannot vouch for the rest.
MAX_COMMITS = 500
MAX_FILES = 2000
_TIMEOUT = 60.0
_SAFE = ("-c", "core.fsmonitor=false", "-c", "core.hooksPath=/dev/null", "-c",
         "core.pager=cat", "-c", "diff.external=", "-c", "safe.directory=*",
         "--no-replace-objects")


class GitUnavailable(Exception):
    pass


def _git(repo: Path, *args: str, check: bool = True) -> str:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "GIT_CONFIG_NOSYSTEM": "1",
           "GIT_CONFIG_GLOBAL": "/dev/null", "HOME": "/nonexistent", "LC_ALL": "C",
           "GIT_TERMINAL_PROMPT": "0", "GIT_OPTIONAL_LOCKS": "0"}
    git_dir = repo / ".git"
    try:
        result = subprocess.run(
            ["git", *_SAFE, f"--git-dir={git_dir}", f"--work-tree={repo}", *args],
            capture_output=True, encoding="utf-8", errors="surrogateescape", env=env,
            timeout=_TIMEOUT, check=False,
            stdin=subprocess.DEVNULL, cwd="/")
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GitUnavailable(f"git {args[0]}: {exc}") from exc
    if check and result.returncode != 0:
        raise GitUnavailable(f"git {' '.join(args[:2])}: {result.stderr.strip()[:300]}")
    return result.stdout


def is_repository(workspace: Path) -> bool:
    """A checkout with its own .git directory (a .git file pointing elsewhere is not
    followed: the agent could point it anywhere)."""
    return (workspace / ".git").is_dir() and not (workspace / ".git").is_symlink()


def refs(repo: Path) -> dict[str, str]:
    """Every ref (and HEAD) and the commit it names."""
    found: dict[str, str] = {}
    listing = _git(repo, "for-each-ref", "--format=%(objectname) %(objecttype) %(refname)")
    for line in listing.splitlines():
        name, kind, ref = line.split(" ", 2)
        if kind == "commit":
            found[ref] = name
    head = _git(repo, "rev-parse", "--verify", "-q", "HEAD^{commit}", check=False).strip()
    if head:
        found["HEAD"] = head
    return found


def commit_record(repo: Path, commit: str) -> dict[str, Any]:
    """What git says a commit is: its tree, parents, author, committer, subject, and the paths
    it changed against its first parent (all of them for a root commit)."""
    raw = _git(repo, "cat-file", "commit", commit)
    header, _, message = raw.partition("\n\n")
    record: dict[str, Any] = {"hash": commit, "tree": "", "parents": []}
    for line in header.splitlines():
        key, _, value = line.partition(" ")
        if key == "tree":
            record["tree"] = value
        elif key == "parent":
            record["parents"].append(value)
        elif key in ("author", "committer"):
            record[key] = value
    record["subject"] = message.split("\n", 1)[0][:200]
    names = _git(repo, "diff-tree", "--no-commit-id", "--no-textconv", "--no-ext-diff", "-r",
                 "--root", "-z", "--name-status", "--diff-merges=first-parent", commit)
    fields = [f for f in names.split("\0") if f]
    files: list[dict[str, str]] = []
    index = 0
    while index + 1 < len(fields):
        status = fields[index]
        if status[:1] in ("R", "C") and index + 2 < len(fields):
            files.append({"status": status[:1], "path": fields[index + 2],
                          "from": fields[index + 1]})
            index += 3
        else:
            files.append({"status": status[:1], "path": fields[index + 1]})
            index += 2
    record["files"] = files[:MAX_FILES]
    if len(files) > MAX_FILES:
        record["files_total"] = len(files)
    return record


def new_commits(repo: Path, before: dict[str, str], after: dict[str, str]) -> list[str]:
    """Commits reachable from a ref now that no ref reached before, oldest first."""
    tips = sorted(set(after.values()))
    if not tips:
        return []
    known = sorted(set(before.values()))
    listing = _git(repo, "rev-list", "--topo-order", "--reverse", *tips, "--not", *known)
    return listing.split()


def collect(repo: Path, before: dict[str, str], *, run_id: str | None, agent: str
            ) -> dict[str, Any]:
    """The report's `provenance`: the commits the run created, bound to the run and the agent
    (the report's signature covers it)."""
    after = refs(repo)
    commits = new_commits(repo, before, after)
    changed = {ref: {"before": before.get(ref), "after": after.get(ref)}
               for ref in sorted(before.keys() | after.keys()) if before.get(ref) != after.get(ref)}
    return {"run": run_id, "agent": agent, "repository": str(repo),
            "head_before": before.get("HEAD"), "head_after": after.get("HEAD"),
            "refs_changed": changed, "commits_total": len(commits),
            "commits": [commit_record(repo, c) for c in commits[:MAX_COMMITS]]}


def check(repo: Path, provenance: dict[str, Any], rev: str = "HEAD") -> list[str]:
    """Problems with a report's commits in `repo`: each listed commit must exist with the same
    parents, tree and files, and the commits `rev` has on top of the run's starting head must be
    exactly the listed ones (none rewritten, none added). [] when it all holds."""
    problems: list[str] = []
    listed = provenance.get("commits") or []
    if provenance.get("commits_total", len(listed)) != len(listed):
        problems.append(f"the report lists {len(listed)} of {provenance['commits_total']} "
                        f"commits; the rest cannot be checked")
    for entry in listed:
        commit = str(entry.get("hash", ""))
        try:
            actual = commit_record(repo, commit)
        except GitUnavailable:
            problems.append(f"commit {commit} is not in the repository")
            continue
        for key in ("tree", "parents", "files", "author", "committer"):
            if actual.get(key) != entry.get(key):
                problems.append(f"commit {commit}: {key} differs from the report")
    resolved = _git(repo, "rev-parse", "--verify", "-q", f"{rev}^{{commit}}",
                    check=False).strip()
    if not resolved:
        problems.append(f"{rev} does not name a commit in the repository")
        return problems
    base = provenance.get("head_before")
    listing = _git(repo, "rev-list", "--topo-order", "--reverse", resolved,
                   *(["--not", base] if base else []), check=False).split()
    listed_hashes = [str(e.get("hash")) for e in listed]
    extra = [c for c in listing if c not in listed_hashes]
    missing = [c for c in listed_hashes if c not in listing]
    if extra:
        problems.append(f"{rev} has {len(extra)} commit(s) on top of the run's starting head "
                        f"that the report does not list: {', '.join(c[:12] for c in extra[:5])}")
    if missing:
        problems.append(f"{len(missing)} listed commit(s) are not in {rev}'s history: "
                        f"{', '.join(c[:12] for c in missing[:5])}")
    return problems
