"""Output folders that appear complete or not at all, and never at the cost of an input.

A conversion writes into a hidden sibling `.NAME.partial-PID-XXXX`, flushes every file and the
folder to disk, and renames it into place; a failure removes it. Three things can still go wrong
around that, and each is refused or reported here, never silently absorbed:
- the folder to be replaced is, contains or lies inside something the conversion reads
  (`--overwrite` on the input folder or its parent would delete the checkpoint);
- the output's parent is not writable, or the disk cannot hold the output;
- a run killed with SIGKILL (or a power loss) leaves its hidden folder behind. The next run into
  the same output removes it when its owner process no longer runs on this machine (partial
  output is never anything but garbage), refuses when a live conversion is still writing there,
  and names it with the command to remove it when it cannot tell (another host, an older
  version). A `.NAME.old-PID` folder (the previous output set aside by an interrupted
  `--overwrite`) is the user's data: it is named, never removed.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import signal
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, TypeVar

from .errors import ConversionError

_OWNER = ".llama-parity-owner"  # "host pid" of the run writing a staging folder


def _variants(p: Path) -> list[Path]:
    """The path as the user reaches it (parent resolved) and, for a symlink, the file it points to."""
    p = Path(os.path.abspath(p))
    out = [p.parent.resolve() / p.name]
    real = p.resolve()
    if real not in out:
        out.append(real)
    return out


def _within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def refuse_replacing_inputs(output_dir: Path, input_files: Iterable[Path], input_dirs: Iterable[Path]) -> None:
    """Exit-2 refusal when the folder about to be replaced is, contains or lies inside an input.

    `input_files` are the files the conversion reads (shards, params.json, tokenizer.model possibly
    one folder up, checklist.chk, ...); `input_dirs` the folders given as inputs. Symlinks are
    followed both ways: a link to the input folder is the input folder.
    """
    outs = _variants(output_dir)
    shown = f"{output_dir} (a link to {output_dir.resolve()})" if output_dir.is_symlink() else str(output_dir)
    for d in input_dirs:
        for dv in _variants(Path(d)):
            for o in outs:
                if _within(o, dv) or _within(dv, o):
                    rel = "is" if o == dv else ("lies inside" if _within(o, dv) else "contains")
                    raise ConversionError(f"refusing to replace {shown}: it {rel} the input folder {d}; choose an "
                                          "--output-dir outside the input folders")
    for f in input_files:
        for fv in _variants(Path(f)):
            for o in outs:
                if _within(fv, o):
                    raise ConversionError(
                        f"refusing to replace {shown}: it {'is' if fv == o else 'contains'} {f}, an input of "
                        "this conversion; choose an --output-dir outside the input folders")


def _pid_runs_llama_parity(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, someone else's: assume it may be writing
    try:  # a reused pid (after a reboot) running something else does not count
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True
    return b"llama_parity" in cmd or b"llama-parity" in cmd


def handle_leftovers(output_dir: Path) -> list[str]:
    """Deal with hidden folders earlier runs into `output_dir` left behind; notes for the report."""
    notes = []
    parent = output_dir.parent
    if not parent.is_dir():
        return notes
    partial_re = re.compile(rf"^\.{re.escape(output_dir.name)}\.partial-(?:(\d+)-)?\w+$")
    old_re = re.compile(rf"^\.{re.escape(output_dir.name)}\.old-\d+$")
    for p in sorted(parent.iterdir()):
        if old_re.match(p.name):
            notes.append(f"{p} holds a previous {output_dir.name} set aside by an interrupted --overwrite; "
                         f"rename it back or remove it: rm -rf '{p}'")
            continue
        m = partial_re.match(p.name)
        if not m or not p.is_dir():
            continue
        try:
            host, pid = (p / _OWNER).read_text().split()
            pid = int(pid)
        except (OSError, ValueError):
            host, pid = None, None
        if host == socket.gethostname() and pid is not None:
            if _pid_runs_llama_parity(pid):
                raise ConversionError(f"another llama-parity (pid {pid}) is writing {output_dir} (in {p}); wait for it "
                                      f"to finish, or stop it, or choose another --output-dir")
            shutil.rmtree(p, ignore_errors=True)
            notes.append(f"removed {p}, an incomplete output left by an interrupted run (pid {pid}, no longer running)")
        else:
            notes.append(f"{p} looks like an incomplete output left by an interrupted run; remove it: rm -rf '{p}'")
    return notes


def _free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def prepare_output(output_dir: Path, overwrite: bool, *, input_files: Iterable[Path] = (),
                   input_dirs: Iterable[Path] = (), needed_bytes: int = 0) -> tuple[Path, list[str]]:
    """Checks, then a fresh staging folder next to output_dir; returns it and notes for the report."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ConversionError(f"output path {output_dir} exists and is not a directory")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        refuse_replacing_inputs(output_dir, input_files, input_dirs)
        if not overwrite:
            raise ConversionError(f"output directory {output_dir} is not empty; pass --overwrite to replace it")
    parent = output_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConversionError(f"cannot create the output's parent folder {parent}: {e.strerror}; "
                              "choose another --output-dir") from None
    notes = handle_leftovers(output_dir)
    free = _free_bytes(parent)
    if free is not None and needed_bytes > free:
        raise ConversionError(f"not enough disk space in {parent}: the output needs {needed_bytes / 1e9:.3f} GB, "
                              f"{free / 1e9:.3f} GB free; free some space or choose another --output-dir")
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-{os.getpid()}-", dir=parent))
    except OSError as e:
        raise ConversionError(f"cannot write in {parent}: {e.strerror}; choose an --output-dir in a writable "
                              "folder") from None
    try:
        (staging / _OWNER).write_text(f"{socket.gethostname()} {os.getpid()}\n")
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result should be an ordinary folder
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise write_error(e, parent) from None
    return staging, notes


