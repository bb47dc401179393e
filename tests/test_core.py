"""core/: one atomic write for every file the tool writes, with the mode a plain open() gives."""

import errno
import os
import stat

import pytest
import torch

from core import checkpoint as ckpt
from core.errors import UserError
from core.io import atomic_write, write_json


def umask_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def test_checkpoints_and_other_files_get_the_umask_mode(tmp_path):
    """Checkpoints used to come out 0600 (mkstemp's mode) while metrics.csv and the rest were 0644."""
    ckpt.save({"w": torch.ones(2)}, str(tmp_path / "last.pth"))
    write_json(str(tmp_path / "config.json"), {"a": 1})
    with atomic_write(str(tmp_path / "metrics.csv")) as f:
        f.write("epoch\n1\n")
    for name in ("last.pth", "config.json", "metrics.csv"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == umask_mode(), name
    assert torch.equal(ckpt.load(str(tmp_path / "last.pth"))["w"], torch.ones(2))


def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    ckpt.save({"epoch": 1}, str(path))
    before = path.read_bytes()

    def no_space(state, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt, "_write", no_space)
    with pytest.raises(UserError, match="no space left in .* the previous last.pth is kept"):
        ckpt.save({"epoch": 2}, str(path))
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["last.pth"]
    with pytest.raises(ValueError):
        with atomic_write(str(tmp_path / "notes.txt")) as f:
            f.write("half")
            raise ValueError("interrupted")
    assert os.listdir(tmp_path) == ["last.pth"]
