"""The tensor plan: one record per output tensor, built from metadata only (no tensor data read).

A plan is printable (`convert --dry-run`), testable against the registry's real shapes, and the
only thing the writer executes. `iter_chunks` is where the transforms meet the data (row chunk by row chunk).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .detect import Variant
from .errors import ConversionError
from .keymap import meta_keys
from .meta_checkpoint import MetaCheckpoint
from .safetensors_writer import tensor_nbytes
from .transforms import dedupe_replicated_heads, permute_for_hf_rotary


@dataclass(frozen=True)
class TensorPlan:
    hf_name: str
    meta_key: str
    concat_dim: int | None  # None: replicated in every shard (copies are checked, shard 0 is used)
    kv_replication: int  # >1: de-duplicate kv heads stored this many times each
    stored_heads: int | None  # heads in the merged tensor before de-duplication (kv tensors only)
    rotary_heads: int | None  # permute rows into HF's rotary layout with this many heads
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.dtype)

    def describe(self) -> str:
        steps = [f"merge dim {self.concat_dim}" if self.concat_dim is not None else "replicated"]
        if self.kv_replication > 1:
            steps.append(f"dedupe x{self.kv_replication}")
        if self.rotary_heads:
            steps.append(f"permute_for_hf_rotary({self.rotary_heads})")
        return f"{self.meta_key} -> {self.hf_name} {list(self.shape)} {str(self.dtype).replace('torch.', '')}: " + ", ".join(steps)


def build_plan(variant: Variant, ckpt: MetaCheckpoint, dtype: torch.dtype | None = None) -> list[TensorPlan]:
    out_dtype = dtype or variant.dtype
    n = variant.num_shards
    plan = []
    for rule, mkey, hkey in meta_keys(variant.n_layers, with_output=not variant.tie_word_embeddings):
        info = ckpt.info(mkey)
        split = variant.embedding_shard_dim if rule.split == "embedding" else rule.split
        shape = list(info.shape)
        if split is not None:
            shape[split] *= n
        rep, stored, heads = 1, None, None
        if rule.rotary == "q":
            heads = variant.n_heads
        if rule.rotary == "k" or mkey.endswith("attention.wv.weight"):
            rep, stored = variant.kv_replication, variant.n_kv_heads
            heads = variant.hf_num_kv_heads if rule.rotary == "k" else None
        shape[0] //= rep
        plan.append(TensorPlan(hkey, mkey, split, rep, stored, heads, tuple(shape), out_dtype))
    return plan


@dataclass
class ReplicaCheck:
    """Largest difference between shards' copies of replicated tensors (norms); 0.0 expected."""
    max_abs_diff: float = 0.0
    worst_key: str = ""


# Output is produced in row chunks of about this many bytes: large enough that each read and
# write is one big sequential syscall, small enough that a few chunks in flight (reading one,
# writing another) stay far below the memory of one big tensor (the 8B embedding is 1 GB).
CHUNK_BYTES = 64 << 20


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


