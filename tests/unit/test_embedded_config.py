"""An embedded run's configuration (ci/runner.py `embedded_config`): the daemon's narrowed to
one slot by copying the sections it changes with values computed in code, where it used to dump
the configuration and validate it whole again. Held equal, field by field, to that validated
narrowing, for configurations with and without a file's values; what validating would refuse
is refused, as a structured error. No privilege."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from supervisor.ci import COPY_ROOT_ENV_VAR, DEFAULT_COPY_ROOT, DEFAULT_ROOT, ROOT_ENV_VAR
from supervisor.ci.runner import (
    SLOT_LOCKS,
    _root_only,
    _roots_outside,
    copy_root,
    embedded_config,
    state_root,
)
from supervisor.config import Config
from supervisor.errors import ConfigInvalid, InvalidRequest
from supervisor.sandbox.bundle import SANDBOX_UID_COUNT
from tests.support.model_diff import differences

ROOT = Path("/run/agent-supervisor-ci")


def validated_narrowing(base: Config, root: Path, slot: int) -> Config:
    """The narrowing as it was: the whole configuration dumped, changed and validated."""
    data = base.model_dump()
    runtime_dir = root / f"slot{slot}"
    data["daemon"].update(runtime_dir=runtime_dir, state_dir=runtime_dir / "state",
                          socket_path=None)
    data["sandbox"].update(
        cgroup_parent=f"/agent-supervisor-ci/slot{slot}", name_prefix=f"asci{slot}",
        max_runs=1,
        uid_base=base.sandbox.uid_base + (base.sandbox.max_runs + slot) * SANDBOX_UID_COUNT)
    data["egress"]["ci_slot"] = slot
    data["telemetry"]["seccomp_listener"] = (None if base.telemetry.seccomp_listener is None
                                             else base.telemetry.seccomp_listener and
                                             str(runtime_dir / "seccomp.sock"))
    return Config.model_validate(data)


def values_differ(narrowed: Config, reference: Config) -> list[str]:
    """Every difference but which fields are marked as set: validating a dump marks them all,
    a copy keeps the base's marks plus the sections it changed (nothing reads the marks of a
    configuration: no dump of it excludes unset fields)."""
    return [d for d in differences(narrowed, reference) if "fields set" not in d]


STATED: list[dict[str, Any]] = [
    {},
    {"telemetry": {"seccomp_listener": ""}},
    {"telemetry": {"seccomp_listener": "/run/listener.sock", "rate_hz": 5},
     "sandbox": {"uid_base": 200_000, "max_runs": 7, "cgroup_parent": "/agents//",
                 "name_prefix": "ag", "agent_uid": 1234, "runc_path": "/opt/runc"},
     "daemon": {"runtime_dir": "/run/as", "state_dir": "/var/lib/as",
                "socket_path": "/run/as/c.sock", "log_level": "debug",
                "profile_dirs": ["/etc/p"], "default_profile": "strict"},
     "kill": {"confirm_timeout": "2s"}, "output": {"max_bytes": "8M"},
     "webhooks": [{"url": "https://example.test/hook", "events": ["kill"]}],
     "roles": {"admin": ["user:alice"]}},
]


@pytest.mark.parametrize("stated", STATED)
@pytest.mark.parametrize("slot", [0, 1, 4095])
def test_the_narrowing_is_what_validating_it_gives(stated: dict[str, Any], slot: int) -> None:
    base = Config.model_validate(stated)
    narrowed = embedded_config(base, ROOT, slot)
    reference = validated_narrowing(base, ROOT, slot)
    assert values_differ(narrowed, reference) == [] and narrowed == reference
    assert narrowed.sandbox.name_prefix == f"asci{slot}" and narrowed.sandbox.max_runs == 1
    assert narrowed.daemon.runtime_dir == ROOT / f"slot{slot}"
    assert base.sandbox.cgroup_parent != narrowed.sandbox.cgroup_parent  # the base is intact


def test_the_narrowing_of_every_default_is_what_validating_it_gives() -> None:
    """Without a file the base is made without validating (load_config); narrowed, it is
    still what validating the narrowed defaults gives."""
    narrowed = embedded_config(Config.model_construct(), ROOT, 2)
    reference = validated_narrowing(Config(), ROOT, 2)
    assert values_differ(narrowed, reference) == [] and narrowed == reference


def test_a_slot_past_the_highest_uid_is_refused_as_validating_refuses_it() -> None:
    # The daemon's range ends just below the highest uid: a slot's range would pass it.
    top = 2**32 - 2 + 1 - 4 * SANDBOX_UID_COUNT
    base = Config.model_validate({"sandbox": {"uid_base": top, "max_runs": 4}})
    with pytest.raises(ValidationError) as validated:
        validated_narrowing(base, ROOT, 0)
    with pytest.raises(ConfigInvalid) as refused:
        embedded_config(base, ROOT, 0)
    reason = validated.value.errors()[0]["msg"].removeprefix("Value error, ")
    assert refused.value.detail["reason"] == reason and reason in refused.value.message
    assert "past the highest uid" in reason and refused.value.detail["slot"] == 0


def test_audit_anchors_inside_the_slots_state_directory_are_refused() -> None:
    base = Config.model_validate({"audit": {"key": "/run/agent-supervisor-ci/slot5/state/k"}})
    with pytest.raises(ValidationError) as validated:
        validated_narrowing(base, ROOT, 5)
    with pytest.raises(ConfigInvalid) as refused:
        embedded_config(base, ROOT, 5)
    reason = validated.value.errors()[0]["msg"].removeprefix("Value error, ")
    assert refused.value.detail["reason"] == reason
    assert "must lie outside daemon.state_dir" in reason
    embedded_config(base, ROOT, 4)  # another slot's state directory: nothing to refuse


@pytest.mark.parametrize("stated", STATED)
def test_a_relative_state_root_is_made_absolute_at_the_entry(
        stated: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """$AGENT_SUPERVISOR_CI_ROOT=ci-state gave the slot a relative runtime directory and with
    it a relative seccomp listener (validation refuses one; the narrowing copies without
    validating), which runc resolves from its own directory. It is resolved against the
    directory agentctl runs in, so every path of the slot is absolute."""
    monkeypatch.chdir(tmp_path)
    root = state_root({ROOT_ENV_VAR: "ci-state/./runs"})
    assert root == tmp_path / "ci-state" / "runs"
    narrowed = embedded_config(Config.model_validate(stated), root, 3)
    assert narrowed == validated_narrowing(Config.model_validate(stated), root, 3)
    listener = narrowed.seccomp_listener
    assert listener is None or listener == tmp_path / "ci-state/runs/slot3/seccomp.sock"
    for path in (narrowed.daemon.runtime_dir, narrowed.daemon.state_dir):
        assert path.is_absolute() and path.is_relative_to(tmp_path / "ci-state/runs/slot3")
    # Unset or empty, the default; an absolute one as given.
    assert state_root({}) == state_root({ROOT_ENV_VAR: ""}) == ROOT
    assert state_root({ROOT_ENV_VAR: "/srv/ci"}) == Path("/srv/ci")


def test_a_relative_state_root_given_to_the_narrowing_is_refused() -> None:
    """A caller that skips the entry's resolution gets a structured error, not a slot whose
    paths depend on the directory each process resolves them from."""
    with pytest.raises(ConfigInvalid) as refused:
        embedded_config(Config(), Path("ci-state"), 0)
    assert refused.value.detail["root"] == "ci-state"
    assert ROOT_ENV_VAR in (refused.value.hint or "")


def test_a_relative_copy_root_is_made_absolute_at_the_entry(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As the state root: the copy, the check that it lies outside the checkout and the
    agent's mount of it name one place, whatever directory each resolves it from."""
    monkeypatch.chdir(tmp_path)
    assert copy_root({COPY_ROOT_ENV_VAR: "copies/./x"}) == tmp_path / "copies" / "x"
    assert copy_root({}) == copy_root({COPY_ROOT_ENV_VAR: ""}) == Path(DEFAULT_COPY_ROOT)
    assert copy_root({COPY_ROOT_ENV_VAR: "/srv/copies"}) == Path("/srv/copies")


