"""torch.save's `.pth` files (Meta's consolidated.NN.pth): the zip records, the pickle's tensor
metadata, safe loading, and tensor rows read with pread.

A `.pth` is an uncompressed zip: `<archive>/data.pkl` (the pickle naming each tensor's storage record,
offset, shape and stride), `<archive>/data/N` (one record per storage, its raw bytes), plus small
bookkeeping records. `index_pth` reads the pickle without executing it (only the few globals a state
dict of plain tensors uses are resolved), and `stored_data_offset` finds where a record's bytes start,
so `PthReader.rows` copies exactly the rows asked for into a caller's buffer. Files that do not fit
this pattern (compressed records, legacy formats, strided tensors) are read through torch.load's
memory map instead: correct, but those pages stay in RSS while mapped.
"""

from __future__ import annotations

import collections
import errno
import mmap
import os
import pickle
import re
import struct
import threading
import zipfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from .dtypes import STORAGE_DTYPES, nbytes
from .errors import FormatError
from .pread import drop_cache, open_for_reading, pread_into


@dataclass(frozen=True)
class RawTensor:
    """Where one contiguous tensor's bytes sit inside a .pth file."""
    offset: int  # file offset of element 0
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def row_bytes(self) -> int:
        return nbytes(self.shape[1:], self.dtype.itemsize)


@dataclass(frozen=True)
class StorageRecord:
    """One `data/N` record: where its bytes start and where torch's zip writer keeps its CRC-32 (in a
    data descriptor after the bytes when flag bit 3 is set, else the local header; and the central
    directory)."""
    data_offset: int
    size: int
    crc_offsets: tuple[int, int]


def stored_data_offset(fh, info: zipfile.ZipInfo) -> int | None:
    """File offset of an uncompressed zip record's first data byte (after its local header, whose
    name and extra-field lengths may differ from the central directory's); None if not stored."""
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    fh.seek(info.header_offset)
    local = fh.read(30)
    if local[:4] != b"PK\x03\x04":
        return None
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_len + extra_len


def storage_records(path: Path) -> dict[int, StorageRecord]:
    """N -> the `data/N` record of every storage (the pickle and bookkeeping records left out); a
    compressed or malformed record is a FormatError."""
    out = {}
    with open(path, "rb") as f, zipfile.ZipFile(f) as z:
        central = z.start_dir
        for info in z.infolist():
            parts = info.filename.split("/")
            if len(parts) >= 2 and parts[-2] == "data" and parts[-1].isdigit():
                data = stored_data_offset(f, info)
                if data is None:
                    raise FormatError(f"{path}: unexpected zip layout for {info.filename}")
                if info.flag_bits & 8:  # the descriptor: optional signature, then the CRC
                    f.seek(data + info.file_size)
                    crc_field = data + info.file_size + (4 if f.read(4) == b"PK\x07\x08" else 0)
                else:
                    crc_field = info.header_offset + 14
                out[int(parts[-1])] = StorageRecord(data, info.file_size, (crc_field, central + 16))
            central += 46 + len(info.orig_filename.encode()) + len(info.extra) + len(info.comment)
    return out


# --- the pickle's metadata, without executing it -----------------------------------------------------
class _Unsupported(Exception):
    pass


@dataclass(frozen=True)
class _StorageRef:
    record: str
    dtype: torch.dtype


@dataclass(frozen=True)
class _TensorRef:
    record: str
    dtype: torch.dtype
    storage_offset: int
    shape: tuple[int, ...]


def _tensor_ref(storage, storage_offset, size, stride, dtype: torch.dtype) -> _TensorRef:
    expected, acc = [], 1
    for d in reversed(size):
        expected.insert(0, acc)
        acc *= d
    if any(s != e for s, e, d in zip(stride, expected, size) if d > 1):
        raise _Unsupported("non-contiguous tensor")
    return _TensorRef(storage.record, dtype, int(storage_offset), tuple(int(d) for d in size))


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *_ignored):
    """A tensor over a typed storage (bf16, fp16, fp32, ints: what Meta's checkpoints hold)."""
    return _tensor_ref(storage, storage_offset, size, stride, storage.dtype)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, _requires_grad, _hooks, dtype, *_ignored):
    """A tensor over an untyped storage, its dtype given here (torch writes fp8 and uint16/32/64 so);
    the storage offset counts elements of that dtype."""
    return _tensor_ref(storage, storage_offset, size, stride, dtype)


_UNTYPED = object()  # torch.storage.UntypedStorage in a persistent id


