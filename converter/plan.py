"""The tensor plan: one record per output tensor, built from metadata only (no tensor data read).

A plan is printable (`convert --dry-run`), testable against the registry's real shapes, and the
only thing the writer executes. `materialize` is where the transforms meet the data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .detect import Variant
from .errors import ConversionError
from .keymap import meta_keys
from .meta_checkpoint import MetaCheckpoint
from .transforms import dedupe_replicated_heads, merge_shards, permute_for_hf_rotary


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
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize

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


def materialize(entry: TensorPlan, ckpt: MetaCheckpoint, replicas: ReplicaCheck | None = None) -> torch.Tensor:
    parts = [ckpt.tensor(entry.meta_key, s) for s in range(ckpt.num_shards)]
    if entry.concat_dim is None:
        t = parts[0]
        for p in parts[1:]:
            if p.shape != t.shape:
                raise ConversionError(f"{entry.meta_key}: shard copies have different shapes")
            d = float((p.float() - t.float()).abs().max()) if p.numel() else 0.0
            if replicas is not None and d > replicas.max_abs_diff:
                replicas.max_abs_diff, replicas.worst_key = d, entry.meta_key
    else:
        t = merge_shards(parts, entry.concat_dim)
    if entry.kv_replication > 1:
        t = dedupe_replicated_heads(t, entry.stored_heads, entry.kv_replication, name=entry.meta_key)
    if entry.rotary_heads:
        t = permute_for_hf_rotary(t, entry.rotary_heads)
    if tuple(t.shape) != entry.shape:
        raise ConversionError(f"{entry.meta_key}: produced shape {list(t.shape)}, planned {list(entry.shape)}")
    return t.to(entry.dtype).contiguous()

