"""A missing or broken dependency is one ``error:`` line naming the package and the pip command.

``sys.modules[name] = None`` makes ``import name`` fail as if the package were not installed; a module
file put first on ``sys.path`` stands in for a broken one.
"""

import os
import subprocess
import sys

import pytest

import train_ultimate

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
ARGV = ["schedule", "--steps-per-epoch", "10", "--epochs", "2", "--stage1-epochs", "1"]


def run_main(capsys, argv=ARGV):
    rc = train_ultimate.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("module, message", [
    ("py_sod_metrics", "pysodmetrics is not installed: pip install --no-deps -r requirements-nodeps.txt"),
    ("skimage", "scikit-image is not installed: pip install -r requirements.txt"),
    ("albumentations", "albumentations is not installed: pip install -r requirements.txt"),
    ("torch", "torch is not installed: pip install torch"),
])
def test_a_missing_package_is_one_line_with_its_install_command(module, message, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    monkeypatch.setitem(sys.modules, module, None)
    rc, out, err = run_main(capsys)
    assert rc == 2
    assert err == f"error: {message}\n"
    assert "Traceback" not in out + err


@pytest.mark.parametrize("module, source, message", [
    ("cv2", "raise ImportError('numpy.core.multiarray failed to import')",
     "opencv-python-headless is installed but fails to import (ImportError: numpy.core.multiarray failed"
     " to import): pip install --force-reinstall --no-deps opencv-python-headless"),
    ("timm", "import huggingface_hub_not_here",
     "timm cannot import huggingface_hub_not_here: pip install -r requirements.txt"),
])
def test_a_broken_package_is_one_line_with_its_install_command(module, source, message, tmp_path,
                                                              monkeypatch, capsys):
    (tmp_path / f"{module}.py").write_text(source + "\n")
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module)
    rc, out, err = run_main(capsys)
    assert rc == 2
    assert err == f"error: {message}\n"
    assert "Traceback" not in out + err


@pytest.mark.e2e
def test_the_check_runs_before_anything_imports_pysodmetrics():
    """In a fresh interpreter: building the parser imports pysodmetrics, so the check must come first."""
    code = ("import runpy, sys; sys.modules['py_sod_metrics'] = None; "
            f"sys.argv = ['train_ultimate.py', *{ARGV!r}]; "
            "runpy.run_path('train_ultimate.py', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    message = "pysodmetrics is not installed: pip install --no-deps -r requirements-nodeps.txt"
    assert done.stderr == f"error: {message}\n"
