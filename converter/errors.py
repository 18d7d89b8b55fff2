"""Errors a user can act on. The CLI prints them as one line and exits non-zero, no traceback."""


class ConversionError(Exception):
    """Bad or inconsistent input: the message says what is wrong and what to do."""
