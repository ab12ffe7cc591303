"""The one error type a subcommand raises for the user to read."""


class CliError(Exception):
    """A user-facing error: printed as one line, no traceback."""
