import stat

import pytest

from birkhoff.atomic import write_text_atomic


def test_write_replaces_whole_file_and_leaves_no_temporaries(tmp_path):
    target = tmp_path / "sub" / "file.txt"
    write_text_atomic(target, "first")
    write_text_atomic(target, "second")
    assert target.read_text() == "second"
    assert [p.name for p in target.parent.iterdir()] == ["file.txt"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "file.txt"
    write_text_atomic(target, "kept")
    with pytest.raises(UnicodeEncodeError):
        write_text_atomic(target, "\udcff")  # lone surrogate: encoding fails mid-write
    assert target.read_text() == "kept"
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]
