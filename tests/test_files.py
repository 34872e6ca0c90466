import os
import stat
from pathlib import Path

import pytest

from raysemi.files import write_text_atomic


def test_atomic_write_replaces_whole_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "results.json"
    write_text_atomic(path, "one")
    write_text_atomic(path, "two")
    assert path.read_text() == "two"
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]
    # the usual permissions of a new file (mkstemp's 0600 would hide results from other users)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_a_failed_write_keeps_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "results.txt"
    write_text_atomic(path, "old")


    with pytest.raises(TypeError):
        write_text_atomic(path, 42)  # type: ignore[arg-type]  (write() refuses a non-string)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["results.txt"]


def test_a_checkpoint_gets_the_usual_permissions_and_leaves_no_temp(tmp_path):
    """best.pt is read by the team's other users (evaluate, predict, a retrain on the cluster)."""
    from raysemi import checkpoint

    path = checkpoint.save(tmp_path / "best.pt", {"networks": {}})
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]


def test_an_output_file_path_is_checked_before_the_work(tmp_path):
    from raysemi.errors import UserError
    from raysemi.files import check_out_file

    (tmp_path / "afile").write_text("x")
    check_out_file(tmp_path / "new" / "deeper" / "results.csv", "--out")  # folders are made when written
    with pytest.raises(UserError, match=r"^--out: .+/adir is a folder; expected a file path"):
        (tmp_path / "adir").mkdir()
        check_out_file(tmp_path / "adir", "--out")
    with pytest.raises(UserError, match=r"^--out: .+/afile/x\.csv: .+/afile is a file; expected a folder there$"):
        check_out_file(tmp_path / "afile" / "x.csv", "--out")
    # a folder nobody can write to, root included (os.access says yes to root there): refused
    # before the work, and the check leaves nothing behind where it could write (Linux: /proc)
    if not Path("/proc/self").is_dir():
        return
    with pytest.raises(UserError, match=r"^--out: /proc/results\.json: /proc (is not writable|cannot be written to)"
                                        r".*; expected a folder you can write to$"):
        check_out_file("/proc/results.json", "--out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile"]
    # the NIfTI writers' --out folder, checked the same way
    from raysemi.data.convert import check_out_folder

    with pytest.raises(UserError, match=r"^/proc/nifti: --out: /proc (is not writable|cannot be written to)"):
        check_out_folder(Path("/proc/nifti"), False, "the .nii.gz files")


def test_a_leftover_temp_of_a_crashed_process_with_this_pid_does_not_block_a_write(tmp_path):
    """In containers pids repeat: a temp file a killed process left must not fail a later write."""
    path = tmp_path / "results.json"
    (tmp_path / f".results.json.{os.getpid()}.tmp").write_text("half of an old write")
    write_text_atomic(path, "whole")
    assert path.read_text() == "whole" and [p.name for p in tmp_path.iterdir()] == ["results.json"]
