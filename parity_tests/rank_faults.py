"""Faults injected into one torchrun rank by the tests alone (product code carries no test hook).

`rank_fault_env(folder, kind, rank)` writes a `sitecustomize.py` into `folder` and returns the
environment that puts it on the path of every process the launcher starts. In the process whose
torchrun RANK is `rank`, it patches `llama_parity.distributed` as that module is first imported:
- "fail": the rank raises before its first collective, while the others wait for it there;
- "abort-at-exit": the rank aborts (SIGABRT) where it would end with os._exit, after its work;
- "stall" (every rank): rank 0 computes for minutes before its first broadcast while the others
  wait for it inside that collective (marks "computing" and "waiting" in the folder say when);
  "stall-deaf": the same, rank 0 ignoring SIGINT/SIGTERM/SIGHUP (a mutant).
Every other process (the launcher, other ranks) is untouched."""

from __future__ import annotations

import os
from pathlib import Path

FAIL_MESSAGE = "failure injected into this rank by the test"

_SITE = r'''
import os, sys
if (os.environ.get("RANK") == {rank!r} or {kind!r}.startswith("stall")) and "LOCAL_RANK" in os.environ:
    import importlib.abc, importlib.util

    def _patch(mod):
        if {kind!r}.startswith("stall"):
            _stall(mod, os.environ["RANK"] == "0", {marks!r})
        elif {kind!r} == "fail":
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

    def _stall(mod, computing, marks):
        """Rank 0 computes for minutes before its range's broadcast; the others wait for it there."""
        import time
        from pathlib import Path

        if not computing:
            before = mod.RankRelay.before

            def waiting_before(self, tensors):
                Path(marks, "waiting").touch()  # then blocked in the broadcast of rank 0's hidden states
                return before(self, tensors)
            mod.RankRelay.before = waiting_before
            return
        after, answer = mod.RankRelay.after, mod._answer_signals

        def slow_after(self, tensors):
            Path(marks, "computing").touch()
            # interruptible, as torch's kernels are between ops; short sleeps, a guard: should the
            # signal land on another of the rank's threads (gloo's, torch's pools), its handler runs
            # only when the main thread returns to the interpreter, after a whole long sleep
            for _ in range(12000):
                time.sleep(0.05)
            return after(self, tensors)
        mod.RankRelay.after = slow_after
        if {kind!r} == "stall-deaf":  # the mutant: the computing rank ignores every signal

            def deaf(r):
                import signal

                answer(r)
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                    signal.signal(sig, signal.SIG_IGN)
            mod._answer_signals = deaf

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
    """Environment variables that make rank `rank` suffer `kind` ("fail" or "abort-at-exit"), or
    every rank "stall"/"stall-deaf" (marks in `folder`: "computing", "waiting")."""
    assert kind in ("fail", "abort-at-exit", "stall", "stall-deaf"), kind
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(_SITE.format(rank=str(rank), kind=kind, message=FAIL_MESSAGE,
                                                          marks=str(folder)))
    return {"PYTHONPATH": os.pathsep.join([str(folder)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
