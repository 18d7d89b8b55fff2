"""Real child processes forked from the test process, for the tests that signal, race or starve a
running CLI (test_bad_inputs.py, test_cli_ux.py)."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import sys
import tempfile
import time
import traceback

import torch


def _stop_tqdm_monitor() -> None:
    """No tqdm monitor thread in this process from now on: it takes tqdm's lock every few seconds, and
    a fork at that moment hands the child a lock no thread of its own will release (its first progress
    bar, or the next, then waits forever: a SIGTERM'd verify child once stayed 60 s)."""
    from tqdm import tqdm

    tqdm.monitor_interval = 0
    if tqdm.monitor is not None:
        tqdm.monitor.exit()  # joins the thread
        tqdm.monitor = None


class Forked:
    """`python -c script *argv` as a child forked from this test process: the same fresh-process signal
    dispositions, stdout/stderr of its own and an exit status as Popen reports it (128+n from the CLI's
    handlers, -n for a signal that killed it), but torch and llama_parity already imported, which was
    most of each child's cost (8 children, about 2.5 s of CPU each as real `python -c` processes).
    The child never returns into pytest: it leaves through os._exit."""

    def __init__(self, script: str, argv: list[str], stdout_fd: int | None = None):
        """`stdout_fd`: the child's stdout (e.g. a pipe's write end); by default a file read by communicate."""
        self._out, self._err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        self.returncode: int | None = None
        _stop_tqdm_monitor()
        self.pid = os.fork()
        if self.pid == 0:
            self._child(script, argv, self._out.fileno() if stdout_fd is None else stdout_fd)

    def _child(self, script: str, argv: list[str], stdout_fd: int) -> None:
        code = 1
        try:
            os.dup2(stdout_fd, 1)
            os.dup2(self._err.fileno(), 2)
            sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
            sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
            # as a fresh interpreter has them (SIGPIPE stays ignored, as python sets it in both)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            for sig in (signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            torch.set_num_threads(1)  # the parent's OpenMP pool does not survive fork
            sys.argv = ["-c", *argv]
            exec(compile(script, "<string>", "exec"), {"__name__": "__main__"})
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001 - reported as python would, then the exit below
            traceback.print_exc()
        finally:
            with contextlib.suppress(BaseException):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int:
        t0 = time.monotonic()
        while self.poll() is None:
            if time.monotonic() - t0 > timeout:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                raise AssertionError(f"child {self.pid} still running after {timeout} s (killed)")
            time.sleep(0.01)
        return self.returncode

    def communicate(self, timeout: float = 60) -> tuple[str, str]:
        self.wait(timeout)
        texts = []
        for f in (self._out, self._err):
            f.seek(0)
            texts.append(f.read().decode(errors="replace"))
        return texts[0], texts[1]