def roots_refused(root: Path, copies: Path, workspace: Path) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as refused:
        _roots_outside(root, copies, workspace)
    return refused.value


def test_embedded_roots_inside_the_workspace_are_refused(tmp_path: Path) -> None:
    """The runner's state (database, audit, the slot's seccomp listener socket, the
    quarantine) and the checkout's copy under a root the agent can write would be the
    agent's to replace: refused as a report path there is, resolved, symlinks followed."""
    ws = tmp_path / "checkout"
    (ws / "sub").mkdir(parents=True)
    (tmp_path / "link").symlink_to(ws / "sub")
    outside, copies = tmp_path / "ci-state", tmp_path / "copies"
    _roots_outside(outside, copies, ws)  # both outside: nothing to refuse
    _roots_outside(tmp_path / "checkout-state", copies, ws)  # a name that only starts alike
    for root in (ws, ws / ".ci", tmp_path / "link" / "state", ws / "sub" / ".." / "x"):
        error = roots_refused(root, copies, ws)
        assert error.code == "invalid_request" and error.detail["field"] == ROOT_ENV_VAR
        assert error.detail["path"] == str(root)
        assert Path(error.detail["resolved"]).is_relative_to(ws.resolve())
        assert "inside the workspace" in error.message
        assert ROOT_ENV_VAR in (error.hint or "") and DEFAULT_ROOT in (error.hint or "")
    error = roots_refused(outside, tmp_path / "link" / "copies", ws)
    assert error.detail["field"] == COPY_ROOT_ENV_VAR
    assert COPY_ROOT_ENV_VAR in (error.hint or "")
    # The state root inside the copy root: a slot's copy is the agent's to write, and each run
    # of the slot removes the slot's copy directory whole.
    error = roots_refused(copies / "slot0" / "checkout", copies, ws)
    assert error.detail["field"] == ROOT_ENV_VAR and COPY_ROOT_ENV_VAR in error.message
    # No workspace: only the roots' own overlap is judged.
    _roots_outside(outside, copies, None)


