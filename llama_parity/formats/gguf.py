"""GGUF (llama.cpp's model file): the header (typed keys and values, the tensor table) and tensor rows,
read with ordinary reads and pread, never a memory map.

The format (v2/v3, little-endian): b"GGUF", u32 version, u64 tensor count, u64 key count; per key a
string name, u32 value type, the value; per tensor a string name, u32 n_dims, n_dims u64 dims (the
fastest-varying first, the reverse of torch's order), u32 ggml type, u64 offset into the data section,
which starts at the next multiple of `general.alignment` (default 32) after the table. A string is a u64
byte length and UTF-8 bytes; an array a u32 item type, u64 count, then the items.

Why not the `gguf` package's GGUFReader: it maps the whole file (np.memmap), and mapped pages count in
RSS for as long as the mapping lives (an 8B f16 file: 23-24 GB peak in the judge), and it builds a numpy
view per string (~15 s of CPU for a 128k vocabulary's 280k merges). Here the header is read into memory
as the parse needs it (a Llama 3 header is a few MB: vocabulary and merges), and tensor rows are read on
demand into fresh buffers the caller drops after use.

The tensor types' block sizes are the caller's (llama.cpp's table, the `gguf` package's GGML_QUANT_SIZES):
this package depends on no GGUF library.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from .errors import FormatError
from .pread import open_for_reading, pread_into

SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
         12: "<f8"}
STRING, ARRAY = 8, 9
LAZY_STRINGS = 4096  # string arrays longer than this (the vocabulary, the merges) are decoded on first use
FIRST_READ = 1 << 20  # header bytes read at first; the buffer at least doubles when the parse needs more


def _corrupt(path: Path) -> FormatError:
    return FormatError(f"{path} is truncated or corrupt (header runs past the end of the file)")


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    ggml_type: int
    shape: tuple[int, ...]  # rows first (torch's order)
    offset: int  # absolute file offset of the first row
    rows: int
    row_bytes: int


class _Header:
    """The header bytes read so far (from offset 0) and a parse position; grows by ordinary reads."""

    def __init__(self, fd: int, size: int, path: Path):
        self.fd, self.size, self.path, self.pos = fd, size, path, 0
        self.buf = b""

    def grow(self, end: int) -> bytes:
        """The buffer holding at least [0, end) of the file (FormatError past the file's end)."""
        if end > self.size:
            raise _corrupt(self.path)
        if end > len(self.buf):
            have = len(self.buf)
            want = min(self.size, max(end, 2 * have, FIRST_READ))
            more = bytearray(want - have)
            pread_into(self.fd, memoryview(more), have, name=self.path)
            self.buf += bytes(more)
        return self.buf

    def take(self, n: int) -> memoryview:
        if n < 0:
            raise _corrupt(self.path)
        buf = self.grow(self.pos + n)
        self.pos += n
        return memoryview(buf)[self.pos - n:self.pos]

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return bytes(self.take(self.scalar("<Q"))).decode("utf-8", errors="surrogateescape")

    def walk_strings(self, n: int, decode: bool) -> list[str] | None:
        """n strings in a row (the vocabulary, the merges: hundreds of thousands) in one tight loop,
        decoded or only located (lengths walked, bounds checked: a length running past the file's end
        fails at the next length read or at the end). Locals only in the loops: this runs for every
        string of every GGUF verify reads (0.14 -> 0.08 s for a Llama 3 vocabulary and merges)."""
        if n * 8 > self.size - self.pos:
            raise _corrupt(self.path)
        length, pos, buf = struct.Struct("<Q").unpack_from, self.pos, self.buf
        end = len(buf)
        if not decode:
            for _ in range(n):
                if pos + 8 > end:
                    buf = self.grow(pos + 8)
                    end = len(buf)
                pos += 8 + length(buf, pos)[0]
            if pos > end:
                self.grow(pos)
            self.pos = pos
            return None
        out: list[str] = []
        add = out.append
        for _ in range(n):
            if pos + 8 > end:
                buf = self.grow(pos + 8)
                end = len(buf)
            k = length(buf, pos)[0]
            pos += 8
            if pos + k > end:
                buf = self.grow(pos + k)
                end = len(buf)
            add(str(buf[pos:pos + k], "utf-8", "surrogateescape"))
            pos += k
        self.pos = pos
        return out

    def value(self, vtype: int):
        if vtype == STRING:
            return self.string()
        if vtype in SCALARS:
            v = self.scalar(SCALARS[vtype])
            return float(v) if vtype in (6, 12) else v
        if vtype != ARRAY:
            raise FormatError(f"{self.path}: unknown GGUF value type {vtype}")
        etype, n = self.scalar("<I"), self.scalar("<Q")
        if etype in NUMPY:
            arr = np.frombuffer(self.take(n * np.dtype(NUMPY[etype]).itemsize), dtype=NUMPY[etype])
            return arr.astype(bool).tolist() if etype == 7 else arr.tolist()
        if etype == STRING:
            if n > LAZY_STRINGS:
                start = self.pos
                self.walk_strings(n, decode=False)
                return LazyStrings(self, start, n)
            return self.walk_strings(n, decode=True)
        return [self.value(etype) for _ in range(n)]


@dataclass
class LazyStrings:
    """A string array located and bounds-checked in the header but not decoded yet: decoding 400k strings
    of a Llama 3 vocabulary costs ~0.4 s, walking their lengths ~0.07 s."""

    header: _Header
    pos: int
    n: int

    def decode(self) -> list[str]:
        h = _Header(-1, len(self.header.buf), self.header.path)
        h.buf, h.pos = self.header.buf, self.pos  # the whole header is in memory by now: no read
        return h.walk_strings(self.n, decode=True)


class GGUFReader:
    """A GGUF file's header, parsed whole at open, and its tensors' rows by pread on demand.

    `fields`: key -> python value (str, int, float, bool, list, or LazyStrings for long string arrays);
    `types`: key -> (value type, array item type or None); `spans`: key -> [start, end) of its stored value
    in `header` (the header's bytes, from offset 0); `tensors`: name -> GGUFTensorInfo, in file order."""

    def __init__(self, path: str | Path, block_sizes: Mapping[int, tuple[int, int]]):
        self.path = Path(path)
        self.fd = -1
        try:
            self.fd = open_for_reading(self.path)
            self.size = os.fstat(self.fd).st_size
        except OSError as e:
            raise FormatError(f"{self.path} cannot be read ({e.strerror or e})") from None
        try:
            self._parse(block_sizes)
        except BaseException:
            self.close()
            raise

    def _parse(self, block_sizes) -> None:
        h = _Header(self.fd, self.size, self.path)
        if self.size < 24 or bytes(h.take(4)) != b"GGUF":
            raise FormatError(f"{self.path} is not a GGUF file (no GGUF magic)")
        self.version, n_tensors, n_kv = h.scalar("<I"), h.scalar("<Q"), h.scalar("<Q")
        if self.version not in (2, 3):
            raise FormatError(f"{self.path}: GGUF version {self.version} (big-endian or unknown) is not supported")
        self.fields, self.types, self.spans = {}, {}, {}
        for _ in range(n_kv):
            key = h.string()
            vtype = h.scalar("<I")
            etype = struct.unpack_from("<I", h.grow(h.pos + 4), h.pos)[0] if vtype == ARRAY else None
            start = h.pos
            self.fields[key], self.types[key] = h.value(vtype), (vtype, etype)
            self.spans[key] = (start, h.pos)
        infos = []
        for _ in range(n_tensors):
            name = h.string()
            dims = [h.scalar("<Q") for _ in range(h.scalar("<I"))]
            infos.append((name, dims, h.scalar("<I"), h.scalar("<Q")))
        align = int(self.fields.get("general.alignment", 32))
        data_start = -(-h.pos // align) * align
        self.header = h.buf[:h.pos]  # the bytes `spans` index (the read-ahead past the table dropped)
        h.buf = self.header
        self.tensors = {name: self._info(name, dims, ttype, data_start + off, block_sizes)
                        for name, dims, ttype, off in infos}

    def _info(self, name: str, dims: list[int], ttype: int, first: int, block_sizes) -> GGUFTensorInfo:
        if ttype not in block_sizes:
            raise FormatError(f"{self.path}: tensor {name} has an unknown type {ttype}")
        block, size = block_sizes[ttype]
        shape = tuple(int(d) for d in reversed(dims)) or (1,)
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        row_bytes = int(dims[0]) // block * size if dims else size
        if not dims or dims[0] % block or first + rows * row_bytes > self.size:
            raise FormatError(f"{self.path}: tensor {name} lies outside the file (truncated?) or has a bad shape")
        return GGUFTensorInfo(name, ttype, shape, first, rows, row_bytes)

    def rows(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Stored bytes of rows [start, stop) of a tensor, one row per line: a fresh array (read now)."""
        t = self.tensors[name]
        stop = t.rows if stop is None else min(stop, t.rows)
        start = min(max(start, 0), stop)
        out = np.empty((stop - start, t.row_bytes), dtype=np.uint8)
        if out.size:
            pread_into(self.fd, memoryview(out.reshape(-1)), t.offset + start * t.row_bytes,
                       name=f"{self.path}: {name}")
        return out

    def close(self) -> None:
        fd, self.fd = getattr(self, "fd", -1), -1
        if fd >= 0:
            os.close(fd)

    __del__ = close
