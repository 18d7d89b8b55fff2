"""Every tensor transform has an inverse; round trips are bit-exact (hypothesis over shapes)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llama_parity.converter.transforms import (dedupe_replicated_heads, merge_shards, permute_for_hf_rotary, replicate_heads,
                                  split_shards, unpermute_from_hf_rotary)

shapes = st.tuples(st.integers(1, 6), st.sampled_from([2, 4, 8, 16]), st.integers(1, 9))


@settings(max_examples=60, deadline=None)
@given(shapes, st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_rotary_permutation_round_trip(shape, dtype):
    """Bug class: a permutation whose inverse is not its inverse (HF -> Meta would corrupt q/k)."""
    n_heads, head_dim, cols = shape
    w = torch.randn(n_heads * head_dim, cols).to(dtype)
    p = permute_for_hf_rotary(w, n_heads)
    assert torch.equal(unpermute_from_hf_rotary(p, n_heads), w)
    assert torch.equal(permute_for_hf_rotary(unpermute_from_hf_rotary(w, n_heads), n_heads), w)


def test_rotary_permutation_layout():
    """Bug class: the permutation itself. Within a head Meta's pairs (0,1),(2,3) become HF's
    (0, hd/2), (1, hd/2+1): rows 0,2,4,.. then 1,3,5,.."""
    w = torch.arange(8.0)[:, None]
    assert permute_for_hf_rotary(w, 1)[:, 0].tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    assert permute_for_hf_rotary(w, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_rotary_with_wrong_head_count_differs():
    """Bug class: permuting k with n_heads instead of n_kv_heads is not a no-op for GQA."""
    w = torch.randn(4 * 8, 5)  # 4 kv heads of dim 8
    assert not torch.equal(permute_for_hf_rotary(w, 4), permute_for_hf_rotary(w, 16))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 8), st.integers(0, 1), st.integers(1, 5), st.integers(1, 5))
def test_merge_split_round_trip(n, dim, a, b):
    """Bug class: shard merge and split that disagree about the split dim or the order."""
    shape = [a * n, b] if dim == 0 else [a, b * n]
    w = torch.randn(*shape)
    parts = split_shards(w, n, dim)
    assert len(parts) == n
    assert torch.equal(merge_shards(parts, dim), w)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.sampled_from([2, 4, 8]), st.integers(1, 6))
def test_kv_replication_round_trip(n_heads, rep, head_dim, cols):
    """Bug class: de-duplicating replicated kv heads in the wrong grouping (tiled vs interleaved)."""
    w = torch.randn(n_heads * head_dim, cols)
    stored = replicate_heads(w, n_heads, rep)
    assert stored.shape[0] == n_heads * rep * head_dim
    # head h is stored at positions h*rep .. h*rep+rep-1 (shard s owns head s // rep)
    for h in range(n_heads):
        for r in range(rep):
            i = (h * rep + r) * head_dim
            assert torch.equal(stored[i:i + head_dim], w[h * head_dim:(h + 1) * head_dim])
    assert torch.equal(dedupe_replicated_heads(stored, n_heads * rep, rep), w)