def test_embedded_roots_must_be_reached_through_roots_directories_alone(tmp_path: Path) -> None:
    """Root's own directories, a sticky world-writable one on the way (/tmp, /var/tmp) and a
    symlink of root's (/var/run on Debian) pass; a directory anyone can write at the end of the
    path, one another uid owns, and a path that cannot be made are refused, naming the
    culprit (the attacks for real: tests/e2e/test_ci_embedded.py, "someone_else")."""
    _root_only(Path("/usr/lib"), ROOT_ENV_VAR)
    if os.path.islink("/var/run") and os.lstat("/var/run").st_uid == 0:
        _root_only(Path("/var/run"), ROOT_ENV_VAR)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    if os.geteuid() == 0:
        os.chown(theirs, 65534, 65534)
    uid = theirs.stat().st_uid
    for path, why in ((Path("/tmp"), "can be written by others (mode 1777)"),
                      (theirs, f"is owned by uid {uid}"),
                      (Path("/proc/no-such-root"), "cannot be made")):
        with pytest.raises(InvalidRequest) as refused:
            _root_only(path, COPY_ROOT_ENV_VAR)
        error = refused.value
        assert error.code == "invalid_request" and error.detail["field"] == COPY_ROOT_ENV_VAR
        assert error.detail["path"] == str(path) and why in error.detail["problem"]
        assert COPY_ROOT_ENV_VAR in error.message and DEFAULT_COPY_ROOT in (error.hint or "")


def test_the_slot_lock_directory_is_made_with_its_mode_and_checked_as_the_roots(
        tmp_path: Path) -> None:
    """The per-host lock directory (/run/agent-supervisor-ci/locks, whatever
    $AGENT_SUPERVISOR_CI_ROOT says) and every directory missing on its way are made with
    explicit modes, never the umask's (0: writable by anyone, who could swap the locks and
    share a slot's cgroup and uids); one another uid made is refused with the same structured
    error as the roots, naming it."""
    locks = tmp_path / "run" / "agent-supervisor-ci" / "locks"
    previous = os.umask(0)
    try:
        if os.geteuid() == 0:
            _root_only(locks, SLOT_LOCKS, mode=0o700)
        else:  # tmp_path is nobody's: made, then refused
            with pytest.raises(InvalidRequest):
                _root_only(locks, SLOT_LOCKS, mode=0o700)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(locks.stat().st_mode) == 0o700
    for made in (locks.parent, locks.parent.parent):
        assert stat.S_IMODE(made.stat().st_mode) == 0o711
    theirs = tmp_path / "theirs" / "locks"
    theirs.mkdir(parents=True)
    theirs.chmod(0o777)
    with pytest.raises(InvalidRequest) as refused:
        _root_only(theirs, SLOT_LOCKS, mode=0o700)
    error = refused.value
    assert error.code == "invalid_request" and error.detail["field"] == SLOT_LOCKS
    assert error.detail["path"] == str(theirs)
    assert f"the slot lock directory {theirs} is not root's alone" in error.message
    assert str(theirs) in (error.hint or "") and "0700" in (error.hint or "")
    if os.geteuid() == 0:
        assert "can be written by others (mode 0777)" in error.detail["problem"]


def test_the_default_copy_root_is_on_a_path_only_root_can_make_entries_in() -> None:
    """The copy root's default lay in /var/tmp, where any local user could make it first: runs
    of root-owned checkouts were then refused (safely) until root removed it, a denial of
    service. Every directory on the default's way that exists is root's and writable by root
    alone: not even a sticky one, in which others could make the name."""
    parts = Path(DEFAULT_COPY_ROOT).parts
    for depth in range(1, len(parts)):
        directory = Path(*parts[:depth])
        if not directory.exists():
            break
        st = os.stat(directory)
        assert st.st_uid == 0 and not st.st_mode & (stat.S_IWOTH | stat.S_IWGRP), directory
    assert not Path(DEFAULT_COPY_ROOT).is_relative_to("/run")  # a tmpfs: checkouts are large
