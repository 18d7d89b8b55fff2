"""Pure tensor transforms between Meta's and Hugging Face's layouts, each beside its inverse.

Round-trip tests (parity_tests/test_transforms.py) hold every pair to bit-exact identity.
"""

from __future__ import annotations

import torch

from .errors import ConversionError


def permute_for_hf_rotary(w: torch.Tensor, n_heads: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Reorder the output rows of wq/wk from Meta's rotary layout to HF's.

    Meta rotates interleaved pairs (x0, x1), (x2, x3), ... of each head as complex numbers; HF's
    `rotate_half` pairs x_i with x_{i + head_dim/2}. Within each head, rows [0, 2, 4, ..., 1, 3, ...].
    `n_heads` must be the number of heads the rows belong to: n_heads for wq, n_kv_heads for wk.
    The permutation is per head, so it applies to any block of whole heads (the streaming
    converter's chunks); `out`, when given, receives the result (with a dtype conversion if it
    has another dtype) instead of a new tensor.
    """
    out_features, in_features = w.shape
    head_dim = out_features // n_heads
    if head_dim * n_heads != out_features or head_dim % 2:
        raise ValueError(f"{out_features} rows do not split into {n_heads} heads of even size")
    permuted = w.reshape(n_heads, head_dim // 2, 2, in_features).transpose(1, 2)
    if out is not None:
        out.view(n_heads, 2, head_dim // 2, in_features).copy_(permuted)
        return out
    return permuted.reshape(out_features, in_features)


def unpermute_from_hf_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `permute_for_hf_rotary`: HF half-split rows back to Meta's interleaved pairs."""
    out_features, in_features = w.shape
    head_dim = out_features // n_heads
    if head_dim * n_heads != out_features or head_dim % 2:
        raise ValueError(f"{out_features} rows do not split into {n_heads} heads of even size")
    return w.view(n_heads, 2, head_dim // 2, in_features).transpose(1, 2).reshape(out_features, in_features)


def merge_shards(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    """Model-parallel merge: concatenate the shards' slices along the split dim."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def split_shards(w: torch.Tensor, n: int, dim: int) -> list[torch.Tensor]:
    """Inverse of `merge_shards`: n equal slices along dim (contiguous, ready to save)."""
    if w.shape[dim] % n:
        raise ValueError(f"dim {dim} of size {w.shape[dim]} does not split into {n} shards")
    return [c.contiguous() for c in torch.chunk(w, n, dim=dim)]


def dedupe_replicated_heads(w: torch.Tensor, n_stored_heads: int, replication: int, name: str = "") -> torch.Tensor:
    """Drop kv heads that Meta stored `replication` times (shards > kv heads, e.g. 405B MP16).

    Stored heads are [h0 x r, h1 x r, ...]: shard s owns kv head s // r, the one its query heads
    use. Every copy must be bit-identical; anything else means the input is not what we think.
    """
    if replication == 1:
        return w
    out_features, in_features = w.shape
    head_dim = out_features // n_stored_heads
    grouped = w.reshape(n_stored_heads // replication, replication, head_dim, in_features)
    first = grouped[:, :1]
    if not torch.equal(grouped, first.expand_as(grouped)):
        raise ConversionError(
            f"{name or 'kv weight'}: the {replication} stored copies of each kv head differ; "
            "they should be replicas (shards > kv heads). Refusing to guess which copy is right.")
    return first.reshape(out_features // replication, in_features)


def replicate_heads(w: torch.Tensor, n_heads: int, replication: int) -> torch.Tensor:
    """Inverse of `dedupe_replicated_heads`: store each of n_heads heads `replication` times."""
    if replication == 1:
        return w
    out_features, in_features = w.shape
    head_dim = out_features // n_heads
    g = w.view(n_heads, 1, head_dim, in_features).expand(n_heads, replication, head_dim, in_features)
    return g.reshape(out_features * replication, in_features)
