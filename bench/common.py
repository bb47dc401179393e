"""What the bench scripts share: printing their result as a table or as one JSON object."""

import contextlib
import json
import sys


def emit(args, run, print_table) -> None:
    """``--json``: exactly one JSON object on stdout (whatever ``run`` prints goes to stderr);
    otherwise ``print_table`` of the result."""
    if args.json:
        with contextlib.redirect_stdout(sys.stderr):
            result = run(args)
        print(json.dumps(result))
    else:
        print_table(run(args))
