"""Source checkout: the parity suite's options and fixtures live in the package's pytest plugin
(`llama_parity/pytest_plugin.py`), which an installed llama-parity registers through its `pytest11`
entry point. Without an install (plain `PYTHONPATH=.`), register it here instead."""

from importlib.metadata import entry_points

if not any(ep.value == "llama_parity.pytest_plugin" for ep in entry_points(group="pytest11")):
    pytest_plugins = ["llama_parity.pytest_plugin"]
