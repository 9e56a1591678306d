"""util.files: atomic writes leave the modes a plain open() / mkdir would, and nothing beside the target.

Mode assertions hold for root as for any user (they read st_mode, they do not try to open as someone else).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from covsvd.util import files
from covsvd.util.files import atomic_directory, atomic_write, current_umask

UMASKS = [0o022, 0o027, 0o077, 0o002]


@pytest.fixture(params=UMASKS, ids=lambda m: f"umask{m:03o}")
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_current_umask_reads_without_changing(umask, monkeypatch):
    assert current_umask() == umask
    assert current_umask() == umask  # unchanged by the read

    def no_proc(*args, **kwargs):
        raise OSError("no /proc")

    monkeypatch.setattr(files, "open", no_proc, raising=False)  # the os.umask swap
    assert current_umask() == umask
    assert current_umask() == umask


def test_atomic_write_new_file_gets_the_umask_mode(tmp_path, umask):
    target = tmp_path / "sub" / "deeper" / "x.bin"
    atomic_write(target, lambda tmp: Path(tmp).write_bytes(b"abc"))
    assert target.read_bytes() == b"abc"
    assert mode(target) == 0o666 & ~umask
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    assert mode(target) == mode(plain)  # what open() gives
    assert mode(tmp_path / "sub") == mode(tmp_path / "sub" / "deeper") == 0o777 & ~umask
    assert entries(target.parent) == ["x.bin"]


def test_atomic_write_keeps_an_existing_files_mode(tmp_path, umask):
    target = tmp_path / "x.txt"
    target.write_text("old")
    os.chmod(target, 0o640)
    atomic_write(target, lambda tmp: Path(tmp).write_text("new"))
    assert target.read_text() == "new" and mode(target) == 0o640  # as open(path, "w") keeps it
    assert entries(tmp_path) == ["x.txt"]


def test_atomic_write_replaces_whatever_mode_the_writer_set(tmp_path, umask):
    target = tmp_path / "x.txt"

    def write(tmp: str) -> None:
        Path(tmp).write_text("content")
        os.chmod(tmp, 0o600)

    atomic_write(target, write)
    assert mode(target) == 0o666 & ~umask


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_atomic_write_failure_leaves_nothing_and_the_old_file(tmp_path, error):
    target = tmp_path / "x.txt"
    target.write_text("old")

    def write(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise error("stop")

    with pytest.raises(error):
        atomic_write(target, write)
    assert target.read_text() == "old" and entries(tmp_path) == ["x.txt"]


def build_tree(tmp: Path) -> None:
    (tmp / "a" / "b").mkdir(parents=True)
    (tmp / "top.txt").write_text("top")
    (tmp / "a" / "b" / "leaf.bin").write_bytes(b"leaf")
    os.chmod(tmp / "a" / "b" / "leaf.bin", 0o600)  # a writer's private temporary, e.g. a nested mkstemp


def test_atomic_directory_tree_gets_the_umask_modes(tmp_path, umask):
    out = atomic_directory(tmp_path / "out", build_tree)
    assert out == tmp_path / "out" and (out / "a" / "b" / "leaf.bin").read_bytes() == b"leaf"
    for d in (out, out / "a", out / "a" / "b"):
        assert mode(d) == 0o777 & ~umask, d
    for f in (out / "top.txt", out / "a" / "b" / "leaf.bin"):
        assert mode(f) == 0o666 & ~umask, f
    assert entries(tmp_path) == ["out"]


def test_atomic_directory_refuses_an_existing_path_before_writing(tmp_path):
    calls = []
    for existing in ("dir", "file"):
        target = tmp_path / existing
        target.mkdir() if existing == "dir" else target.write_text("keep")
        with pytest.raises(FileExistsError, match="overwrite=True"):
            atomic_directory(target, calls.append)
    assert calls == [] and entries(tmp_path) == ["dir", "file"]


@pytest.mark.parametrize("existing", ["dir", "file", "link"])
def test_atomic_directory_overwrite_leaves_nothing_beside(tmp_path, existing):
    target = tmp_path / "out"
    if existing == "dir":
        (target / "inner").mkdir(parents=True)
        (target / "inner" / "old.txt").write_text("old")
    elif existing == "file":
        target.write_text("old")
    else:
        (tmp_path / "elsewhere").mkdir()
        target.symlink_to(tmp_path / "elsewhere")
    atomic_directory(target, build_tree, overwrite=True)
    assert target.is_dir() and not target.is_symlink() and (target / "top.txt").read_text() == "top"
    assert not (target / "inner").exists()
    expected = ["elsewhere", "out"] if existing == "link" else ["out"]
    assert entries(tmp_path) == expected  # no .out.old, no temporary directory


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("existing", [False, True])
def test_atomic_directory_failed_write_leaves_the_old_entry_and_nothing_else(tmp_path, error, existing):
    target = tmp_path / "out"
    if existing:
        target.mkdir()
        (target / "old.txt").write_text("old")

    def write(tmp: Path) -> None:
        build_tree(tmp)
        raise error("stop")

    with pytest.raises(error):
        atomic_directory(target, write, overwrite=True)
    if existing:
        assert entries(tmp_path) == ["out"] and entries(target) == ["old.txt"]
    else:
        assert entries(tmp_path) == []


def test_atomic_directory_failed_final_rename_puts_the_old_entry_back(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    real = os.replace

    def replace(src, dst):
        if Path(dst) == target and Path(src).name.endswith(".tmp"):
            raise OSError("rename refused")
        return real(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(OSError, match="rename refused"):
        atomic_directory(target, build_tree, overwrite=True)
    assert entries(tmp_path) == ["out"] and entries(target) == ["old.txt"]
