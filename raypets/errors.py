"""The one error type for mistakes a user can make (bad path, bad config key, bad file)."""

from raypets.redaction import redact


class UserError(Exception):
    """A problem the user can fix; the CLI prints its message alone, without a traceback. Keys in the URIs it
    names are hidden (:func:`raypets.redaction.redact`)."""

    def __init__(self, message: str) -> None:
        super().__init__(redact(message))
