"""A GGUF file as the judge reads it: metadata values and tensors, memory-mapped.

The header (keys, values, tensor table) is parsed here: the `gguf` package's GGUFReader builds a
numpy view per string and needs ~15 s of CPU for a 128k-token vocabulary (280k merges), the time of
the rest of a tiny verify. Everything else about the format comes from `gguf` (maintained with
llama.cpp): the type tables (block sizes) and the (de)quantisation of every type. Tensors are read
one at a time, rows on demand, from a memory map (bounded memory whatever the file size).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class GGUFInputError(Exception):
    """The file cannot be read as GGUF (exit code 2, never a parity verdict)."""


def gguf_module():
    try:
        import gguf
    except ImportError:
        raise GGUFInputError("reading GGUF needs the gguf package: pip install 'llama-parity[gguf]'") from None
    return gguf


@dataclass
class GGUFTensor:
    name: str
    type_name: str  # GGMLQuantizationType name: F32, F16, BF16, Q8_0, Q4_K, ...
    shape: tuple[int, ...]  # rows first (Meta's / torch's order; GGUF stores the reverse)
    data: np.ndarray  # the stored bytes (memory map), shape (rows, bytes per row)

    @property
    def qtype(self):
        return gguf_module().GGMLQuantizationType[self.type_name]

    @property
    def block(self) -> tuple[int, int]:
        """(values per block, bytes per block) of the stored type."""
        return gguf_module().GGML_QUANT_SIZES[self.qtype]

    def raw_rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Stored bytes of rows [start, stop), one row per line."""
        return np.asarray(self.data[start:stop])

    def dequantized(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) as float32 (exact for F32/F16/BF16, the format's dequantisation otherwise)."""
        raw = self.raw_rows(start, stop)
        if self.type_name == "F32":
            return raw.view(np.float32).copy()
        if self.type_name == "F16":
            return raw.view(np.float16).astype(np.float32)
        out = gguf_module().quants.dequantize(raw, self.qtype)
        return out.reshape(raw.shape[0], -1).astype(np.float32, copy=False)

    def bits(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Float tensors' stored values as unsigned integers (bit-for-bit comparison)."""
        raw = self.raw_rows(start, stop)
        return raw.view(np.uint32 if self.type_name == "F32" else np.uint16)


@dataclass
class GGUFFile:
    path: Path
    version: int
    fields: dict[str, object]  # key -> python value (str, int, float, bool, list)
    tensors: dict[str, GGUFTensor]
    types: dict[str, tuple[int, int | None]] = field(default_factory=dict)  # key -> (value type, array item type)
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)  # key -> [start, end) of its value in the file
    raw: object = None  # the file's bytes (memory map) the spans index

    def raw_value(self, key: str) -> bytes | None:
        """A value's bytes exactly as stored (None for a key not read from this file)."""
        span = self.spans.get(key)
        return None if span is None or self.raw is None else bytes(self.raw[span[0]:span[1]])

    def digest(self, keys) -> str:
        """sha256 over the stored bytes (and types) of `keys` as the file holds them: what a check reading
        only these keys depends on, so a result may be reused for another file with the same digest."""
        h = hashlib.sha256()
        for k in sorted(keys):
            h.update(repr((k, self.types.get(k))).encode())
            if k in self.spans:
                h.update(memoryview(self.raw)[self.spans[k][0]:self.spans[k][1]])
            else:
                h.update(repr(self.fields.get(k)).encode())  # edited in memory: its value stands for it
        return h.hexdigest()

    def get(self, key: str, default=None):
        v = self.fields.get(key, default)
        if isinstance(v, _Strings):  # decoded on first use (a check memoised by the key's bytes may never need it)
            v = self.fields[key] = v.decode()
        return v

    @property
    def arch(self) -> str:
        return str(self.fields.get("general.architecture", ""))

    def key(self, suffix: str, default=None):
        """An architecture key: `llama.context_length` from 'context_length'."""
        return self.get(f"{self.arch}.{suffix}", default)


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
          12: "<f8"}
_STRING, _ARRAY = 8, 9


LAZY_STRINGS = 4096  # string arrays longer than this (the vocabulary, the merges) are decoded on first use


@dataclass
class _Strings:
    """A string array located and bounds-checked in the header but not decoded yet: decoding 400k strings
    of a Llama 3 vocabulary costs ~0.4 s, walking their lengths ~0.07 s."""

    buf: memoryview
    pos: int
    n: int
    path: Path

    def decode(self) -> list[str]:
        cur = _Cursor(self.buf, self.path)
        cur.pos = self.pos
        return cur.strings(self.n)


