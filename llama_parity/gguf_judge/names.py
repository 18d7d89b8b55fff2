"""Meta's tensor names and llama.cpp's GGUF names for Llama, and Meta tensors merged one at a time.

The judge keeps its own table (never converter/keymap.py or llama.cpp's): a wrong entry in a
converter cannot be confirmed by the same entry here. llama.cpp keeps Meta's layout: q/k rows in
Meta's interleaved rotary order, [out, in] matrices, every kv head once.
"""

from __future__ import annotations

import torch

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


def merged(meta, key: str) -> torch.Tensor:
    """One Meta tensor merged across model-parallel shards (kv heads stored r times kept once), in the
    checkpoint's dtype. Only this tensor is read."""
    parts = [s[key] for s in meta.shards]
    t = parts[0]
    if len(parts) > 1 and t.dim() == 2:
        if key == "tok_embeddings.weight":
            dim = meta.embedding_split_dim()
        else:
            dim = 1 if any(s in key for s in _DIM1) else 0
        t = torch.cat(parts, dim=dim)
    if meta.kv_replication > 1 and key.endswith(("attention.wk.weight", "attention.wv.weight")):
        hd = int(meta.params["dim"]) // int(meta.params["n_heads"])
        r = meta.kv_replication
        t = t.view(-1, r, hd, t.shape[-1])[:, 0].reshape(-1, t.shape[-1])
    return t.contiguous()
