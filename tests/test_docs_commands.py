"""The commands in docs/resume.md run, in order, shrunk to a few CPU batches.

Kaggle paths become temp folders; epochs shrink (120 -> 2, 150 -> 3, so the plateau-breaking resume
really trains on), and the size flags below are appended (later flags win).
"""

import os
import re

import pytest

import train_ultimate
from tests.helpers import make_cod10k, parse_commands

pytestmark = pytest.mark.e2e

DOC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "resume.md")
SHRINK = ["--stage1-epochs", "1", "--img-size", "64", "--limit-batches", "2", "--num-workers", "0",
          "--no-pretrained", "--no-progress", "--no-curves"]
EPOCHS = {"120": "2", "150": "3"}


def doc_commands(path):
    return parse_commands("\n".join(re.findall(r"```bash\n(.*?)```", open(path).read(), flags=re.S)))


def test_resume_doc_commands_run_in_order(demo, tmp_path, capsys):
    cod = make_cod10k(str(tmp_path / "COD10K-v3"), demo(n_train=16, n_test=2, size=64, seed=1))
    work = str(tmp_path / "working")
    commands = doc_commands(DOC)
    assert [c[2] for c in commands] == ["train", "train", "schedule", "train"]
    for argv in commands:
        assert argv[:2] == ["python", "train_ultimate.py"]
        args = [a.replace("/kaggle/input/cod10k-dataset/COD10K-v3", cod).replace("/kaggle/working", work)
                for a in argv[2:]]
        i = args.index("--epochs")
        args[i + 1] = EPOCHS[args[i + 1]]
        assert train_ultimate.main([*args, *SHRINK]) == 0, " ".join(argv)
        if argv[2] == "schedule":
            assert "a fresh schedule starts at epoch" in capsys.readouterr().out
    with open(os.path.join(work, "checkpoints", "metrics.csv")) as f:
        epochs = [line.split(",")[0] for line in f.read().splitlines()[1:]]
    assert epochs[-1] == "3"  # the plateau-breaking resume trained on to the new --epochs
