"""Streaming safetensors output: headers come from the plan, tensor bytes are written one by one.

`safetensors.torch.save_file` needs every tensor of a file in memory at once. The format does not:
it is an 8-byte little-endian header length, a JSON header (dtype, shape, byte offsets of each
tensor), then the raw bytes in offset order. The plan knows every shape and dtype up front, so we
write the header first and then each tensor as soon as it is produced, holding one at a time.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass(frozen=True)
class OutTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


def assign_files(tensors: Sequence[OutTensor], max_shard_bytes: int) -> list[list[OutTensor]]:
    """Greedy split in plan order, like transformers' `max_shard_size` (a tensor never splits)."""
    files: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if files[-1] and size + t.nbytes > max_shard_bytes:
            files.append([])
            size = 0
        files[-1].append(t)
        size += t.nbytes
    return files


def file_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _header(tensors: Sequence[OutTensor]) -> bytes:
    meta: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for t in tensors:
        meta[t.name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + t.nbytes]}
        off += t.nbytes
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def write_tensor_bytes(fh, t: torch.Tensor) -> None:
    t = t.contiguous()
    if t.numel():
        # A uint8 view of the tensor's own memory: no copy, whatever the dtype (bf16 included).
        fh.write(memoryview(t.view(-1).view(torch.uint8).numpy()))


def write_shards(out_dir: Path, tensors: Sequence[OutTensor], produce: Callable[[OutTensor], torch.Tensor],
                 *, max_shard_bytes: int, on_tensor: Callable[[OutTensor], None] | None = None) -> list[str]:
    """Write `tensors` (in order) into safetensors files in out_dir, plus the index when sharded."""
    groups = assign_files(tensors, max_shard_bytes)
    names = file_names(len(groups))
    weight_map = {}
    for name, group in zip(names, groups):
        with (out_dir / name).open("wb") as fh:
            fh.write(_header(group))
            for spec in group:
                t = produce(spec)
                if tuple(t.shape) != spec.shape or t.dtype != spec.dtype:
                    raise AssertionError(f"{spec.name}: produced {tuple(t.shape)} {t.dtype}, planned {spec.shape} {spec.dtype}")
                write_tensor_bytes(fh, t)
                del t
                weight_map[spec.name] = name
                if on_tensor:
                    on_tensor(spec)
    if len(names) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


def read_index(hf_dir: Path) -> dict[str, str]:
    """tensor name -> file, for a single-file or sharded HF directory."""
    idx = hf_dir / "model.safetensors.index.json"
    if idx.is_file():
        return json.loads(idx.read_text())["weight_map"]
    single = hf_dir / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {hf_dir}")
    from safetensors import safe_open

    with safe_open(str(single), "pt") as f:
        return {k: "model.safetensors" for k in f.keys()}


def iter_hf_tensors(hf_dir: Path, names: Iterable[str] | None = None):
    """Yield (name, tensor) from an HF directory, one file open at a time (memory-mapped)."""
    from safetensors import safe_open

    wm = read_index(hf_dir)
    wanted = set(names) if names is not None else None
    by_file: dict[str, list[str]] = {}
    for k, f in wm.items():
        if wanted is None or k in wanted:
            by_file.setdefault(f, []).append(k)
    for f, keys in by_file.items():
        with safe_open(str(hf_dir / f), "pt") as fh:
            for k in keys:
                yield k, fh.get_tensor(k)
