"""The one error type that means "the user asked for something that cannot work"."""

import sys
from contextlib import contextmanager


class UserError(Exception):
    """Bad input: printed as one line (what is wrong and how to fix it), exit code 2."""


@contextmanager
def exit_on_user_error():
    """Entry points wrap their work in this so bad input never shows a traceback."""
    try:
        yield
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
