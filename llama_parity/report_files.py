"""Report files (--json, --html, --plot) and output folders: checked before the run, written whole.

A verify of a big model runs for minutes; a report path that cannot be written must fail in the
first second (exit 2), not after the run (and, for `convert --json`, not after the model is
written). Reports go to a temporary sibling that is flushed to disk and renamed into place: a
signal or a full disk leaves either no report or a complete one, never an empty or truncated file.
Neutral code: the judge and the converter's CLI both use it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class OutputPathError(Exception):
    """An output path that cannot be written (exit 2, one line naming the flag and the path)."""


def _existing_ancestor(p: Path) -> Path:
    for a in [p, *p.parents]:
        if os.path.lexists(a):
            return a
    return Path("/")


def _probe_writable(folder: Path) -> str | None:
    """None when a file can be created in `folder` (a real probe: root ignores permission bits,
    not a read-only mount); otherwise why not."""
    try:
        fd, name = tempfile.mkstemp(prefix=".llama-parity-probe-", dir=folder)
    except OSError as e:
        return e.strerror or str(e)
    os.close(fd)
    os.unlink(name)
    return None


def _check_parent(path: Path, flag: str) -> None:
    """The folder that will hold `path` exists or can be made (nothing is made here), and is writable."""
    base = _existing_ancestor(path.parent)
    if not base.is_dir():
        raise OutputPathError(f"{flag} {path}: {base} is a file, not a directory; choose another path")
    why = _probe_writable(base)
    if why:
        raise OutputPathError(f"{flag} {path}: cannot write in {base} ({why}); choose a writable location")


def check_output_file(path: str | Path | None, flag: str) -> None:
    """Before the run: `path` can be written as a file (`-` means stdout and is always fine)."""
    if path is None or str(path) == "-":
        return
    p = Path(os.path.abspath(path))
    if p.is_dir():
        raise OutputPathError(f"{flag} {path} is a folder; give a file path, e.g. {Path(path) / ('report' + _ext(flag))}")
    if os.path.lexists(p) and not p.is_file():
        raise OutputPathError(f"{flag} {path} exists and is not a regular file")
    _check_parent(p, flag)


def _ext(flag: str) -> str:
    return {"--json": ".json", "--html": ".html", "--plot": ".png"}.get(flag, "")


def check_output_dir(path: str | Path | None, flag: str = "--output-dir") -> None:
    """Before the run: `path` is a folder or can be made one, in a writable place."""
    if path is None:
        return
    p = Path(os.path.abspath(path))
    if os.path.lexists(p) and not p.is_dir():
        raise OutputPathError(f"{flag} {path} exists and is not a directory")
    _check_parent(p, flag)


def check_distinct(paths: dict[str, str | None]) -> None:
    """Two outputs of one run given the same file: the second would overwrite the first."""
    seen: dict[str, str] = {}
    for flag, p in paths.items():
        if p is None or str(p) == "-":
            continue
        key = os.path.realpath(p)
        if key in seen:
            raise OutputPathError(f"{seen[key]} and {flag} both write {p}; give each its own file")
        seen[key] = flag


def check_not_an_input(reports: dict[str, str | None], inputs: dict[str, list]) -> None:
    """A report must not land on or among what the run reads: `verify --json HF/model.safetensors`
    replaced the weights it had just judged with the report, and a new file in the HF folder is one
    the attestation did not list (`verify --attestation` then names it as added). `inputs`: flag ->
    its paths (folders or files); symlinks resolved on both sides."""
    for flag, p in reports.items():
        if p is None or str(p) == "-":
            continue
        real = Path(os.path.realpath(p))
        for in_flag, paths in inputs.items():
            for q in paths:
                if q is None or not os.path.lexists(q):
                    continue
                rq = Path(os.path.realpath(q))
                if real == rq or (rq.is_dir() and rq in real.parents):
                    where = "is" if real == rq else "is inside"
                    raise OutputPathError(f"{flag} {p} {where} {in_flag} {q}, which this run reads: the report "
                                          "would overwrite or add to its files; write it elsewhere")


class StagedFile:
    """A file's bytes written whole to a temporary sibling and flushed to disk now, put in place later:
    `publish()` renames it into place (a rename allocates nothing, so it cannot meet a full disk),
    `discard()` removes it and the folders made for it. `convert --json R` stages R this way before
    the model folder is renamed into place: a disk too full for the report refuses both."""

    def __init__(self, path: str | Path, data: bytes | str):
        self.path = Path(path)
        parent = self.path.parent
        self._made = [a for a in [parent, *parent.parents] if not os.path.lexists(a)]  # deepest first
        self.tmp: Path | None = None
        try:
            parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.tmp-", dir=parent)
            self.tmp = Path(tmp)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data.encode("utf-8") if isinstance(data, str) else data)
                fh.flush()
                os.fsync(fh.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a report is an ordinary file
        except BaseException:  # a signal (the CLI raises it as KeyboardInterrupt) or a full disk: no half file
            self.discard()
            raise

    def publish(self) -> Path:
        os.replace(self.tmp, self.path)
        self.tmp = None
        dfd = os.open(self.path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return self.path

    def discard(self) -> None:
        """Remove the temporary file (if not published) and the folders made for it, if still empty."""
        if self.tmp is not None:
            try:
                os.unlink(self.tmp)
            except OSError:
                pass
            self.tmp = None
        for d in self._made:
            try:
                d.rmdir()
            except OSError:
                break


def write_atomic(path: str | Path, data: bytes | str) -> Path:
    """Write `data` to `path` whole or not at all: temporary sibling, fsync, rename, fsync the folder."""
    staged = StagedFile(path, data)
    try:
        return staged.publish()
    except BaseException:
        staged.discard()
        raise
