"""The tensor plan: one record per output tensor, built from metadata only (no tensor data read).

A plan is printable (`convert --dry-run`), testable against the registry's real shapes, and the
only thing the writer executes (converter/executor.py applies it row chunk by row chunk). Every
tensor of the checkpoint is accounted for: planned, or listed as harmless in keymap.py; anything
else is refused by name, never dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .detect import Variant
from .keymap import check_meta_keys, meta_keys
from .meta_checkpoint import MetaCheckpoint
from .safetensors_writer import tensor_nbytes


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


def refuse_unplanned_tensors(variant: Variant, ckpt: MetaCheckpoint) -> None:
    """Every tensor of every shard is planned or listed harmless (keymap.py); else exit 2 naming it."""
    for s in range(ckpt.num_shards):
        check_meta_keys(ckpt.keys(s), variant.n_layers, where=ckpt.shard_paths[s])


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
