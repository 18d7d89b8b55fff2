"""A lazy view of a Meta checkpoint directory: what files are there, their keys, shapes and dtypes.

Shards are opened memory-mapped (`torch.load(mmap=True)`), so listing keys and shapes reads only
the pickled metadata; tensor bytes are paged in when a tensor is actually used (`tensor()`).

The converter reads tensor data differently (`read_rows`): pages of a memory-mapped file count in
the process's RSS for as long as they stay mapped, so streaming a 16 GB shard through the mapping
makes RSS grow to 16 GB even though no tensor is kept. A `.pth` file is an uncompressed zip whose
`data/N` records hold each storage's raw bytes, and its pickle says which record, offset, shape
and stride each key uses; `raw_index` reads that (without executing the pickle) and `read_rows`
copies exactly the rows asked for with plain positioned reads into a caller's buffer, then tells
the kernel it may drop those pages from its cache. Files that do not fit this pattern (compressed
records, legacy formats, strided tensors) fall back to copying from the memory-mapped tensor.
"""

from __future__ import annotations

import collections
import hashlib
import json
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

from llama_parity.fixtures import variants as registry

from .errors import ConversionError

_SHARD_RE = re.compile(r"^consolidated\.(\d+)\.pth$")


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class RawTensor:
    """Where one contiguous tensor's bytes sit inside a .pth file."""
    offset: int  # file offset of element 0
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def row_bytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape[1:]:
            n *= d
        return n


