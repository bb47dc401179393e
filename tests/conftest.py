"""Fixtures shared by the test modules; plain helpers are in ``tests/helpers.py``."""

import pytest

from data import make_demo_dataset
from tests.helpers import REPO, SIGNAL_DRIVER


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """``demo(n_train, n_test, size=64, seed=0)``: the path (a folder named demo) of a generated demo
    dataset (``data.make_demo_dataset``), made once per set of arguments in the session, so modules asking
    for the same one share it. Read it, never change it: copy it first (``shutil.copytree``)."""
    made = {}

    def make(n_train: int, n_test: int, size: int = 64, seed: int = 0) -> str:
        key = (n_train, n_test, size, seed)
        if key not in made:
            folder = tmp_path_factory.mktemp(f"demo-{n_train}-{n_test}-{size}px-seed{seed}") / "demo"
            made[key] = make_demo_dataset(str(folder), n_train=n_train, n_test=n_test, size=size, seed=seed)
        return made[key]

    return make


@pytest.fixture(scope="session")
def signal_driver(tmp_path_factory):
    """The path of ``helpers.SIGNAL_DRIVER`` written out as a script: ``python DRIVER train ...``."""
    path = tmp_path_factory.mktemp("signal_driver") / "driver.py"
    path.write_text(SIGNAL_DRIVER.format(repo=REPO))
    return str(path)
