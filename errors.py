"""The one exception type the command line turns into a one-line message.

Raise ``UserError`` for anything the user can fix (a missing file, a bad flag, no network for
pretrained weights). The message must be one line that names the file or flag and the fix.
``train_ultimate.py`` prints it as ``error: <message>`` and exits with status 2; any other
exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem in the user's input or environment, reported as one line without a traceback."""
