"""The layering of docs/architecture.md, checked on the source: who imports whom, and file sizes."""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def imports_of(package: str) -> dict:
    """{file: set of imported module names} for every .py file of ``package``."""
    out = {}
    folder = os.path.join(REPO, package)
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(folder, name)).read())
        mods = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods.add(node.module)
                mods |= {f"{node.module}.{a.name}" for a in node.names}
        out[f"{package}/{name}"] = mods
    return out


def test_evaluation_imports_only_the_runtime_and_the_state_from_training():
    allowed = ("core.runtime", "training.state")
    for path, mods in imports_of("evaluation").items():
        # "from training import state" records both "training" and "training.state"
        bad = {m for m in mods if m.startswith("training") and m != "training"
               and not any(m == a or m.startswith(a + ".") for a in allowed)}
        assert not bad, (path, bad)


@pytest.mark.parametrize("package", ["data", "models", "losses", "schedulers"])
def test_lower_layers_import_neither_training_nor_evaluation(package):
    for path, mods in imports_of(package).items():
        bad = {m for m in mods if m.split(".")[0] in ("training", "evaluation")}
        assert not bad, (path, bad)


def test_no_training_file_over_350_lines():
    folder = os.path.join(REPO, "training")
    sizes = {n: sum(1 for _ in open(os.path.join(folder, n))) for n in os.listdir(folder) if n.endswith(".py")}
    assert max(sizes.values()) <= 350, sizes