_STORAGE_DTYPES = {
    "BFloat16Storage": torch.bfloat16, "HalfStorage": torch.float16, "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


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


def _rebuild_tensor_ref(storage, storage_offset, size, stride, *_ignored):
    expected, acc = [], 1
    for d in reversed(size):
        expected.insert(0, acc)
        acc *= d
    if any(s != e for s, e, d in zip(stride, expected, size) if d > 1):
        raise _Unsupported("non-contiguous tensor")
    return _TensorRef(storage.record, storage.dtype, int(storage_offset), tuple(int(d) for d in size))


class _IndexUnpickler(pickle.Unpickler):
    """Reads torch.save's pickle into (record, offset, shape, dtype) records; executes nothing else.

    Only the handful of globals a state dict of plain tensors uses are resolved; anything else
    raises _Unsupported and the caller falls back to torch.load.
    """

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_ref
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise _Unsupported(f"{module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)):
            raise _Unsupported(f"persistent id {pid!r:.80}")
        return _StorageRef(str(pid[2]), pid[1])


def index_pth(path: Path) -> dict[str, RawTensor] | None:
    """key -> RawTensor for a torch.save zip of contiguous tensors; None if the file is not one."""
    try:
        with zipfile.ZipFile(path) as zf, path.open("rb") as fh:
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


_fadvise = getattr(os, "posix_fadvise", None)


def drop_cache(fd: int, offset: int, length: int) -> None:
    """Tell the kernel these file pages will not be needed again (no-op where unsupported).

    Not about our RSS (page cache is not RSS): a 16 GB conversion should not push 16 GB of
    other programs' cached files out of memory. On dirty pages it also starts their writeback early.
    """
    if _fadvise is not None and length > 0:
        try:
            _fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass


def pread_into(fd: int, buf: memoryview, offset: int) -> None:
    done = 0
    while done < len(buf):
        if hasattr(os, "preadv"):
            n = os.preadv(fd, [buf[done:]], offset + done)
        else:  # pragma: no cover - platforms without preadv (Windows)
            os.lseek(fd, offset + done, os.SEEK_SET)
            n = os.readv(fd, [buf[done:]])
        if n <= 0:
            raise ConversionError(f"unexpected end of file at byte {offset + done} (truncated shard?)")
        done += n


def load_shard_safely(p: Path) -> dict[str, torch.Tensor]:
    """A consolidated.NN.pth as a state dict of tensors, memory-mapped, without running its pickle.

    `weights_only=True` unpickles tensors and containers only: a file whose pickle would call
    anything else (os.system, eval, ...) is refused here, before any of it runs.
    """
    try:
        sd = torch.load(p, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"GLOBAL ([\w.]+)", str(e))
        why = f"it would call {m.group(1)}" if m else (str(e).splitlines() or ["?"])[0][:120]
        raise ConversionError(f"refusing to load {p}: its pickle holds more than tensors ({why}); a checkpoint "
                              "from Meta never does: re-download it from a trusted source") from None
    except Exception as e:  # torch raises many types for truncated / foreign files
        first = (str(e).splitlines() or [""])[0].split(". ")[0][:160]
        raise ConversionError(f"cannot read {p} ({first}): truncated download or not a PyTorch checkpoint? "
                              "Re-download it (checklist.chk and --verify-md5 tell which file is damaged)") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise ConversionError(f"{p} does not hold a state dict of named tensors (not a Meta checkpoint shard?)")
    return sd


def subfolder_hint(directory: Path) -> str:
    """For a folder without shards: name the sub-folders that hold some (the parent-folder mistake,
    e.g. pointing at ~/.llama/checkpoints or at Llama 2's download root)."""
    try:
        subs = sorted(d for d in Path(directory).iterdir() if d.is_dir() and any(d.glob("consolidated.*.pth")))
    except OSError:
        return ""
    if not subs:
        return ""
    names = ", ".join(str(d) for d in subs[:5]) + (f" (and {len(subs) - 5} more)" if len(subs) > 5 else "")
    return f"; the shards are in a sub-folder: pass {'one of ' if len(subs) > 1 else ''}{names}"


class MetaCheckpoint:
    """Files of one Meta download: params.json, consolidated.NN.pth shards, tokenizer.model."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise ConversionError(f"input directory {self.dir} does not exist or is not a directory")
        numbered = []
        for p in self.dir.iterdir():
            m = _SHARD_RE.match(p.name)
            if m:
                numbered.append((int(m.group(1)), p))
        numbered.sort()
        if not numbered:
            extra = ""
            if list(self.dir.glob("*.safetensors")):
                extra = " (this looks like a Hugging Face directory; did you swap input and output?)"
            raise ConversionError(f"no consolidated.NN.pth shards in {self.dir}{extra or subfolder_hint(self.dir)}")
        idx = [n for n, _ in numbered]
        if idx != list(range(len(idx))):
            missing = sorted(set(range(max(idx) + 1)) - set(idx))
            raise ConversionError(
                f"shards in {self.dir} are numbered {', '.join(f'{n:02d}' for n in idx)}: "
                f"consolidated.{missing[0]:02d}.pth is missing (incomplete download?)")
        self.shard_paths: list[Path] = [p for _, p in numbered]
        self.params_path = self.dir / "params.json"
        if not self.params_path.is_file():
            raise ConversionError(f"params.json missing in {self.dir} (expected next to consolidated.00.pth)")
        try:
            self.params: dict = json.loads(self.params_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConversionError(f"{self.params_path} is not valid JSON: {e}") from None
        if not isinstance(self.params, dict):
            raise ConversionError(f"{self.params_path} is not a JSON object; is this a Meta Llama params.json?")
        for key in ("dim", "n_layers", "n_heads"):
            if key not in self.params:
                raise ConversionError(f"{self.params_path} lacks {key!r}; is this a Meta Llama params.json?")
            v = self.params[key]
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConversionError(f"{self.params_path}: {key} is {v!r}, expected a positive integer")
        self.tokenizer_path: Path | None = registry.find_tokenizer(self.dir)
        chk = self.dir / "checklist.chk"
        self.checklist_path: Path | None = chk if chk.is_file() else None
        self._fds: dict[int, int] = {}
        self._fd_lock = threading.Lock()
        self.fallback_keys: set[str] = set()  # read through the memory map, not the fast path

    @property
    def num_shards(self) -> int:
        return len(self.shard_paths)

    @property
    def tokenizer_kind(self) -> str | None:
        if self.tokenizer_path is None:
            return None
        try:
            return registry.tokenizer_kind(self.tokenizer_path)
        except (OSError, ValueError) as e:
            raise ConversionError(f"{e}: replace tokenizer.model with the one from Meta's download") from None

    @cached_property
    def shards(self) -> list[dict[str, torch.Tensor]]:
        out = []
        for p in self.shard_paths:
            out.append(load_shard_safely(p))
        return out

    @property
    def input_files(self) -> list[Path]:
        """Every file a conversion reads (what `--overwrite` must never replace)."""
        files = [*self.shard_paths, self.params_path]
        return files + [p for p in (self.tokenizer_path, self.checklist_path) if p is not None]

    def keys(self, shard: int = 0) -> list[str]:
        return list(self.shards[shard].keys())

    def info(self, key: str, shard: int = 0) -> TensorInfo:
        t = self.shards[shard].get(key)
        if t is None:
            raise ConversionError(f"{self.shard_paths[shard].name} lacks tensor {key!r}")
        return TensorInfo(tuple(t.shape), t.dtype)

    def has(self, key: str) -> bool:
        return key in self.shards[0]

    def tensor(self, key: str, shard: int) -> torch.Tensor:
        t = self.shards[shard].get(key)
        if t is None:
            raise ConversionError(f"{self.shard_paths[shard].name} lacks tensor {key!r}")
        return t

    @cached_property
    def raw_index(self) -> list[dict[str, RawTensor] | None]:
        """Per shard: where each tensor's bytes are in the file (None: use the mmap fallback)."""
        return [index_pth(p) for p in self.shard_paths]

    def _fd(self, shard: int) -> int:
        with self._fd_lock:
            fd = self._fds.get(shard)
            if fd is None:
                fd = os.open(self.shard_paths[shard], os.O_RDONLY | getattr(os, "O_BINARY", 0))
                if _fadvise is not None:
                    try:  # we read front to back in large pieces: let readahead be generous
                        _fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                    except OSError:
                        pass
                self._fds[shard] = fd
            return fd

    def close(self) -> None:
        """Close file descriptors opened by read_rows (the memory-mapped view stays usable)."""
        with self._fd_lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def read_rows(self, key: str, shard: int, start: int, stop: int, out: torch.Tensor, *,
                  keep_cached: bool = False) -> torch.Tensor:
        """Copy rows [start, stop) (along dim 0) of `key` in `shard` into `out` and return it.

        `out` must be contiguous with the tensor's dtype and shape [stop - start, *shape[1:]].
        Bytes come straight from the file into `out` (no mapping, no intermediate copy), and the
        pages read are dropped from the page cache, so memory use is `out` and nothing else.
        """
        info = self.info(key, shard)
        rows = info.shape[0] if info.shape else 1
        if not (0 <= start <= stop <= rows) or not out.is_contiguous() or out.dtype != info.dtype:
            raise ValueError(f"read_rows({key!r}, {shard}, {start}, {stop}): bad range or buffer")
        if out.numel() * out.dtype.itemsize == 0:
            return out
        idx = self.raw_index[shard]
        raw = idx.get(key) if idx is not None else None
        if raw is None or raw.shape != info.shape or raw.dtype != info.dtype:
            # Fallback through the memory map: correct, but its pages stay in RSS while mapped.
            self.fallback_keys.add(key)
            t = self.tensor(key, shard)
            out.copy_((t[start:stop] if t.dim() else t.reshape(1)).reshape(out.shape))
            return out
        fd = self._fd(shard)
        row_bytes = raw.row_bytes
        offset = raw.offset + start * row_bytes
        nbytes = (stop - start) * row_bytes
        pread_into(fd, memoryview(out.reshape(-1).view(torch.uint8).numpy()), offset)
        if not keep_cached:
            drop_cache(fd, offset, nbytes)
        return out

    def tensors_equal(self, key_a: str, key_b: str, shard: int, chunk_bytes: int = 64 << 20) -> bool:
        """Bit-exact equality of two tensors of one shard, compared in row chunks through read_rows.

        `torch.equal(ckpt.tensor(a), ckpt.tensor(b))` pages both through the memory map, which
        puts both whole tensors in RSS (1 GB for a Llama 3 1B embedding and its tied copy).
        """
        ia, ib = self.info(key_a, shard), self.info(key_b, shard)
        if ia.shape != ib.shape or ia.dtype != ib.dtype:
            return False
        rows = ia.shape[0] if ia.shape else 1
        row_bytes = ia.dtype.itemsize
        for d in ia.shape[1:]:
            row_bytes *= d
        step = max(1, chunk_bytes // max(1, row_bytes))
        for a in range(0, rows, step):
            b = min(rows, a + step)
            shape = (b - a,) + tuple(ia.shape[1:])
            # Kept in the page cache: the conversion reads the embedding again right after this
            # check (detection of tied weights), and would otherwise fetch it from disk twice.
            ta = self.read_rows(key_a, shard, a, b, torch.empty(shape, dtype=ia.dtype), keep_cached=True)
            tb = self.read_rows(key_b, shard, a, b, torch.empty(shape, dtype=ia.dtype), keep_cached=True)
            if not torch.equal(ta.view(-1).view(torch.uint8), tb.view(-1).view(torch.uint8)):
                return False
        return True

    def dtype(self) -> torch.dtype:
        return self.info("tok_embeddings.weight").dtype

    def checklist_problems(self, verify_md5: bool = False) -> list[str]:
        """Names checklist.chk lists that are absent, and (optionally) md5 mismatches."""
        if not self.checklist_path:
            return []
        problems = []
        for line in self.checklist_path.read_text().splitlines():
            parts = line.split()
            if len(parts) != 2:
                continue
            digest, name = parts
            f = self.dir / name
            if not f.is_file():
                problems.append(f"{name} is listed in checklist.chk but missing")
            elif verify_md5:
                h = hashlib.md5()
                with f.open("rb") as fh:
                    for block in iter(lambda: fh.read(1 << 24), b""):
                        h.update(block)
                if h.hexdigest() != digest:
                    problems.append(f"{name}: md5 {h.hexdigest()} != checklist {digest}")
        return problems
