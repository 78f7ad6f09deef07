"""User-facing errors: the CLI prints these as one line and exits with status 2."""


class TerditError(Exception):
    """Bad input or usage, with a message that names the file or argument at fault."""
