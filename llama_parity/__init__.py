"""llama-parity: verification-first conversion of Meta's Llama checkpoints to Hugging Face format.

One import namespace: `llama_parity.converter`, `llama_parity.reference_model`, `llama_parity.fixtures`
and `llama_parity.parity_tests` are the repository's top-level folders of those names, mapped into
this package by pyproject.toml's package-dir: an installed wheel holds them inside this folder, an
editable install (`pip install -e .`) resolves the same names to the checkout's folders. Nothing
else of the checkout is part of the package (`llama_parity.benchmarks` and `llama_parity.conftest`
do not import). Layout and data flow: docs/architecture.md.
"""

__version__ = "0.3.0"
