"""Meta's tensor names and llama.cpp's GGUF names for Llama, and Meta tensors merged one at a time.

The judge keeps its own table (never converter/keymap.py or llama.cpp's): a wrong entry in a
converter cannot be confirmed by the same entry here. llama.cpp keeps Meta's layout: q/k rows in
Meta's interleaved rotary order, [out, in] matrices, every kv head once.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from llama_parity.metadata import MetaSide

_LAYER = {"attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
          "attention.wo": "attn_output", "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down",
          "feed_forward.w3": "ffn_up", "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}
_TOP = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
        "output.weight": "output.weight"}
_DIM1 = ("attention.wo", "feed_forward.w2")  # row-parallel: shards split on the input dim
ROPE_FREQS = "rope_freqs.weight"


def gguf_name(meta_key: str) -> str | None:
    """llama.cpp's name of a Meta tensor (None: a buffer llama.cpp does not store, e.g. rope.freqs)."""
    if meta_key in _TOP:
        return _TOP[meta_key]
    parts = meta_key.split(".")
    if parts[0] != "layers" or parts[-1] != "weight":
        return None
    inner = ".".join(parts[2:-1])
    return f"blk.{parts[1]}.{_LAYER[inner]}.weight" if inner in _LAYER else None


def expected_names(meta) -> dict[str, str]:
    """GGUF name -> Meta key, for every tensor of the checkpoint (the output only when untied)."""
    out = {}
    for key in meta.shards[0]:
        name = gguf_name(key)
        if name is not None and not (key == "output.weight" and meta.tied):
            out[name] = key
    return out


@dataclass
class PreadMeta(MetaSide):
    """The Meta side with one pread reader per shard (in shard order): tensor data is read from the file
    into fresh buffers, never through the shards' memory maps (whose touched pages stay in RSS: the 3 GB
    of a 1B checkpoint). The memory-mapped state dicts still give keys, shapes and dtypes (no data)."""

    readers: list = field(default_factory=list)


def with_pread(meta: MetaSide, meta_dir: Path) -> PreadMeta:
    from llama_parity.formats.pth import PthReader
    from llama_parity.reference_model.model import find_shards

    paths = find_shards(Path(meta_dir))
    if len(paths) != len(meta.shards):
        raise FileNotFoundError(f"{meta_dir}: {len(paths)} shard files, {len(meta.shards)} shards read")
    return PreadMeta(**{f.name: getattr(meta, f.name) for f in fields(meta)},
                     readers=[PthReader(p) for p in paths])


def _parts(meta, key: str, a: int, b: int) -> list[torch.Tensor]:
    """Rows [a, b) of `key` in every shard (by pread when `meta` has readers)."""
    readers = getattr(meta, "readers", None)
    if readers:
        return [r.rows(key, a, b) for r in readers]
    return [s[key][a:b] for s in meta.shards]


def _split_dim(meta, key: str) -> int:
    if key == "tok_embeddings.weight":
        return meta.embedding_split_dim()
    return 1 if any(s in key for s in _DIM1) else 0


def merged(meta, key: str) -> torch.Tensor:
    """One Meta tensor merged across model-parallel shards (kv heads stored r times kept once), in the
    checkpoint's dtype. Only this tensor is read."""
    t0 = meta.shards[0][key]
    return merged_rows(meta, key, 0, t0.shape[0]) if t0.dim() == 2 else _whole(meta, key)


def _whole(meta, key: str) -> torch.Tensor:
    t0 = meta.shards[0][key]
    n = t0.shape[0] if t0.dim() else 1
    return _parts_one(meta, 0, key, 0, n).reshape(t0.shape).contiguous()  # vectors: every shard holds them


def merged_rows(meta, key: str, a: int, b: int) -> torch.Tensor:
    """Rows [a, b) of a merged Meta matrix; only those rows are read (all of a kv matrix stored r times)."""
    t0 = meta.shards[0][key]
    n = len(meta.shards)
    if meta.kv_replication > 1 and key.endswith(("attention.wk.weight", "attention.wv.weight")):
        hd = int(meta.params["dim"]) // int(meta.params["n_heads"])
        r = meta.kv_replication
        parts = _parts(meta, key, 0, t0.shape[0])
        t = torch.cat(parts, dim=0) if n > 1 else parts[0]
        return t.view(-1, r, hd, t.shape[-1])[:, 0].reshape(-1, t.shape[-1])[a:b].contiguous()
    if n == 1 or _split_dim(meta, key) == 1:
        parts = _parts(meta, key, a, b)
        return (torch.cat(parts, dim=1) if n > 1 else parts[0]).contiguous()
    out, base = [], 0  # split on rows: each shard's overlap with [a, b)
    for i, s in enumerate(meta.shards):
        rows = s[key].shape[0]
        lo, hi = max(a, base), min(b, base + rows)
        if lo < hi:
            out.append(_parts_one(meta, i, key, lo - base, hi - base))
        base += rows
    return torch.cat(out, dim=0) if len(out) > 1 else out[0].contiguous()


def _parts_one(meta, i: int, key: str, a: int, b: int) -> torch.Tensor:
    readers = getattr(meta, "readers", None)
    return readers[i].rows(key, a, b) if readers else meta.shards[i][key][a:b]
