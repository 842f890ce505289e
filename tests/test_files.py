"""files: what exists on disk is whole, whatever fails in between."""

import os

import pytest

from instructcli import files


def test_jsonl_writer_is_atomic(tmp_path):
    out = tmp_path / "o.jsonl"
    with pytest.raises(RuntimeError):
        with files.JsonlWriter(str(out)) as w:
            w.write({"a": 1})
            raise RuntimeError("boom")
    assert not out.exists() and not list(tmp_path.iterdir())
    with files.JsonlWriter(str(out)) as w:
        w.write({"a": 1})
    assert out.read_text() == '{"a": 1}\n'


def test_atomic_dir_appears_only_when_complete(tmp_path):
    out = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with files.atomic_dir(out) as d:
            (d / "half.bin").write_text("x")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []  # no target, no temp left
    with files.atomic_dir(out) as d:
        assert d != out and d.parent == out.parent and not out.exists()
        (d / "w.bin").write_text("new")
    assert (out / "w.bin").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_atomic_dir_keeps_a_cache_built_first_and_replaces_when_asked(tmp_path):
    out = tmp_path / "cache"
    out.mkdir()
    (out / "w.bin").write_text("first")
    with files.atomic_dir(out) as d:  # another process built it meanwhile: its copy is kept
        (d / "w.bin").write_text("second")
    assert (out / "w.bin").read_text() == "first"
    with files.atomic_dir(out, replace=True) as d:
        (d / "w.bin").write_text("third")
    assert (out / "w.bin").read_text() == "third"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # nothing moved aside is left
    empty = tmp_path / "empty"
    empty.mkdir()
    with files.atomic_dir(empty) as d:  # an empty dir is always replaced
        (d / "a").write_text("a")
    assert (empty / "a").read_text() == "a"


def test_atomic_write_text_keeps_the_old_file_on_failure_and_its_mode(tmp_path, monkeypatch):
    f = tmp_path / "labels.jsonl"
    f.write_text("old\n")
    os.chmod(f, 0o640)
    files.atomic_write_text(f, "new\n", mode_of=f)
    assert f.read_text() == "new\n" and (os.stat(f).st_mode & 0o777) == 0o640

    def full_disk(*a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError):
        files.atomic_write_text(f, "newer\n")
    assert f.read_text() == "new\n" and sorted(p.name for p in tmp_path.iterdir()) == ["labels.jsonl"]
