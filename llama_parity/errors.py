"""The one error a user can act on: bad or unreadable input (exit code 2, one line, no traceback).

Neutral ground: the converter (as `ConversionError`, the same class) and the judge (`verify`,
`diagnose`) both raise it, and the CLI catches it without importing either side.
"""


class InputError(Exception):
    """Bad or inconsistent input: the message names the culprit and says what to do."""
