"""The one exception type the command line turns into a one-line message.

Raise ``UserError`` for anything the user can fix (a missing file, a bad flag, no network for
pretrained weights). The message must be one line that names the file or flag and the fix.
``train_ultimate.py`` prints it as ``error: <message>`` and exits with status 2; any other
exception is a bug and keeps its traceback.
"""

import os


class UserError(Exception):
    """A problem in the user's input or environment, reported as one line without a traceback."""


def check_output_file(flag: str, path: str, example: str) -> None:
    """An output file's path (``--out``, ``--plot``, ``--zip``) must not be a folder: writing it would
    fail with ``IsADirectoryError``. ``example``: a file name to suggest inside that folder."""
    if path and os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder: name the file to write, e.g. {os.path.join(path, example)}")
