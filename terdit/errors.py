"""User-facing errors: the CLI prints these as one line and exits with status 2."""


class TerditError(ValueError):
    """Bad input or usage, with a message that names the file or argument at fault.

    A ValueError, as Python libraries signal bad arguments, so `except ValueError` catches terdit's too."""


class Interrupted(KeyboardInterrupt):
    """Stopped by a signal after saving what there was to save; the CLI exits with 128 + the signal."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
        self.code = 128 + signum
