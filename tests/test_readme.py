"""The README's test command is what CI runs, word for word."""

import os

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def test_ci_runs_the_readme_test_command():
    ci = open(os.path.join(ROOT, ".ci", "run")).read().splitlines()
    command = ci[ci.index(next(line for line in ci if "README's test command, verbatim" in line)) + 1]
    assert "pytest" in command
    assert command in open(os.path.join(ROOT, "README.md")).read()
