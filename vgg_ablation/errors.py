"""The one exception type that reaches the user as a single line (and exit code 2)."""


class UserError(Exception):
    """Bad input: printed as `error: <message>` with no traceback, before anything is recorded."""


class StoreAway(Exception):
    """The tracking store stopped answering before a cell began training: one `error:` line and
    exit 1 (not bad input: the same command works once the store is back)."""
