"""Meta's consolidated.NN.pth written one tensor at a time.

torch.save needs every tensor of a file in memory at once, and a single-file 8B checkpoint is the
whole 16 GB model (measured: 16.2 GB of peak RSS for `to-meta` on the 8B shape). Here torch.save
itself writes the file's structure, under `torch.serialization.skip_data`: the pickle naming
every tensor (shape, dtype, storage record) and one zip record per storage, left as a hole. The
tensors it pickles are allocated but never touched (allocation without writes costs no RSS).
Then each record is filled in place, one tensor at a time, and its CRC-32 written into the zip's
data descriptor and central directory, so the file is what torch.save would have written: torch.load and
`unzip -t` accept it (parity_tests/test_round_trip.py checks both).
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import Callable

import torch

from llama_parity.formats.pth import storage_records

CHUNK = 64 << 20  # bytes per write (and per CRC update)


def save_one_at_a_time(path: Path, layout: dict[str, tuple[tuple[int, ...], torch.dtype]],
                       produce: Callable[[str], torch.Tensor]) -> None:
    """Write `path` as torch.save({key: tensor}) would, in `layout`'s key order, holding one tensor
    at a time: `produce(key)` returns it (contiguous, on the CPU, of the layout's shape and dtype).
    torch before 2.5 has no skip_data: then the whole file is built in memory and torch.saved."""
    if not hasattr(torch.serialization, "skip_data"):
        with open(path, "wb") as fh:
            torch.save({k: _checked(k, produce(k), *layout[k]) for k in layout}, fh)
        return
    placeholders = {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in layout.items()}
    with torch.serialization.skip_data(), open(path, "wb") as fh:
        torch.save(placeholders, fh)
    del placeholders
    records = storage_records(path)
    if sorted(records) != list(range(len(layout))):
        raise ValueError(f"{path}: torch.save wrote {len(records)} storage records for {len(layout)} tensors")
    fd = os.open(path, os.O_WRONLY)
    try:
        for i, (key, (shape, dtype)) in enumerate(layout.items()):  # storage keys follow pickling order
            t = _checked(key, produce(key), shape, dtype)
            rec = records[i]
            crc = struct.pack("<I", _write_bytes(fd, t, rec.data_offset))
            for at in rec.crc_offsets:
                os.pwrite(fd, crc, at)
            del t
    finally:
        os.close(fd)


def _checked(key: str, t: torch.Tensor, shape, dtype) -> torch.Tensor:
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
        raise ValueError(f"{key}: produced {tuple(t.shape)} {t.dtype}, planned {tuple(shape)} {dtype}")
    return t


def _write_bytes(fd: int, t: torch.Tensor, offset: int) -> int:
    raw = memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
    crc = 0
    for a in range(0, len(raw), CHUNK):
        piece = raw[a:a + CHUNK]
        done = 0
        while done < len(piece):
            done += os.pwrite(fd, piece[done:], offset + a + done)
        crc = zlib.crc32(piece, crc)
    return crc
