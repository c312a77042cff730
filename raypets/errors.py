"""The one error type for mistakes a user can make (bad path, bad config key, bad file)."""


class UserError(Exception):
    """A problem the user can fix; the CLI prints its message alone, without a traceback."""
