"""One way to write a file that an interruption never leaves half written.

``with atomic_write(path, "wb") as f`` writes a temporary file beside ``path``, flushes and fsyncs
it, gives it the mode a plain ``open`` would (0666 less the umask; ``mkstemp``'s own is 0600) and
``os.replace``s it over ``path``: a kill at any moment leaves either the old file or the new one. On
an error the temporary file is removed and ``path`` is untouched.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager


@contextmanager
def atomic_write(path: str, mode: str = "w"):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path: str, obj, indent: int = 2) -> None:
    """``obj`` as JSON at ``path``, atomically."""
    import json

    with atomic_write(path) as f:
        json.dump(obj, f, indent=indent)