class _IndexUnpickler(pickle.Unpickler):
    """Reads torch.save's pickle into (record, offset, shape, dtype) records; executes nothing else.

    Only the handful of globals a state dict of plain tensors uses are resolved; anything else
    raises _Unsupported and the caller falls back to torch.load.
    """

    def find_class(self, module, name):
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor_v3"):
            return _rebuild_tensor_v2 if name.endswith("v2") else _rebuild_tensor_v3
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch.storage", "UntypedStorage"):
            return _UNTYPED
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)  # _rebuild_tensor_v3's dtype argument
        raise _Unsupported(f"{module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and (isinstance(pid[1], torch.dtype) or pid[1] is _UNTYPED)):
            raise _Unsupported(f"persistent id {pid!r:.80}")
        return _StorageRef(str(pid[2]), pid[1] if isinstance(pid[1], torch.dtype) else torch.uint8)


def index_pth(path: Path) -> dict[str, RawTensor] | None:
    """key -> RawTensor for a torch.save zip of contiguous tensors; None if the file is not one."""
    try:
        with zipfile.ZipFile(path) as zf, Path(path).open("rb") as fh:
            infos = {zi.filename: zi for zi in zf.infolist()}
            pkl = next((n for n in infos if n.endswith("/data.pkl") and n.count("/") == 1), None)
            if pkl is None:
                return None
            prefix = pkl[: -len("data.pkl")]
            state = _IndexUnpickler(zf.open(pkl)).load()
            if not isinstance(state, dict):
                return None
            data_start: dict[str, int] = {}
            out = {}
            for key, ref in state.items():
                if not isinstance(ref, _TensorRef):
                    return None
                if ref.record not in data_start:
                    zi = infos.get(f"{prefix}data/{ref.record}")
                    start = None if zi is None else stored_data_offset(fh, zi)
                    if start is None:
                        return None
                    data_start[ref.record] = start
                out[key] = RawTensor(data_start[ref.record] + ref.storage_offset * ref.dtype.itemsize,
                                     ref.shape, ref.dtype)
            return out
    except (_Unsupported, zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, TypeError,
            AttributeError, KeyError, IndexError, OSError):
        return None


def load_state_dict(p: Path) -> dict[str, torch.Tensor]:
    """A .pth as a state dict of tensors, memory-mapped (no tensor data read), without running its pickle.

    `weights_only=True` unpickles tensors and containers only: a file whose pickle would call
    anything else (os.system, eval, ...) is refused here, before any of it runs.
    """
    try:
        sd = torch.load(p, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"GLOBAL ([\w.]+)", str(e))
        why = f"it would call {m.group(1)}" if m else (str(e).splitlines() or ["?"])[0][:120]
        raise FormatError(f"refusing to load {p}: its pickle holds more than tensors ({why}); a checkpoint "
                          "from Meta never does: re-download it from a trusted source") from None
    except Exception as e:  # torch raises many types for truncated / foreign files
        first = (str(e).splitlines() or [""])[0].split(". ")[0][:160]
        raise FormatError(f"cannot read {p} ({first}): truncated download or not a PyTorch checkpoint? "
                          "Re-download it (checklist.chk and --verify-md5 tell which file is damaged)") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise FormatError(f"{p} does not hold a state dict of named tensors (not a Meta checkpoint shard?)")
    return sd


class PthReader:
    """One .pth file's tensors, or rows of them, read with pread into a fresh tensor or a caller's
    buffer; never through a map of the whole file when it is a plain torch.save zip (mapped pages stay
    in the process's RSS: a streamed 8B verify looked like 19.6 GB). `mapped` maps one tensor's bytes
    for as long as its views live (a layer at a time, closed with its last view).

    The state dict (`tensors`) is torch.load(mmap=True, weights_only=True): keys, shapes and dtypes
    without touching data. Each tensor's byte offset comes from `index_pth`; a tensor it cannot place
    is copied from the memory map instead (its key lands in `fallback_keys`). `keep_cached=False`
    drops the pages read from the page cache (a conversion reads each byte once).
    """

    def __init__(self, path: str | Path, *, keep_cached: bool = True):
        self.path = Path(path)
        self.keep_cached = keep_cached
        self.fallback_keys: set[str] = set()
        self._fd: int | None = None
        self._lock = threading.Lock()

    @cached_property
    def tensors(self) -> dict[str, torch.Tensor]:
        return load_state_dict(self.path)

    @cached_property
    def raw(self) -> dict[str, RawTensor]:
        return index_pth(self.path) or {}

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def keys(self):
        return self.tensors.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].dtype

    def read(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The whole tensor: a new one, or copied into `out` (contiguous, its shape and dtype)."""
        shape = self.shape(key)
        if out is not None and tuple(out.shape) != shape:
            raise ValueError(f"{self.path}: read({key!r}): buffer of shape {tuple(out.shape)}, not {shape}")
        if not shape:
            return self.rows(key, 0, 1, out=None if out is None else out.reshape(1)).reshape(())
        return self.rows(key, 0, shape[0], out=out)

    def rows(self, key: str, start: int, stop: int, out: torch.Tensor | None = None, *,
             keep_cached: bool | None = None) -> torch.Tensor:
        """Rows [start, stop) along dim 0 (a 0-d tensor is one row) in the file's dtype: a new tensor,
        or copied into `out` (contiguous, that dtype, [stop - start, *shape[1:]] elements)."""
        t = self.tensors[key]
        if out is None:
            out = torch.empty((stop - start, *t.shape[1:]), dtype=t.dtype)
        if not (0 <= start <= stop <= (t.shape[0] if t.dim() else 1)) or not out.is_contiguous() \
                or out.dtype != t.dtype or out.numel() != (stop - start) * nbytes(t.shape[1:], 1):
            raise ValueError(f"{self.path}: rows({key!r}, {start}, {stop}): bad range or buffer")
        if out.numel() == 0:
            return out
        raw = self.raw.get(key)
        if raw is None or raw.shape != tuple(t.shape) or raw.dtype != t.dtype:
            self.fallback_keys.add(key)
            out.copy_((t[start:stop] if t.dim() else t.reshape(1)).reshape(out.shape))
            return out
        fd, offset = self._open(), raw.offset + start * raw.row_bytes
        pread_into(fd, memoryview(out.reshape(-1).view(torch.uint8).numpy()), offset, name=f"{self.path}: {key}")
        if not (self.keep_cached if keep_cached is None else keep_cached):
            drop_cache(fd, offset, out.numel() * out.element_size())
        return out

    def mapped(self, key: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """The tensor (rows [start, stop) along dim 0 when given) as a view of the file's pages, for
        bytes read again and again from the page cache (greedy decoding reads every layer and the
        output matrix once per new token): a private map of these bytes alone, its page tables filled
        at once (MADV_POPULATE_READ; from the disk when the pages are not cached), nothing copied.
        pread copied the 8B shape's layers from the page cache at 5.7 GB/s; this maps them at
        108 GB/s. The pages count in RSS only while a view lives: the map is closed with the last
        view. `read`/`rows` where the tensor cannot be placed or mapped."""
        t, raw = self.tensors[key], self.raw.get(key)
        if start is not None or stop is not None:
            start, stop = start or 0, t.shape[0] if stop is None else stop
            if raw is None or t.dim() == 0 or not 0 <= start <= stop <= t.shape[0]:
                return self.rows(key, start, stop)  # which refuses a bad range
            shape = (stop - start, *t.shape[1:])
            offset = raw.offset + start * raw.row_bytes
        else:
            shape, offset = tuple(t.shape), raw.offset if raw is not None else 0
        n = nbytes(shape, t.element_size())
        fd = self._open()
        # A file cut short since it was indexed (a copy still running over it) is left to `read`, which
        # says "truncated" in one line: mmap refuses a map past the end (a ValueError traceback), and a
        # mapped page cut off later would kill the process (SIGBUS).
        fallback = (lambda: self.read(key)) if start is None else (lambda: self.rows(key, start, stop))
        if raw is None or raw.shape != tuple(t.shape) or raw.dtype != t.dtype or not n \
                or not hasattr(mmap, "MAP_PRIVATE") or offset + n > os.fstat(fd).st_size:
            return fallback()
        page = offset // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
        # writable and private: torch views it without a read-only warning; a write would copy the page
        # (never reaching the file), and nothing here writes
        m = mmap.mmap(fd, offset - page + n, flags=mmap.MAP_PRIVATE,
                      prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=page)
        try:
            m.madvise(getattr(mmap, "MADV_POPULATE_READ", 22))
        except ValueError:  # no such advice here: the pages are faulted in as they are used
            pass
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOSYS):  # EINVAL: kernels before 5.14, same as above
                m.close()  # EFAULT/EIO: pages that cannot be read (cut short meanwhile, a disk error)
                return fallback()  # which names the file and what went wrong, in one line
        return torch.frombuffer(m, dtype=torch.uint8, count=n, offset=offset - page).view(t.dtype).view(shape)

    def same_bytes(self, key_a: str, key_b: str, chunk_bytes: int = 64 << 20) -> bool:
        """Whether two tensors hold identical bytes (a tied output), compared in row chunks: torch.equal
        through the memory map would leave both whole matrices in RSS (+1 GB on a 1B's embedding).
        The pages stay cached: a conversion reads the embedding again right after this check."""
        a, b = self.tensors[key_a], self.tensors[key_b]
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        n = a.shape[0] if a.dim() else 1
        step = max(1, chunk_bytes // max(1, nbytes(a.shape[1:], a.element_size())))
        return all(torch.equal(self.rows(key_a, i, min(i + step, n), keep_cached=True).view(torch.uint8),
                               self.rows(key_b, i, min(i + step, n), keep_cached=True).view(torch.uint8))
                   for i in range(0, n, step))

    def _open(self) -> int:
        with self._lock:
            if self._fd is None:  # read front to back in large pieces: let readahead be generous
                self._fd = open_for_reading(self.path, sequential=True)
            return self._fd

    def close(self) -> None:
        """Close the file descriptor (the memory-mapped state dict stays usable; rows reopen it)."""
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
