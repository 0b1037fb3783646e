"""The one exception type that reaches the user as a single line (and exit code 2)."""


class UserError(Exception):
    """Bad input: printed as `error: <message>` with no traceback, before anything is recorded."""
