"""safetensors: the header (read, checked, written), the index of a sharded folder, and tensor rows.

The format: an 8-byte little-endian header length n, n bytes of JSON (each tensor's dtype, shape and
[begin, end) byte offsets into the data section, plus an optional "__metadata__" map of strings), then
the data section. Read by hand rather than with `safetensors.safe_open`: its errors do not name the
file, it maps an absurd header length before complaining, and it reads tensors through a memory map
(pages that stay in RSS). parity_tests/test_formats.py checks this reader against the package.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from .dtypes import BY_CODE, nbytes, safetensors_code
from .errors import FormatError
from .pread import drop_cache, open_for_reading, pread_into

# safetensors itself refuses headers above 100 MB (a 405B index of every tensor is ~100 KB).
MAX_HEADER_BYTES = 100_000_000
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass(frozen=True)
class TensorEntry:
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # byte offsets into the data section
    end: int

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return BY_CODE[self.dtype].torch


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    tensors: dict[str, TensorEntry]  # in the header's order
    data_start: int  # file offset of the data section
    metadata: dict | None


def read_header(path: str | Path) -> SafetensorsHeader:
    """The tensor table of a .safetensors file, after checking that it describes the file's bytes:
    a sane header length, JSON, a known dtype and offsets matching each shape, and data that ends
    where the file does. Anything else is a FormatError naming the file."""
    path = Path(path)
    size, raw = _header_json(path)
    try:
        table = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FormatError(f"{path}: corrupt safetensors header (not JSON); re-download or re-convert it") from None
    if not isinstance(table, dict):
        raise FormatError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = table.pop("__metadata__", None)
    tensors = {name: _entry(path, name, t) for name, t in table.items()}
    data_bytes = size - 8 - len(raw)
    end = max((t.end for t in tensors.values()), default=0)
    if end != data_bytes:
        state = "truncated" if end > data_bytes else "longer than its header says"
        raise FormatError(f"{path} is {state}: its header describes {end} data bytes, the file holds "
                          f"{data_bytes}; re-download or re-convert it")
    return SafetensorsHeader(path, tensors, 8 + len(raw), metadata if isinstance(metadata, dict) else None)


def _header_json(path: Path) -> tuple[int, bytes]:
    """(file size, header bytes); the length is checked against the file before anything is read."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise FormatError(f"{path} is truncated ({size} bytes): not a safetensors file; re-download it")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise FormatError(f"{path}: header length {n} is impossible for a {size}-byte file "
                              "(truncated or corrupt); re-download or re-convert it")
        return size, fh.read(n)


def _entry(path: Path, name: str, t) -> TensorEntry:
    try:
        a, b = (int(x) for x in t["data_offsets"])
        shape = tuple(int(d) for d in t["shape"])
        want = nbytes(shape, BY_CODE[t["dtype"]].itemsize)
    except (KeyError, TypeError, ValueError):
        raise FormatError(f"{path}: corrupt safetensors header entry for {name!r}") from None
    if not 0 <= a <= b or b - a != want or any(d < 0 for d in shape):
        raise FormatError(f"{path}: {name!r} has data offsets {[a, b]} that do not match its shape")
    return TensorEntry(t["dtype"], shape, a, b)


