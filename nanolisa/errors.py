"""Errors a user can cause.

Anything the user controls (a flag, a model directory, a data file) is checked at the edge and raises
`UserError` with one line that says what is wrong and how to fix it. The command-line tools turn it into
`error: ...` on stderr and exit status 2, with no traceback (nanolisa/cli.py). Bugs in nanolisa itself still
raise ordinary exceptions with a full traceback, so they get reported and fixed.
"""


class UserError(Exception):
    """A problem with the user's input: reported as one line, exit status 2."""
