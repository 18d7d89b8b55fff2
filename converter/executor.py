"""The chunk executor: where a plan entry's transforms meet the shard bytes, row chunk by row chunk.

Every transform the converter applies is local to a block of rows: a dim-0 merge puts each shard's
rows after the previous shard's; a dim-1 merge builds output row r from row r of every shard; kv
de-duplication and the rotary permutation act within one head (head_dim rows, or head_dim x
replication stored rows). So chunks are whole heads, and each is built from only the input rows it
needs: memory is a few chunks, whatever the tensor's size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ConversionError
from .meta_checkpoint import MetaCheckpoint, TensorInfo
from .plan import TensorPlan
from .transforms import dedupe_replicated_heads, permute_for_hf_rotary

# Output is produced in row chunks of about this many bytes: large enough that each read and
# write is one big sequential syscall, small enough that a few chunks in flight (reading one,
# writing another) stay far below the memory of one big tensor (the 8B embedding is 1 GB).
CHUNK_BYTES = 64 << 20


@dataclass
class ReplicaCheck:
    """Largest difference between shards' copies of replicated tensors (norms); 0.0 expected."""
    max_abs_diff: float = 0.0
    worst_key: str = ""


class Scratch:
    """One reusable byte buffer for reads that need a transform before they are output.

    Allocating a fresh 64 MB buffer per chunk costs a page fault per 4 KiB page, every time; a
    reused buffer costs them once.
    """

    def __init__(self):
        self._buf = torch.empty(0, dtype=torch.uint8)

    def get(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = dtype.itemsize
        for d in shape:
            n *= d
        if self._buf.numel() < n:
            self._buf = torch.empty(n, dtype=torch.uint8)
        return self._buf[:n].view(dtype).view(shape)


def _alloc(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8)


def _rows_of(shape: tuple[int, ...]) -> int:
    return shape[0] if shape else 1


@dataclass(frozen=True)
class _Layout:
    """How one merged tensor is cut into output chunks."""
    dim: int  # merge dim of the shards
    rest: tuple[int, ...]  # shape after dim 0
    row_elems: int
    per_chunk: int  # output rows per chunk (a multiple of `unit`)
    unit: int  # output rows that must stay together (one head when heads are regrouped)
    direct: bool  # shard bytes go straight into the output buffer (no transform, no dtype change)


def _shard_part(entry: TensorPlan, ckpt: MetaCheckpoint) -> TensorInfo:
    """Shape and dtype of one shard's piece; every shard's piece must agree."""
    infos = [ckpt.info(entry.meta_key, s) for s in range(ckpt.num_shards)]
    part = infos[0]
    for s, inf in enumerate(infos[1:], 1):
        if inf.shape != part.shape or inf.dtype != part.dtype:
            what = "shard copies" if entry.concat_dim is None else "shard slices"
            raise ConversionError(f"{entry.meta_key}: {what} have different shapes/dtypes "
                                  f"({list(part.shape)} {part.dtype} in shard 0, {list(inf.shape)} {inf.dtype} in shard {s})")
    return part


def _replicated(entry: TensorPlan, ckpt: MetaCheckpoint, part: TensorInfo, replicas: ReplicaCheck | None):
    """Norms (a few KB): read every shard's copy, compare, emit shard 0's."""
    rows = _rows_of(part.shape)
    t = ckpt.read_rows(entry.meta_key, 0, 0, rows, torch.empty(part.shape, dtype=part.dtype))
    for s in range(1, ckpt.num_shards):
        p = ckpt.read_rows(entry.meta_key, s, 0, rows, torch.empty(part.shape, dtype=part.dtype))
        d = float((p.float() - t.float()).abs().max()) if p.numel() else 0.0
        if replicas is not None and d > replicas.max_abs_diff:
            replicas.max_abs_diff, replicas.worst_key = d, entry.meta_key
    if tuple(t.shape) != entry.shape:
        raise ConversionError(f"{entry.meta_key}: produced shape {list(t.shape)}, planned {list(entry.shape)}")
    return t.to(entry.dtype).contiguous()


def _layout(entry: TensorPlan, part: TensorInfo, n: int, chunk_bytes: int) -> _Layout:
    """Check the plan against the shards' shapes and choose whole-head chunks."""
    dim = entry.concat_dim
    if dim not in (0, 1) or (dim == 1 and len(part.shape) != 2):
        raise ConversionError(f"{entry.meta_key}: cannot merge shards of shape {list(part.shape)} along dim {dim}")
    merged = list(part.shape)
    merged[dim] *= n
    rep = entry.kv_replication
    if merged[0] % rep or len(entry.shape) != len(merged) or tuple(entry.shape[1:]) != tuple(merged[1:]) \
            or entry.shape[0] != merged[0] // rep:
        raise ConversionError(f"{entry.meta_key}: merged shape {merged} does not give the planned {list(entry.shape)}")
    unit = 1
    if rep > 1 or entry.rotary_heads:
        heads = entry.rotary_heads or entry.stored_heads // rep
        if len(merged) != 2 or entry.shape[0] % heads or (entry.shape[0] // heads) % 2:
            raise ConversionError(f"{entry.meta_key}: {entry.shape[0]} rows do not split into {heads} heads of even size")
        unit = entry.shape[0] // heads
        if rep > 1 and entry.stored_heads * unit != merged[0]:
            raise ConversionError(f"{entry.meta_key}: {merged[0]} rows are not {entry.stored_heads} stored heads of {unit}")
    rest = tuple(merged[1:])
    row_elems = 1
    for d in rest:
        row_elems *= d
    row_cost = row_elems * max(part.dtype.itemsize, entry.dtype.itemsize) * rep
    per_chunk = max(unit, chunk_bytes // max(1, row_cost) // unit * unit)
    direct = dim == 0 and rep == 1 and not entry.rotary_heads and part.dtype == entry.dtype
    return _Layout(dim, rest, row_elems, per_chunk, unit, direct)


def _read_dim0(entry, ckpt, part, sa, sb, src) -> None:
    """Merged rows [sa, sb) of a dim-0 merge: each shard's rows follow the previous shard's."""
    part_rows = part.shape[0]
    for s in range(sa // part_rows, (sb - 1) // part_rows + 1):
        lo, hi = max(sa, s * part_rows), min(sb, (s + 1) * part_rows)
        ckpt.read_rows(entry.meta_key, s, lo - s * part_rows, hi - s * part_rows, src[lo - sa:hi - sa])


def _read_dim1(entry, ckpt, part, sa, sb, scratch) -> torch.Tensor:
    """Merged rows [sa, sb) of a dim-1 merge as a [rows, shards, cols] view.

    Row r of the merged tensor is row r of shard 0, then of shard 1, ...: each shard's rows are
    read into their own plane, and the transposed view interleaves them without a copy.
    """
    n = ckpt.num_shards
    planes = scratch.get((n, sb - sa, part.shape[1]), part.dtype)
    for s in range(n):
        ckpt.read_rows(entry.meta_key, s, sa, sb, planes[s])
    return planes.transpose(0, 1)


def _finish(entry: TensorPlan, lay: _Layout, src: torch.Tensor, dst: torch.Tensor, a: int, b: int) -> None:
    """The per-head transforms of transforms.py, applied to one chunk of whole heads, into dst."""
    if entry.kv_replication > 1:
        src = dedupe_replicated_heads(src, src.shape[0] // lay.unit, entry.kv_replication, name=entry.meta_key)
    if entry.rotary_heads:
        permute_for_hf_rotary(src, (b - a) // lay.unit, out=dst)
    else:
        dst.copy_(src.reshape(dst.shape))  # dtype conversion, if --dtype asked for one, happens here


def iter_chunks(entry: TensorPlan, ckpt: MetaCheckpoint, replicas: ReplicaCheck | None = None, *,
                take=_alloc, scratch: Scratch | None = None, chunk_bytes: int | None = None):
    """Yield the converted tensor as consecutive row chunks (contiguous, entry.dtype).

    `take(nbytes)` supplies the output buffer of a chunk (the writer passes its recycled pool);
    the chunk is a view of it. Where no transform is needed, shard bytes are read straight into
    that buffer: bf16 in, bf16 out, never a float round trip.
    """
    scratch = scratch or Scratch()
    part = _shard_part(entry, ckpt)
    if entry.concat_dim is None:
        yield _replicated(entry, ckpt, part, replicas)
        return
    lay = _layout(entry, part, ckpt.num_shards, chunk_bytes or CHUNK_BYTES)
    rep = entry.kv_replication
    for a in range(0, entry.shape[0], lay.per_chunk):
        b = min(entry.shape[0], a + lay.per_chunk)
        dst = take((b - a) * lay.row_elems * entry.dtype.itemsize).view(entry.dtype).view((b - a,) + lay.rest)
        sa, sb = a * rep, b * rep  # rows of the merged (stored) tensor this chunk needs
        if lay.dim == 0:
            src = dst if lay.direct else scratch.get((sb - sa,) + lay.rest, part.dtype)
            _read_dim0(entry, ckpt, part, sa, sb, src)
            if lay.direct:
                yield dst
                continue
        else:
            src = _read_dim1(entry, ckpt, part, sa, sb, scratch)
            if rep == 1 and not entry.rotary_heads:
                dst.view(sb - sa, ckpt.num_shards, part.shape[1]).copy_(src)
                yield dst
                continue
            src = src.reshape((sb - sa,) + lay.rest)
        _finish(entry, lay, src, dst, a, b)
        yield dst
