"""The command line's user-facing error (a leaf, so that every command module can raise it)."""


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""
