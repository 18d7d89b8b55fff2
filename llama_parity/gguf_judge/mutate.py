"""Write a GGUF file from a read one with edits: the GGUF mutation catalog's tool (tests, and anyone who
wants to see a check fail). Values keep their stored types; tensors are written as stored bytes."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from .gguf_file import _ARRAY, _NUMPY, _SCALARS, _STRING, GGUFFile


def _string(s: str) -> bytes:
    b = s.encode("utf-8", errors="surrogateescape")
    return struct.pack("<Q", len(b)) + b


def _value(vtype: int, etype: int | None, v) -> bytes:
    if vtype == _STRING:
        return _string(v)
    if vtype in _SCALARS:
        return struct.pack(_SCALARS[vtype], v)
    out = struct.pack("<IQ", etype, len(v))
    if etype in _NUMPY:
        return out + np.asarray(v, dtype=_NUMPY[etype]).tobytes()
    return out + b"".join(_value(etype, None, x) for x in v)


def write_gguf(gf: GGUFFile, path: str | Path, *, fields: dict | None = None, drop_fields=(),
               tensors: dict[str, np.ndarray] | None = None, drop_tensors=(), types: dict | None = None) -> Path:
    """`fields` replaces or adds values (a new key's (value type, array item type) from `types`, else
    gf.types, else string); `tensors` replaces stored bytes (same shape and type: rows of blocks)."""
    path = Path(path)
    known = {**gf.types, **(types or {})}
    values = {k: v for k, v in gf.fields.items() if k not in drop_fields}
    values.update(fields or {})
    align = int(values.get("general.alignment", 32))
    head = b"GGUF" + struct.pack("<IQQ", 3, len(gf.tensors) - len(set(drop_tensors) & set(gf.tensors)), len(values))
    for k, v in values.items():
        vtype, etype = known.get(k, (_STRING, None))
        stored = None if k in (fields or {}) else gf.raw_value(k)  # unchanged: its bytes as read (fast, exact)
        head += _string(k) + struct.pack("<I", vtype) + (stored if stored is not None else _value(vtype, etype, v))
    datas, offset = [], 0
    for name, t in gf.tensors.items():
        if name in drop_tensors:
            continue
        # written as they are (an unchanged tensor straight from the file's mapping): a copy of a
        # 128k-row matrix per mutant cost more than the judge's run on it
        data = np.ascontiguousarray((tensors or {}).get(name, t.data)).reshape(-1).view(np.uint8)
        dims = list(reversed(t.shape))
        head += _string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        head += struct.pack("<IQ", int(t.qtype), offset)
        pad = -data.nbytes % align
        datas.append((data, pad))
        offset += data.nbytes + pad
    head += b"\0" * (-len(head) % align)
    with open(path, "wb") as f:
        f.write(head)
        for data, pad in datas:
            f.write(data.data)
            f.write(b"\0" * pad)
    return path