def iter_chunks(entry: TensorPlan, ckpt: MetaCheckpoint, replicas: ReplicaCheck | None = None, *,
                take=_alloc, scratch: Scratch | None = None, chunk_bytes: int | None = None):
    """Yield the converted tensor as consecutive row chunks (contiguous, entry.dtype).

    Every transform the converter applies is local to a block of rows: a dim-0 merge puts each
    shard's rows after the previous shard's; a dim-1 merge builds output row r from row r of every
    shard; kv de-duplication and the rotary permutation act within one head (head_dim rows, or
    head_dim x replication stored rows). So chunks are whole heads, and each is built from only
    the input rows it needs: memory is a few chunks, whatever the tensor's size.

    `take(nbytes)` supplies the output buffer of a chunk (the writer passes its recycled pool);
    the chunk is a view of it. Where no transform is needed, shard bytes are read straight into
    that buffer: bf16 in, bf16 out, never a float round trip.
    """
    n = ckpt.num_shards
    scratch = scratch or Scratch()
    infos = [ckpt.info(entry.meta_key, s) for s in range(n)]
    part = infos[0]
    for s, inf in enumerate(infos[1:], 1):
        if inf.shape != part.shape or inf.dtype != part.dtype:
            what = "shard copies" if entry.concat_dim is None else "shard slices"
            raise ConversionError(f"{entry.meta_key}: {what} have different shapes/dtypes "
                                  f"({list(part.shape)} {part.dtype} in shard 0, {list(inf.shape)} {inf.dtype} in shard {s})")

    if entry.concat_dim is None:
        # Replicated (norms, a few KB): read every copy, compare, emit shard 0's.
        t = ckpt.read_rows(entry.meta_key, 0, 0, _rows_of(part.shape), torch.empty(part.shape, dtype=part.dtype))
        for s in range(1, n):
            p = ckpt.read_rows(entry.meta_key, s, 0, _rows_of(part.shape), torch.empty(part.shape, dtype=part.dtype))
            d = float((p.float() - t.float()).abs().max()) if p.numel() else 0.0
            if replicas is not None and d > replicas.max_abs_diff:
                replicas.max_abs_diff, replicas.worst_key = d, entry.meta_key
        if tuple(t.shape) != entry.shape:
            raise ConversionError(f"{entry.meta_key}: produced shape {list(t.shape)}, planned {list(entry.shape)}")
        yield t.to(entry.dtype).contiguous()
        return

    dim = entry.concat_dim
    if dim not in (0, 1) or (dim == 1 and len(part.shape) != 2):
        raise ConversionError(f"{entry.meta_key}: cannot merge shards of shape {list(part.shape)} along dim {dim}")
    merged = list(part.shape)
    merged[dim] *= n
    rep = entry.kv_replication
    if merged[0] % rep or len(entry.shape) != len(merged) or tuple(entry.shape[1:]) != tuple(merged[1:]) \
            or entry.shape[0] != merged[0] // rep:
        raise ConversionError(f"{entry.meta_key}: merged shape {merged} does not give the planned {list(entry.shape)}")
    rest = tuple(merged[1:])
    unit = 1  # output rows that must stay together: one head when heads are regrouped
    if rep > 1 or entry.rotary_heads:
        heads = entry.rotary_heads or entry.stored_heads // rep
        if len(merged) != 2 or entry.shape[0] % heads or (entry.shape[0] // heads) % 2:
            raise ConversionError(f"{entry.meta_key}: {entry.shape[0]} rows do not split into {heads} heads of even size")
        unit = entry.shape[0] // heads
        if rep > 1 and entry.stored_heads * unit != merged[0]:
            raise ConversionError(f"{entry.meta_key}: {merged[0]} rows are not {entry.stored_heads} stored heads of {unit}")
    row_elems = 1
    for d in rest:
        row_elems *= d
    row_cost = row_elems * max(part.dtype.itemsize, entry.dtype.itemsize) * rep
    per_chunk = max(unit, (chunk_bytes or CHUNK_BYTES) // max(1, row_cost) // unit * unit)
    direct = dim == 0 and rep == 1 and not entry.rotary_heads and part.dtype == entry.dtype
    out_rows = entry.shape[0]
    part_rows = part.shape[0]

    for a in range(0, out_rows, per_chunk):
        b = min(out_rows, a + per_chunk)
        buf = take((b - a) * row_elems * entry.dtype.itemsize)
        dst = buf.view(entry.dtype).view((b - a,) + rest)
        sa, sb = a * rep, b * rep  # rows of the merged (stored) tensor this chunk needs
        if dim == 0:
            src = dst if direct else scratch.get((sb - sa,) + rest, part.dtype)
            for s in range(sa // part_rows, (sb - 1) // part_rows + 1):
                lo, hi = max(sa, s * part_rows), min(sb, (s + 1) * part_rows)
                ckpt.read_rows(entry.meta_key, s, lo - s * part_rows, hi - s * part_rows, src[lo - sa:hi - sa])
            if direct:
                yield dst
                continue
        else:
            # Row r of the merged tensor is row r of shard 0, then of shard 1, ...: read each
            # shard's rows into its own plane, then interleave them in one copy.
            planes = scratch.get((n, sb - sa, part.shape[1]), part.dtype)
            for s in range(n):
                ckpt.read_rows(entry.meta_key, s, sa, sb, planes[s])
            src = planes.transpose(0, 1)  # [rows, n, cols]: a view, row-major over (shard, col)
            if rep == 1 and not entry.rotary_heads:
                dst.view(sb - sa, n, part.shape[1]).copy_(src)
                yield dst
                continue
            src = src.reshape((sb - sa,) + rest)
        # Chunks hold whole heads, so the per-head transforms of transforms.py apply to each chunk.
        if rep > 1:
            src = dedupe_replicated_heads(src, (sb - sa) // unit, rep, name=entry.meta_key)
        if entry.rotary_heads:
            permute_for_hf_rotary(src, (b - a) // unit, out=dst)
        else:
            dst.copy_(src.reshape(dst.shape))  # dtype conversion, if --dtype asked for one, happens here
        yield dst
