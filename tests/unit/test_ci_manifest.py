"""The workspace manifest and scope guard (supervisor/ci/manifest.py) on real files in tmp:
created, modified and deleted paths with their hashes, symlinks and hardlinks out of the
workspace, read-only paths and --allow-changes globs. No root."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from supervisor.ci.manifest import (
    LISTED_AT_MOST,
    AllowedChanges,
    Listed,
    check_glob,
    diff,
    guard,
    listed_digest,
    snapshot,
    violations,
    walk,
)


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    root = tmp_path / "ws"
    (root / "src").mkdir(parents=True)
    (root / "src" / "a.py").write_text("a = 1\n")
    (root / "src" / "gone.py").write_text("x\n")
    (root / ".github" / "workflows").mkdir(parents=True)
    (root / ".github" / "workflows" / "ci.yml").write_text("on: push\n")
    (root / "inner-link").symlink_to("src/a.py")
    return root


def changes_of(ws: Path, mutate: object) -> dict[str, dict[str, object]]:
    before = snapshot(ws)
    assert callable(mutate)
    mutate()
    return {c.path: c.as_dict() for c in diff(ws, before, snapshot(ws))}


def test_created_modified_and_deleted_files_with_hashes(ws: Path) -> None:
    old_hash = hashlib.sha256(b"a = 1\n").hexdigest()

    def mutate() -> None:
        (ws / "src" / "a.py").write_text("a = 2\n")
        (ws / "src" / "gone.py").unlink()
        (ws / "src" / "new").mkdir()
        (ws / "src" / "new" / "b.py").write_text("b\n")

    changes = changes_of(ws, mutate)
    assert set(changes) == {"src/a.py", "src/gone.py", "src/new", "src/new/b.py"}
    assert changes["src/a.py"]["change"] == "modified"
    assert changes["src/a.py"]["sha256_before"] == old_hash
    assert changes["src/a.py"]["sha256_after"] == hashlib.sha256(b"a = 2\n").hexdigest()
    assert changes["src/gone.py"]["change"] == "deleted"
    assert "sha256_after" not in changes["src/gone.py"]
    assert changes["src/new"]["kind"] == "dir" and changes["src/new"]["change"] == "created"


def test_a_mode_change_is_a_modification(ws: Path) -> None:
    changes = changes_of(ws, lambda: os.chmod(ws / "src" / "a.py", 0o755))
    assert list(changes) == ["src/a.py"]


def test_symlinks_are_recorded_not_followed_and_escapes_are_flagged(ws: Path,
                                                                   tmp_path: Path) -> None:
    (tmp_path / "outside.txt").write_text("host\n")

    def mutate() -> None:
        (ws / "rel-escape").symlink_to("../outside.txt")
        (ws / "abs-escape").symlink_to(tmp_path / "outside.txt")
        (ws / "in-sandbox-path").symlink_to("/workspace/src/a.py")
        (ws / "fine").symlink_to("src/../src/a.py")

    changes = changes_of(ws, mutate)
    assert changes["rel-escape"]["flags"] == ["symlink_out_of_workspace"]
    assert changes["abs-escape"]["flags"] == ["symlink_out_of_workspace"]
    # /workspace is the sandbox's view; a later CI step on the host follows it elsewhere.
    assert changes["in-sandbox-path"]["flags"] == ["symlink_out_of_workspace"]
    assert changes["fine"]["flags"] == []
    assert changes["rel-escape"]["target_after"] == "../outside.txt"


def test_a_hardlink_to_a_file_outside_is_flagged(ws: Path, tmp_path: Path) -> None:
    (tmp_path / "host-file").write_text("host\n")

    def mutate() -> None:
        os.link(tmp_path / "host-file", ws / "linked")
        os.link(ws / "src" / "a.py", ws / "src" / "a-again.py")

    changes = changes_of(ws, mutate)
    assert changes["linked"]["flags"] == ["hardlink_out_of_workspace"]
    assert changes["src/a-again.py"]["flags"] == []


def test_scope_globs_readonly_paths_and_flags(ws: Path, tmp_path: Path) -> None:
    def mutate() -> None:
        (ws / "src" / "a.py").write_text("changed\n")
        (ws / "README.md").write_text("new\n")
        (ws / ".github" / "workflows" / "ci.yml").write_text("pwned\n")
        (ws / "src" / "escape").symlink_to("/etc/passwd")
        (ws / ".gitlab-ci.yml").write_text("x\n")

    before = snapshot(ws)
    mutate()
    found = {v["path"]: v["why"] for v in violations(
        diff(ws, before, snapshot(ws)), ["src/**"], [".github/workflows", ".gitlab-ci.yml"])}
    assert set(found) == {"README.md", ".github/workflows/ci.yml", "src/escape",
                          ".gitlab-ci.yml"}
    assert found["README.md"] == "created outside --allow-changes"
    assert found[".github/workflows/ci.yml"] == "read-only path .github/workflows modified"
    assert found["src/escape"] == "symlink_out_of_workspace"  # even inside an allowed glob
    unrestricted = violations(diff(ws, before, snapshot(ws)), [], [])
    assert [v["path"] for v in unrestricted] == ["src/escape"]


@pytest.mark.parametrize(("glob", "path", "matches"), [
    ("src/**", "src/a.py", True),
    ("src/**", "src/deep/er/a.py", True),
    ("src/**", "srcx/a.py", False),
    ("src/", "src/a/b", True),
    ("*.md", "README.md", True),
    # gitignore: a pattern without a slash matches at any depth (this used to be False)
    ("*.md", "docs/README.md", True),
    ("docs/*.md", "docs/README.md", True),
    ("docs/*.md", "docs/deep/README.md", False),
    ("docs/*.md", "other/docs/README.md", False),  # a slash anchors at the workspace root
    ("**/*.md", "docs/README.md", True),
    ("**/*.md", "README.md", True),
    ("tests/test_?.py", "tests/test_a.py", True),
    ("tests/test_[ab].py", "tests/test_c.py", False),
    ("a.txt", "a.txt", True),
    ("a.txt", "a.txt.bak", False),
])
def test_glob_semantics(glob: str, path: str, matches: bool) -> None:
    assert AllowedChanges([glob]).matches(path) is matches


def test_negated_globs_take_paths_back_out() -> None:
    allowed = AllowedChanges(["src/**", "!src/vendor/**"])
    assert allowed.matches("src/a.py") and not allowed.matches("src/vendor/lib.py")
    assert AllowedChanges([]).matches("anything/at/all")


def test_directories_created_on_the_way_to_an_allowed_path_are_allowed(ws: Path) -> None:
    before = snapshot(ws)
    (ws / "tests" / "unit").mkdir(parents=True)
    (ws / "tests" / "unit" / "test_app.py").write_text("def test(): pass\n")
    (ws / "tests" / "empty").mkdir()  # `tests/**` names it: allowed though it holds nothing
    (ws / "docs" / "deep").mkdir(parents=True)
    (ws / "docs" / "deep" / "x.md").write_text("# x\n")
    (ws / "stray").mkdir()  # on the way to nothing allowed
    (ws / "lib" / "sub").mkdir(parents=True)
    (ws / "lib" / "sub" / "a.md").write_text("# a\n")
    changes = diff(ws, before, snapshot(ws))
    assert {c.path for c in changes if c.kind == "dir"} == {
        "tests", "tests/unit", "tests/empty", "docs", "docs/deep", "stray", "lib", "lib/sub"}
    found = {v["path"]: v["why"] for v in violations(changes, ["tests/**", "lib/**/*.md"],
                                                      [])}
    # docs/deep/x.md is out of scope, so the directories made for it are too; lib/ and
    # lib/sub/ hold an allowed file without any glob naming them.
    assert found == {"docs": "created outside --allow-changes",
                     "docs/deep": "created outside --allow-changes",
                     "docs/deep/x.md": "created outside --allow-changes",
                     "stray": "created outside --allow-changes"}


def test_a_directory_replaced_by_a_link_is_not_carried_by_its_old_content(ws: Path) -> None:
    before = snapshot(ws)
    for name in os.listdir(ws / "src"):
        (ws / "src" / name).unlink()
    (ws / "src").rmdir()
    (ws / "src").symlink_to(".github")  # inside the workspace, so no link flag
    found = {v["path"]: v["rule"] for v in violations(diff(ws, before, snapshot(ws)),
                                                       ["src/**"], [])}
    assert found == {"src": "scope"}


@pytest.mark.parametrize("glob", ["", "/etc/**", "../x", "src/../../x", "!", "!/x"])
def test_bad_globs_are_named(glob: str) -> None:
    assert check_glob(glob) is not None


def test_git_attributes_and_modules_anywhere_are_host_code(ws: Path) -> None:
    before = snapshot(ws)
    (ws / "sub").mkdir()
    (ws / "sub" / ".gitattributes").write_text("* filter=evil\n")
    (ws / ".gitmodules").write_text("[submodule]\n")
    (ws / "sub" / "ok.py").write_text("x = 1\n")
    found = violations(diff(ws, before, snapshot(ws)), ["sub", "sub/**", ".gitmodules"],
                       [".git/hooks/"])
    assert {v["path"]: v["rule"] for v in found} == {"sub/.gitattributes": "host_code",
                                                     ".gitmodules": "host_code"}


def test_readonly_entries_with_a_trailing_slash_protect_their_tree(ws: Path) -> None:
    (ws / ".git" / "hooks").mkdir(parents=True, exist_ok=True)
    before = snapshot(ws)
    (ws / ".git" / "hooks" / "post-checkout").write_text("#!/bin/sh\n")
    found = violations(diff(ws, before, snapshot(ws)), [], [".git/hooks/"])
    assert [(v["path"], v["rule"]) for v in found] == [(".git/hooks/post-checkout", "readonly")]


def test_the_walk_gives_every_path_in_sorted_order(tmp_path: Path) -> None:
    """`walk` streams what a snapshot holds, in the order sorted() gives the paths (a
    directory's content sorts by `name/`: `a`, `a.b`, `a/x`), with a descriptor at a time."""
    root = tmp_path / "ws"
    for path in ("a/x", "a.b", "a-c/y/z", "b", "a/x.y/q"):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(path)
    (root / "a" / "link").symlink_to("../b")
    (root / "empty").mkdir()
    walked = [path for path, _ in walk(root)]
    assert walked == sorted(walked) and len(walked) == len(set(walked))
    assert set(walked) == {"a", "a/x", "a/x.y", "a/x.y/q", "a/link", "a.b", "a-c", "a-c/y",
                           "a-c/y/z", "b", "empty"}
    assert dict(walk(root))["a/link"].target == "../b"


def test_the_guard_lists_a_bounded_part_with_exact_totals_and_a_digest_of_all(
        ws: Path, tmp_path: Path) -> None:
    """`guard` judges every change and lists the first `limit`: the totals are exact, the
    digest is the complete list's, the quarantine callback sees each violation, and the
    changes come back whole, forward and backward, for applying to a checkout."""
    before = snapshot(ws)
    for d in range(3):
        (ws / f"gen{d}").mkdir()
        for i in range(40):
            (ws / f"gen{d}" / f"f{i}").write_text(str(i))
    (ws / "src" / "a.py").write_text("a = 2\n")
    (ws / "src" / "gone.py").unlink()
    seen: list[str] = []
    guarded = guard(ws, before, ["src/**"], [], lambda change, v: seen.append(v["path"]))
    try:
        complete = diff(ws, before, snapshot(ws))
        records = [c.as_dict() for c in complete]
        assert guarded.changes.total == len(complete) == 3 + 120 + 2
        assert guarded.changes.items == records[:LISTED_AT_MOST]
        assert guarded.changes.sha256 == listed_digest(records)
        found = violations(complete, ["src/**"], [])
        assert guarded.violations.total == len(found) == 123 and seen == [v["path"]
                                                                         for v in found]
        assert [c.as_dict() for c in guarded.forward()] == records
        assert [c.as_dict() for c in guarded.backward()] == records[::-1]
    finally:
        guarded.close()
    listed = Listed(limit=2)
    for record in records:
        listed.add(record)
    assert listed.items == records[:2] and listed.total == len(records)
    assert listed.sha256 == guarded.changes.sha256


def test_a_directory_is_judged_after_the_paths_under_it(ws: Path) -> None:
    """A created directory is decided once its content is: in scope when a path under it
    is (through created directories only), else a violation, listed after its content."""
    before = snapshot(ws)
    (ws / "tests" / "unit").mkdir(parents=True)
    (ws / "tests" / "unit" / "test_a.py").write_text("x\n")
    (ws / "out" / "deep").mkdir(parents=True)
    (ws / "out" / "deep" / "f").write_text("x\n")
    (ws / "out" / "tests").mkdir()
    found = violations(diff(ws, before, snapshot(ws)), ["tests/**", "out/tests/"], [])
    assert [v["path"] for v in found] == ["out/deep/f", "out/deep"]