T = TypeVar("T")


def _open_lock(lock: Path) -> int | None:
    """An exclusive flock on `lock` (created if needed), or None when another process holds it. The file
    may be removed by its previous holder between our open and our lock: then we locked a dead inode
    and try again."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextmanager
def output_lock(output_dir: Path, what: str = "--output-dir"):
    """One writer per output for the whole run: a second convert, to-meta or demo into the same folder
    refuses at once instead of racing to the rename (both exited 0, the second silently replacing the
    first's output). The lock is `.NAME.lock` beside the output, removed when the run ends; the kernel
    releases it if the process dies, so a SIGKILLed run never blocks the next one."""
    output_dir = Path(os.path.abspath(output_dir))
    parent = output_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConversionError(f"cannot create the output's parent folder {parent}: {e.strerror}; "
                              f"choose another {what}") from None
    lock = parent / f".{output_dir.name}.lock"
    try:
        fd = _open_lock(lock)
    except OSError as e:
        raise ConversionError(f"cannot write in {parent}: {e.strerror}; choose an {what} in a writable folder") from None
    if fd is None:
        try:
            holder = lock.read_text().strip() or "?"
        except OSError:
            holder = "?"
        raise ConversionError(f"another llama-parity (pid {holder}) is writing {output_dir}; wait for it to "
                              f"finish, or stop it, or choose another {what}")
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        try:
            os.unlink(lock)  # while still holding it: a waiting opener sees a new inode and retries
        except OSError:
            pass
        os.close(fd)


def _follow_link(output_dir: Path, notes: list[str]) -> Path:
    """A symlinked output is written through: its target is replaced, the link stays (renaming over
    the link replaced it with a folder and left the target empty)."""
    if not output_dir.is_symlink():
        return output_dir
    target = Path(os.path.realpath(output_dir))
    notes.append(f"{output_dir} is a link: written into its target {target}")
    return target


def write_atomically(output_dir: Path, write: Callable[[Path], T], *, overwrite: bool, notes: list[str],
                     input_files: Iterable[Path] = (), input_dirs: Iterable[Path] = (), needed_bytes: int = 0,
                     companion: Callable[[T, Path], object] | None = None) -> T:
    """Run `write(staging)` in a fresh staging folder and rename it into place only when it returns;
    on any failure (a signal included) the staging folder goes and the output is untouched. The
    output's lock is held from the checks to the rename. Notes about leftovers of earlier runs are
    appended to `notes` before writing starts.

    `companion(result, staging)`, when given, stages a file published with the output (convert's
    --json report): called once the output is complete and flushed, before the rename; it returns an
    object with publish() and discard() (report_files.StagedFile), or None (it wrote into `staging`,
    for a file inside the output). If it raises, the output is not published; its publish() (a
    rename) runs right after the output's, signals deferred."""
    if Path(output_dir).is_symlink():  # named as the user gave it: "X (a link to Y)"
        refuse_replacing_inputs(Path(output_dir), input_files, input_dirs)
    output_dir = _follow_link(Path(output_dir), notes)
    made = [a for a in [output_dir.parent, *output_dir.parent.parents] if not os.path.lexists(a)]  # deepest first
    try:
        with output_lock(output_dir):
            staging, leftovers = prepare_output(output_dir, overwrite, input_files=input_files,
                                                input_dirs=input_dirs, needed_bytes=needed_bytes)
            notes += leftovers
            return _write_and_commit(staging, output_dir, write, companion)
    except BaseException:
        for d in made:  # the folders made for the output, unless something else is in them now
            try:
                d.rmdir()
            except OSError:
                break
        raise


def _write_and_commit(staging: Path, output_dir: Path, write: Callable[[Path], T],
                      companion: Callable[[T, Path], object] | None) -> T:
    staged = None
    try:
        result = write(staging)
        flush_output(staging)
        staged = companion(result, staging) if companion is not None else None
        commit_output(staging, output_dir, then=staged.publish if staged is not None else None)
    except BaseException as e:
        if staged is not None:
            staged.discard()  # a no-op once published
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, OSError):
            raise write_error(e, output_dir.parent) from None
        raise
    return result


