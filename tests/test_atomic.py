"""Files and folders written whole (`e2edict.atomic`): a failure leaves the old content and no
temporary file; a success replaces it; what a killed writer left is cleared by the next."""

import pytest

from e2edict.atomic import write_atomic, write_folder_atomic, write_text_atomic


def test_a_failed_file_write_keeps_the_old_file_and_leaves_nothing_else(tmp_path):
    path = tmp_path / "f.txt"
    write_text_atomic(path, "old")

    def torn(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_atomic(path, torn)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]
    write_text_atomic(path, "new")
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path):
    folder = tmp_path / "ckpt"
    write_folder_atomic(folder, lambda tmp: [(tmp / n).write_text(n) for n in ("a", "b")])
    assert sorted(p.name for p in folder.iterdir()) == ["a", "b"]

    def torn(tmp):
        (tmp / "a").write_text("new a")
        raise RuntimeError("killed halfway")

    with pytest.raises(RuntimeError):
        write_folder_atomic(folder, torn)
    assert {p.name: p.read_text() for p in folder.iterdir()} == {"a": "a", "b": "b"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary folder left
    (tmp_path / ".ckpt.tmp-left-by-a-killed-writer").mkdir()  # SIGKILL: no handler ran
    write_folder_atomic(folder, lambda tmp: (tmp / "c").write_text("c"))
    assert sorted(p.name for p in folder.iterdir()) == ["c"] and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
