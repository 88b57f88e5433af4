"""The one exception type for errors a user can cause (bad input, bad files)."""


class QftsimError(Exception):
    """A user-facing error: the message names the file, field or layer and what is accepted."""