def encode_header(tensors: Iterable[tuple[str, torch.dtype, Sequence[int]]], metadata: dict | None = None) -> bytes:
    """The bytes before the data section for `tensors` (name, dtype, shape) stored back to back in
    this order: length, JSON, padded with spaces so that the data starts 8-byte aligned."""
    table: dict = {} if metadata is None else {"__metadata__": metadata}
    off = 0
    for name, dtype, shape in tensors:
        n = nbytes(shape, dtype.itemsize)
        table[name] = {"dtype": safetensors_code(dtype), "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(table, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


# --- the folder: one file, or shards and their index ----------------------------------------------
def read_index(hf_dir: str | Path) -> dict[str, str]:
    """tensor name -> file, for a single-file or sharded HF folder (as transformers chooses: the
    index when there is one, else model.safetensors)."""
    hf_dir = Path(hf_dir)
    idx = hf_dir / INDEX_NAME
    if idx.is_file():
        try:
            wm = json.loads(idx.read_text(encoding="utf-8")).get("weight_map")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            wm = None
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise FormatError(f"{idx} has no weight_map of tensor name -> file")
        return wm
    single = hf_dir / SINGLE_NAME
    if not single.is_file():
        raise FileNotFoundError(f"no {SINGLE_NAME} or {INDEX_NAME} in {hf_dir}")
    return {k: SINGLE_NAME for k in read_header(single).tensors}


def index_json(weight_map: dict[str, str], total_size: int) -> str:
    """The text of model.safetensors.index.json, as transformers writes it."""
    return json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2) + "\n"


class SafetensorsReader:
    """An HF folder's tensors (or rows of them), read with pread from the offsets in each file's header
    into a fresh tensor or a caller's buffer. Pages read are dropped from the page cache unless
    `keep_cached`: a converter or judge reads each tensor once."""

    def __init__(self, hf_dir: str | Path, files: Iterable[str] | None = None, *, keep_cached: bool = False):
        self.dir = Path(hf_dir)
        names = sorted(set(read_index(self.dir).values()) if files is None else set(files))
        self.keep_cached = keep_cached
        self.headers = {f: read_header(self.dir / f) for f in names}
        self.fds: dict[str, int] = {}
        self.entries: dict[str, tuple[str, int, TensorEntry]] = {}  # name -> (file, data offset, entry)
        for f, h in self.headers.items():
            self.fds[f] = open_for_reading(self.dir / f)
            for key, t in h.tensors.items():
                self.entries[key] = (f, h.data_start + t.begin, t)

    def close(self) -> None:
        fds, self.fds = getattr(self, "fds", {}), {}
        for fd in fds.values():
            os.close(fd)

    __del__ = close

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def keys(self):
        return self.entries.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key][2].shape

    def dtype(self, key: str) -> torch.dtype:
        f, _, t = self.entries[key]
        if t.torch_dtype is None:
            raise FormatError(f"{self.dir / f}: {key} is {t.dtype}, which this torch cannot hold")
        return t.torch_dtype

    def read(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The whole tensor: a new one, or copied into `out` (contiguous, its shape and dtype)."""
        shape = self.shape(key)
        if out is not None and (tuple(out.shape) != tuple(shape) or out.dtype != self.dtype(key)):
            raise ValueError(f"{self.dir}: read({key!r}): buffer of shape {tuple(out.shape)} {out.dtype}, not {shape}")
        if not shape:
            return self.rows(key, 0, 1, out=None if out is None else out.reshape(1)).reshape(())
        return self.rows(key, 0, shape[0], out=out)

    def rows(self, key: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [start, stop) along dim 0 (a 0-d tensor is one row), in the file's dtype."""
        f, offset, t = self.entries[key]
        rest = t.shape[1:]
        if out is None:
            out = torch.empty((stop - start, *rest), dtype=self.dtype(key))
        row = nbytes(rest, BY_CODE[t.dtype].itemsize)
        if not 0 <= start <= stop <= (t.shape[0] if t.shape else 1) or out.nbytes != (stop - start) * row \
                or not out.is_contiguous():
            raise ValueError(f"rows({key!r}, {start}, {stop}): bad range or buffer")
        if out.nbytes:
            at = offset + start * row
            pread_into(self.fds[f], memoryview(out.reshape(-1).view(torch.uint8).numpy()), at,
                       name=f"{self.dir / f}: {key}")
            if not self.keep_cached:
                drop_cache(self.fds[f], at, out.nbytes)
        return out

    def tensors(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) for `names` (default: all), file by file."""
        wanted = self.entries.keys() if names is None else set(names)
        for key in sorted(wanted, key=lambda k: self.entries[k][:2]):  # KeyError for a name not here
            yield key, self.read(key)

