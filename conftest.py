"""Source checkout: the suite runs against this checkout's editable install (`pip install -e .`),
which maps the top-level folders into `llama_parity` (pyproject.toml's package-dir) and registers
the suite's pytest plugin (`llama_parity/pytest_plugin.py`) through its `pytest11` entry point.

Without that install, or with `llama_parity` installed from somewhere else, the imports would
resolve to another copy or fail one by one: stop at once with the command that fixes it."""

import importlib.util
from pathlib import Path

import pytest

_here = Path(__file__).resolve().parent


def _where(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except ImportError:
        return None
    return Path(spec.origin).resolve().parent if spec is not None and spec.origin else None


def pytest_configure(config):
    want = {"llama_parity": _here / "llama_parity", "llama_parity.converter": _here / "converter",
            "llama_parity.parity_tests": _here / "parity_tests"}
    wrong = [f"{name} -> {_where(name) or 'not importable'}" for name, path in want.items() if _where(name) != path]
    if wrong:
        raise pytest.UsageError(f"llama-parity: this checkout ({_here}) is not what `llama_parity` imports "
                                f"({'; '.join(wrong)}): run `pip install -e .` here first")
