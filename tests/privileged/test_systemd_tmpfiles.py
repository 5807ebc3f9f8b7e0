"""The shipped sysusers.d and tmpfiles.d files applied for real inside a scratch --root.
Needs root (directories owned by another group)."""

from __future__ import annotations

from pathlib import Path

from tests.unit.test_systemd_units import OPERATORS, SYSUSERS, TMPFILES, config_lines, run, tool


def test_tmpfiles_create_in_a_scratch_root(tmp_path: Path) -> None:
    """sysusers.d then tmpfiles.d for real, confined to tmp_path with --root: the group
    resolves and every directory gets its owner and mode."""
    sysusers = tool("systemd-sysusers")
    tmpfiles = tool("systemd-tmpfiles")
    (tmp_path / "etc").mkdir()
    made = run([sysusers, f"--root={tmp_path}", str(SYSUSERS)])
    assert made.returncode == 0, made.stdout + made.stderr
    groups = {fields[0]: int(fields[2]) for fields in
              (line.split(":") for line in (tmp_path / "etc" / "group").read_text().splitlines())}
    assert OPERATORS in groups, groups

    created = run([tmpfiles, "--create", f"--root={tmp_path}", str(TMPFILES)])
    assert created.returncode == 0, created.stdout + created.stderr
    for fields in config_lines(TMPFILES):
        _type, path, mode, user, group = fields[:5]
        st = (tmp_path / path.lstrip("/")).stat()
        assert oct(st.st_mode & 0o7777) == oct(int(mode, 8)), path
        assert st.st_uid == 0, path
        assert user == "root", path
        assert st.st_gid == (groups[group] if group == OPERATORS else 0), path
