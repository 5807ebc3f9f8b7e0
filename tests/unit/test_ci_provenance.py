"""Commit provenance (supervisor/ci/provenance.py) on real git repositories in tmp: the commits a
run created, and the check of a report's commits against a repository that was rewritten or
grown since. Also: the host's git, run on an agent's checkout, runs nothing the checkout
configures. No root."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from supervisor.ci import provenance


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=agent", "-c",
                           "user.email=agent@example.invalid", *args], check=True,
                          capture_output=True, text=True,
                          env={**os.environ, "GIT_CONFIG_GLOBAL": "/dev/null",
                               "GIT_CONFIG_NOSYSTEM": "1"}).stdout


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "a.py").write_text("a = 1\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "initial")
    return repo


def agent_commits(repo: Path) -> None:
    (repo / "a.py").write_text("a = 2\n")
    (repo / "new").mkdir()
    (repo / "new" / "b.py").write_text("b = 1\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "First")
    git(repo, "mv", "a.py", "c.py")
    git(repo, "commit", "-q", "-m", "Second")


def test_the_commits_a_run_created_with_parents_tree_and_files(repo: Path) -> None:
    before = provenance.refs(repo)
    start = before["HEAD"]
    agent_commits(repo)
    record = provenance.collect(repo, before, run_id="r1", agent="ci-agent")
    assert (record["run"], record["agent"], record["head_before"]) == ("r1", "ci-agent", start)
    first, second = record["commits"]
    assert first["parents"] == [start] and second["parents"] == [first["hash"]]
    assert first["subject"] == "First" and first["author"].startswith("agent <agent@")
    assert first["files"] == [{"status": "M", "path": "a.py"},
                              {"status": "A", "path": "new/b.py"}]
    assert first["tree"] == git(repo, "rev-parse", f"{first['hash']}^{{tree}}").strip()
    assert second["files"] == [{"status": "D", "path": "a.py"},
                               {"status": "A", "path": "c.py"}]
    assert record["head_after"] == second["hash"] == record["commits"][-1]["hash"]
    assert record["refs_changed"]["refs/heads/main"] == {"before": start,
                                                         "after": second["hash"]}
    assert provenance.check(repo, record) == []


def test_no_commits_and_a_new_branch(repo: Path) -> None:
    before = provenance.refs(repo)
    assert provenance.collect(repo, before, run_id=None, agent="a")["commits"] == []
    git(repo, "checkout", "-q", "-b", "feature")
    (repo / "f.py").write_text("f = 1\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "On a branch")
    record = provenance.collect(repo, before, run_id=None, agent="a")
    assert [c["subject"] for c in record["commits"]] == ["On a branch"]
    assert record["refs_changed"]["refs/heads/feature"]["before"] is None


def test_a_rewritten_commit_is_caught(repo: Path) -> None:
    before = provenance.refs(repo)
    agent_commits(repo)
    record = provenance.collect(repo, before, run_id="r", agent="a")
    git(repo, "commit", "-q", "--amend", "-m", "Second, reworded by someone else")
    problems = provenance.check(repo, record)
    assert any("does not list" in p for p in problems), problems
    assert any("not in HEAD's history" in p for p in problems), problems
    # Rewritten in place (same hash claimed, other content): the report's fields differ.
    forged = {**record, "commits": [{**record["commits"][0], "files": []},
                                    *record["commits"][1:]]}
    assert any("files differs" in p for p in provenance.check(repo, forged))


def test_an_extra_commit_is_caught(repo: Path) -> None:
    before = provenance.refs(repo)
    agent_commits(repo)
    record = provenance.collect(repo, before, run_id="r", agent="a")
    (repo / "later.py").write_text("x = 1\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "Slipped in after the run")
    problems = provenance.check(repo, record)
    assert len(problems) == 1 and "does not list" in problems[0], problems
    # The run's own head still checks out.
    assert provenance.check(repo, record, rev=record["head_after"]) == []


def test_a_missing_commit_and_an_unknown_rev(repo: Path) -> None:
    before = provenance.refs(repo)
    agent_commits(repo)
    record = provenance.collect(repo, before, run_id="r", agent="a")
    forged = {**record, "commits": [*record["commits"], {**record["commits"][0],
                                                         "hash": "0" * 40}]}
    assert any("not in the repository" in p for p in provenance.check(repo, forged))
    assert provenance.check(repo, record, rev="no-such-branch") == [
        "no-such-branch does not name a commit in the repository"]


def test_git_on_an_agents_checkout_runs_nothing_it_configures(repo: Path,
                                                              tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    hook = tmp_path / "hook.sh"
    hook.write_text(f"#!/bin/sh\necho \"$0 $*\" >> {marker}\n")
    hook.chmod(0o755)
    (repo / ".gitattributes").write_text("*.py diff=evil\n")
    git(repo, "config", "core.fsmonitor", str(hook))
    git(repo, "config", "diff.evil.textconv", str(hook))
    git(repo, "config", "diff.external", str(hook))
    git(repo, "config", "core.hooksPath", str(tmp_path))
    (tmp_path / "post-checkout").write_text(hook.read_text())
    before = provenance.refs(repo)
    (repo / "a.py").write_text("a = 3\n")
    subprocess.run(["git", "-C", str(repo), "-c", "core.fsmonitor=false", "-c",
                    "user.name=a", "-c", "user.email=a@example.invalid", "commit", "-qam", "x"],
                   check=True, capture_output=True)
    marker.unlink(missing_ok=True)
    record = provenance.collect(repo, before, run_id="r", agent="a")
    assert provenance.check(repo, record) == []
    assert record["commits"][0]["files"] == [{"status": "M", "path": "a.py"}]
    assert not marker.exists(), marker.read_text()
