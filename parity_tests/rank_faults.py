"""Faults injected into one torchrun rank by the tests alone (product code carries no test hook).

`rank_fault_env(folder, kind, rank)` writes a `sitecustomize.py` into `folder` and returns the
environment that puts it on the path of every process the launcher starts. In the process whose
torchrun RANK is `rank`, it patches `llama_parity.distributed` as that module is first imported:
- "fail": the rank raises before its first collective, while the others wait for it there;
- "abort-at-exit": the rank aborts (SIGABRT) where it would end with os._exit, after its work.
Every other process (the launcher, other ranks) is untouched."""

from __future__ import annotations

import os
from pathlib import Path

FAIL_MESSAGE = "failure injected into this rank by the test"

_SITE = r'''
import os, sys
if os.environ.get("RANK") == {rank!r} and "LOCAL_RANK" in os.environ:
    import importlib.abc, importlib.util

    def _patch(mod):
        if {kind!r} == "fail":
            before = mod.RankRelay.before

            def failing_before(self, tensors):
                if not self.started:
                    raise RuntimeError({message!r})
                return before(self, tensors)
            mod.RankRelay.before = failing_before
        else:
            class _OS:
                def __getattr__(self, name):
                    return getattr(os, name)

                def _exit(self, code):
                    os.abort()
            mod.os = _OS()

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "llama_parity.distributed":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                _patch(module)
            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _Finder())
'''


def rank_fault_env(folder: Path, kind: str, rank: int = 1) -> dict[str, str]:
    """Environment variables that make rank `rank` suffer `kind` ("fail" or "abort-at-exit")."""
    assert kind in ("fail", "abort-at-exit"), kind
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(_SITE.format(rank=str(rank), kind=kind, message=FAIL_MESSAGE))
    return {"PYTHONPATH": os.pathsep.join([str(folder)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