def write_error(e: OSError, where: Path) -> ConversionError:
    """One actionable line for an OSError met while writing the output."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return ConversionError(f"no space left on the device holding {where} (disk full or quota exceeded) while "
                               "writing the output; nothing was kept: free some space or choose another --output-dir")
    what = f" {e.filename}" if e.filename else f" in {where}"
    return ConversionError(f"cannot write{what}: {e.strerror or e}; nothing was kept")


def _fsync_path(p: Path, directory: bool = False) -> None:
    fd = os.open(p, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_CRITICAL = {"depth": 0, "pending": None}


def defer_signal(signum: int) -> bool:
    """For the CLI's signal handler: during commit's renames, remember the signal instead of
    raising (a SIGTERM between them would leave the old output set aside and no new one)."""
    if _CRITICAL["depth"]:
        _CRITICAL["pending"] = signum
        return True
    return False


@contextmanager
def _signals_deferred():
    _CRITICAL["depth"] += 1
    try:
        yield
    finally:
        _CRITICAL["depth"] -= 1
        pending, _CRITICAL["pending"] = _CRITICAL["pending"], None
        if pending is not None and not _CRITICAL["depth"]:
            signal.raise_signal(pending)  # handled now, with the output complete and in place


def flush_output(staging: Path) -> None:
    """Ordinary permissions, and every file and folder of the finished output on disk."""
    umask = os.umask(0)
    os.umask(umask)
    (staging / _OWNER).unlink(missing_ok=True)
    # Files written through temporary files are private (0600); the result is an ordinary folder.
    # Every file and the folder reach the disk before the rename: a power loss after it must not
    # leave a complete-looking model of empty files.
    for p in staging.rglob("*"):
        if p.is_file():
            p.chmod(0o666 & ~umask)
            _fsync_path(p)
        elif p.is_dir():
            _fsync_path(p, directory=True)
    _fsync_path(staging, directory=True)


def commit_output(staging: Path, output_dir: Path, then: Callable[[], object] | None = None) -> None:
    """Rename the flushed staging folder into place (replacing an old output), then `then()` (the
    companion file's rename), with signals deferred across the renames."""
    trash = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}")
    replacing = output_dir.exists() or output_dir.is_symlink()
    with _signals_deferred():
        if replacing:
            output_dir.rename(trash)
        staging.rename(output_dir)
        if then is not None:
            then()
        _fsync_path(output_dir.parent, directory=True)
    if replacing:
        if trash.is_symlink():
            trash.unlink()
        else:
            shutil.rmtree(trash, ignore_errors=True)
