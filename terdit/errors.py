"""User-facing errors: the CLI prints these as one line and exits with status 2."""


class TerditError(ValueError):
    """Bad input or usage, with a message that names the file or argument at fault.

    A ValueError, as Python libraries signal bad arguments, so `except ValueError` catches terdit's too."""
