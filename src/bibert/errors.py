"""The one exception type users see: a message that names the problem and the fix."""


class BibertError(Exception):
    """A user-facing error. The CLI prints its message and exits with status 2."""
