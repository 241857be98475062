"""One exception type for every problem a user can fix; the CLI prints it on one line."""


class GraphpassError(Exception):
    """A user-facing error: bad model, bad data, bad option. Exit status 2, no traceback."""
