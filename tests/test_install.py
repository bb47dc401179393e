"""The README's install commands: pysodmetrics comes without its pins, and Kaggle keeps its numpy.

Kaggle images ship packages compiled against their numpy, and pysodmetrics 1.6.2 pins numpy<2.3.5,
so the README installs it with ``--no-deps`` from ``requirements-nodeps.txt``. The slow test runs the
README's Kaggle pip commands with ``--dry-run --report`` in a fresh venv holding numpy 2.4 from PyPI
and asserts that pip would put no older version over anything installed there.
"""

import ast
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import urllib.request

import pytest
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.helpers import parse_commands

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
README = open(os.path.join(ROOT, "README.md")).read()


def bash_blocks(text):
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def pip_installs(block):
    """The ``pip install`` commands in a bash block, ``&&`` chains split, as argv lists."""
    found = []
    for argv in parse_commands(block):
        while argv:
            cut = argv.index("&&") if "&&" in argv else len(argv)
            if argv[:2] == ["pip", "install"]:
                found.append(argv[:cut])
            argv = argv[cut + 1:]
    return found


def kaggle_installs():
    section = README[README.index("## On Kaggle"):]
    return pip_installs(bash_blocks(section[:section.index("\n## ")])[0])


def requirement_names(name):
    lines = [line.split("#")[0].strip() for line in open(os.path.join(ROOT, name))]
    return {canonicalize_name(re.split(r"[<>=!~;\[ ]", line)[0]) for line in lines if line}


def test_pysodmetrics_is_installed_apart_and_requirements_list_what_it_imports():
    import py_sod_metrics

    assert requirement_names("requirements-nodeps.txt") == {"pysodmetrics"}
    assert "pysodmetrics" not in requirement_names("requirements.txt")
    here = os.path.dirname(py_sod_metrics.__file__)
    modules = set()
    for name in os.listdir(here):
        if name.endswith(".py"):
            for node in ast.walk(ast.parse(open(os.path.join(here, name)).read())):
                if isinstance(node, ast.Import):
                    modules |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    modules.add(node.module.split(".")[0])
    modules -= set(sys.stdlib_module_names) | {"py_sod_metrics"}
    dists = importlib.metadata.packages_distributions()
    imported = {canonicalize_name(d) for m in modules for d in dists[m]}
    assert {"numpy", "scipy", "scikit-image", "scikit-learn", "opencv-python-headless"} <= imported
    assert imported <= requirement_names("requirements.txt")


def test_every_readme_install_brings_pysodmetrics_without_its_deps():
    blocks = [pip_installs(block) for block in bash_blocks(README)]
    blocks = [installs for installs in blocks if any("requirements.txt" in argv for argv in installs)]
    assert len(blocks) == 3  # the demo, the tests, Kaggle
    for installs in blocks:
        assert any("--no-deps" in argv and "requirements-nodeps.txt" in argv for argv in installs), installs


def pip(python, *args, cwd=ROOT):
    done = subprocess.run([python, "-m", "pip", *args], cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, f"pip {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def fake_installed(site_packages, name, version):
    """A dist-info with no files: pip sees ``name`` installed and resolves none of its dependencies."""
    info = os.path.join(site_packages, f"{name}-{version}.dist-info")
    os.makedirs(info)
    with open(os.path.join(info, "METADATA"), "w") as f:
        f.write(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def would_install(python, argv, report):
    """{name: version} that ``argv`` (a pip install command) would install, by pip's dry run."""
    pip(python, *argv[1:], "--dry-run", "--report", report)
    with open(report) as f:
        return {canonicalize_name(p["metadata"]["name"]): p["metadata"]["version"]
                for p in json.load(f)["install"]}


def downgrades(installed, new):
    return {n: f"{installed[n]} -> {v}" for n, v in new.items()
            if n in installed and Version(v) < Version(installed[n])}


@pytest.mark.e2e
@pytest.mark.slow
def test_kaggle_install_downgrades_nothing(tmp_path):
    try:
        urllib.request.urlopen("https://pypi.org/simple/numpy/", timeout=15).close()
    except OSError as e:
        pytest.skip(f"PyPI is not reachable ({e}); this test installs numpy 2.4 from it")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    pip(python, "install", "-q", "numpy==2.4.*")
    # Kaggle has PyTorch. Stand-ins at the versions constraints.txt names, which this machine's pip
    # configuration may cap torch at, keep pip from fetching gigabytes of it and its CUDA libraries.
    pins = dict(line.split("==") for line in open(os.path.join(ROOT, "constraints.txt")) if "==" in line)
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    for name in ("torch", "torchvision"):
        fake_installed(site, name, pins[name].strip())
    listed = json.loads(pip(python, "list", "--format", "json"))
    installed = {canonicalize_name(p["name"]): p["version"] for p in listed}
    assert installed["numpy"].startswith("2.4."), installed

    # pysodmetrics with its own dependencies would downgrade numpy: the check below can fail.
    plain = would_install(python, ["pip", "install", "pysodmetrics==1.6.2"], str(tmp_path / "plain.json"))
    assert "numpy" in downgrades(installed, plain), plain

    new = {}
    for i, argv in enumerate(kaggle_installs()):
        new.update(would_install(python, argv, str(tmp_path / f"report{i}.json")))
    assert {"pysodmetrics", "timm", "scikit-image", "scipy", "scikit-learn"} <= set(new), new
    assert downgrades(installed, new) == {}
    assert "numpy" not in new and "torch" not in new, new
