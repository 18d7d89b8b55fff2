"""llama-parity: verification-first conversion of Meta's Llama checkpoints to Hugging Face format.

One import namespace: `llama_parity.converter`, `llama_parity.reference_model`, `llama_parity.fixtures`
and `llama_parity.parity_tests`. An installed wheel holds them inside this package (pyproject.toml's
package-dir maps the repository's top-level folders there); in a source checkout they stay beside
this folder, and the loop below lets the same import names find them.
"""

from pathlib import Path as _Path

__version__ = "0.3.0"

SUBPACKAGES = ("converter", "reference_model", "fixtures", "parity_tests")

_here = _Path(__file__).resolve().parent
_checkout = _here.parent
if not (_here / "converter").is_dir() and (_checkout / "pyproject.toml").is_file() \
        and all((_checkout / s / "__init__.py").is_file() for s in SUBPACKAGES):
    # Source checkout: search the repository root for the sub-packages too (after this folder).
    __path__.append(str(_checkout))  # noqa: F821 (a package's __path__)
