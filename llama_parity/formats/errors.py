"""The one error the format readers raise."""


class FormatError(OSError):
    """A file that is not what its format says (truncated, corrupt header, absurd sizes). The message
    is one line naming the file; an OSError, as the environment's read errors are, so the CLI and
    verify report it as bad input, not as a crash or a parity failure."""
