"""Every command users run (../shared/usage/commands.txt) runs here, shrunk to a few CPU batches.

They are read from ``tests/fixtures/user_commands.txt``, a verbatim copy, so they also run in a clone
without ``../shared`` beside it; where both exist, a test checks the copy has not drifted.

The dataset path is replaced by a small COD10K-v3-layout folder, Kaggle's working paths by a temp
folder, and the acceptance flags are appended (later flags win). Commands run in file order, so the
``--resume-from .../best_model.pth`` ones resume from what the earlier ones wrote.
"""

import os

import pytest

import train_ultimate
from tests.helpers import make_cod10k, parse_commands

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED_COMMANDS = os.path.join(HERE, "..", "..", "shared", "usage", "commands.txt")
COPY = os.path.join(HERE, "fixtures", "user_commands.txt")
SHRINK = ["--epochs", "2", "--stage1-epochs", "1", "--img-size", "64", "--limit-batches", "2",
          "--num-workers", "0", "--no-pretrained", "--no-progress", "--no-curves"]


def read_commands(path):
    return parse_commands(open(path).read())


@pytest.mark.skipif(not os.path.isfile(SHARED_COMMANDS), reason="../shared/usage/commands.txt not beside this clone")
def test_the_copy_matches_the_users_commands():
    with open(SHARED_COMMANDS) as a, open(COPY) as b:
        assert a.read() == b.read(), f"refresh the copy: cp {SHARED_COMMANDS} {COPY}"


@pytest.mark.e2e
def test_every_user_command_runs(demo, tmp_path):
    cod = make_cod10k(str(tmp_path / "COD10K-v3"), demo(n_train=16, n_test=2, size=64, seed=1))
    work = str(tmp_path / "working")
    commands = read_commands(COPY)
    assert len(commands) >= 7
    for argv in commands:
        assert argv[:3] == ["python", "train_ultimate.py", "train"], argv
        args = [a.replace("/kaggle/input/cod10k-dataset/COD10K-v3", cod).replace("/kaggle/working", work)
                for a in argv[3:]]
        rc = train_ultimate.main(["train", *args, *SHRINK])
        assert rc == 0, " ".join(argv)
        ckpt_dir = args[args.index("--checkpoint-dir") + 1]
        assert os.path.isfile(os.path.join(ckpt_dir, "best_model.pth")), " ".join(argv)