class _Cursor:
    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise GGUFInputError(f"{self.path} is truncated or corrupt (header runs past the end of the file)")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return bytes(self.take(self.scalar("<Q"))).decode("utf-8", errors="surrogateescape")

    def strings(self, n: int) -> list[str]:
        """n strings in a row: the vocabulary and merges (hundreds of thousands), in one tight loop."""
        buf, pos, end, out = self.buf, self.pos, len(self.buf), []
        if n * 8 > end - pos:
            raise GGUFInputError(f"{self.path} is truncated or corrupt (header runs past the end of the file)")
        length = struct.Struct("<Q").unpack_from
        for _ in range(n):
            if pos + 8 > end:
                break
            k = length(buf, pos)[0]
            pos += 8
            out.append(str(buf[pos:pos + k], "utf-8", "surrogateescape"))
            pos += k
        if pos > end or len(out) < n:
            raise GGUFInputError(f"{self.path} is truncated or corrupt (header runs past the end of the file)")
        self.pos = pos
        return out

    def skip_strings(self, n: int) -> "_Strings":
        """n strings located (lengths walked, bounds checked), decoded later."""
        buf, start, end = self.buf, self.pos, len(self.buf)
        if n * 8 > end - start:
            raise GGUFInputError(f"{self.path} is truncated or corrupt (header runs past the end of the file)")
        length, pos = struct.Struct("<Q").unpack_from, start
        for _ in range(n):
            if pos + 8 > end:
                break
            pos += 8 + length(buf, pos)[0]
        else:
            if pos <= end:
                self.pos = pos
                return _Strings(buf, start, n, self.path)
        raise GGUFInputError(f"{self.path} is truncated or corrupt (header runs past the end of the file)")

    def value(self, vtype: int):
        if vtype == _STRING:
            return self.string()
        if vtype in _SCALARS:
            v = self.scalar(_SCALARS[vtype])
            return float(v) if vtype in (6, 12) else v
        if vtype != _ARRAY:
            raise GGUFInputError(f"{self.path}: unknown GGUF value type {vtype}")
        etype, n = self.scalar("<I"), self.scalar("<Q")
        if etype in _NUMPY:
            arr = np.frombuffer(self.take(n * np.dtype(_NUMPY[etype]).itemsize), dtype=_NUMPY[etype])
            return arr.astype(bool).tolist() if etype == 7 else arr.tolist()
        if etype == _STRING:
            return self.skip_strings(n) if n > LAZY_STRINGS else self.strings(n)
        return [self.value(etype) for _ in range(n)]


def read_gguf(path: str | Path) -> GGUFFile:
    """Open a GGUF file (memory-mapped). A missing, truncated or foreign file is GGUFInputError."""
    g = gguf_module()
    path = Path(path)
    if not path.is_file():
        raise GGUFInputError(f"GGUF file {path} does not exist")
    try:
        mm = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as e:
        raise GGUFInputError(f"{path} cannot be read ({e})") from None
    cur = _Cursor(memoryview(mm), path)
    if bytes(cur.take(4)) != b"GGUF":
        raise GGUFInputError(f"{path} is not a GGUF file (no GGUF magic)")
    version, n_tensors, n_kv = cur.scalar("<I"), cur.scalar("<Q"), cur.scalar("<Q")
    if version not in (2, 3):
        raise GGUFInputError(f"{path}: GGUF version {version} (big-endian or unknown) is not supported")
    fields, types, spans = {}, {}, {}
    for _ in range(n_kv):
        key = cur.string()
        vtype = cur.scalar("<I")
        etype = struct.unpack_from("<I", cur.buf, cur.pos)[0] if vtype == _ARRAY else None
        start = cur.pos
        fields[key], types[key] = cur.value(vtype), (vtype, etype)
        spans[key] = (start, cur.pos)
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = [cur.scalar("<Q") for _ in range(cur.scalar("<I"))]
        infos.append((name, dims, cur.scalar("<I"), cur.scalar("<Q")))
    align = int(fields.get("general.alignment", 32))
    start = -(-cur.pos // align) * align
    tensors = {}
    for name, dims, ttype, offset in infos:
        try:
            qt = g.GGMLQuantizationType(ttype)
        except ValueError:
            raise GGUFInputError(f"{path}: tensor {name} has an unknown type {ttype}") from None
        block, size = g.GGML_QUANT_SIZES[qt]
        shape = tuple(int(d) for d in reversed(dims)) or (1,)
        row_bytes = dims[0] // block * size
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        first = start + offset
        if dims[0] % block or first + rows * row_bytes > len(mm):
            raise GGUFInputError(f"{path}: tensor {name} lies outside the file (truncated?) or has a bad shape")
        tensors[name] = GGUFTensor(name, qt.name, shape, mm[first:first + rows * row_bytes].reshape(rows, row_bytes))
    return GGUFFile(path, version, fields, tensors, types, spans, mm)
