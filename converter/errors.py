"""Errors a user can act on. The CLI prints them as one line and exits non-zero, no traceback.

`ConversionError` is the neutral `llama_parity.errors.InputError` under the converter's name: one
class, so that the CLI catches every bad-input error without importing the converter.
"""

from llama_parity.errors import InputError as ConversionError

__all__ = ["ConversionError"]
