"""The one error type that means "the user asked for something that cannot work"."""


class UserError(Exception):
    """Bad input: printed as one line (what is wrong and how to fix it), exit code 2."""
