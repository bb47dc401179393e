"""Start-up check that the runtime dependencies import, so a missing one is one line, not a traceback.

``check_dependencies()`` imports each module below in order (a package after the ones it imports, so
the first failure names the package at fault) and raises ``UserError`` naming the package and the
pip command that installs it. The commands give the requirement files' paths from the current folder.
"""

from __future__ import annotations

import importlib
import os

from core.errors import UserError

ROOT = os.path.dirname(os.path.abspath(__file__))


def _requirements(name: str, no_deps: bool = False) -> str:
    return f"pip install {'--no-deps ' if no_deps else ''}-r {os.path.relpath(os.path.join(ROOT, name))}"


REQUIREMENTS = "requirements.txt"
NODEPS = "requirements-nodeps.txt"

# (module, package, requirement file or None for PyTorch, which requirements.txt leaves to the platform)
DEPENDENCIES = [
    ("numpy", "numpy", REQUIREMENTS),
    ("torch", "torch", None),
    ("torchvision", "torchvision", None),
    ("cv2", "opencv-python-headless", REQUIREMENTS),
    ("scipy", "scipy", REQUIREMENTS),
    ("skimage", "scikit-image", REQUIREMENTS),
    ("sklearn", "scikit-learn", REQUIREMENTS),
    ("safetensors", "safetensors", REQUIREMENTS),
    ("tqdm", "tqdm", REQUIREMENTS),
    ("timm", "timm", REQUIREMENTS),
    ("albumentations", "albumentations", REQUIREMENTS),
    ("py_sod_metrics", "pysodmetrics", NODEPS),
]


def install_command(package: str, requirements: str | None) -> str:
    if requirements is None:
        return f"pip install {package}"
    return _requirements(requirements, no_deps=requirements == NODEPS)


def check_dependencies() -> None:
    """Import every runtime dependency; raise ``UserError`` for the first that is missing or broken."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # as data/transforms.py: no network check
    for module, package, requirements in DEPENDENCIES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            fix = install_command(package, requirements)
            if e.name is None or e.name.split(".")[0] == module:
                raise UserError(f"{package} is not installed: {fix}") from e
            raise UserError(f"{package} cannot import {e.name}: {fix}") from e
        except Exception as e:  # a broken install: compiled against another numpy, a missing library
            first = (str(e).strip().splitlines() or [""])[0]
            raise UserError(f"{package} is installed but fails to import ({type(e).__name__}: {first}): "
                            f"pip install --force-reinstall --no-deps {package}") from e
