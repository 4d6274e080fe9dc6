"""One exception type for every user-facing failure: the CLI prints its message on one line and exits 2."""


class WisparseError(Exception):
    """Bad input or an unusable state, with a message that says what to do."""
