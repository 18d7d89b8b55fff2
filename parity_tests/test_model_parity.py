"""Converted HF model == Meta's model, numerically, for every architecture variant and device.

The reference (reference_model/) runs the Meta files with shards unmerged; transformers runs the
converted folder. Bounds and why they are what they are: llama_parity/parity.py.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pytest
import torch

from llama_parity import parity
from llama_parity.reference_model.model import load_meta_checkpoint


@pytest.fixture(scope="session")
def pair_of(tiny, real_pairs):
    def get(checkpoint) -> tuple[Path, Path, str | None]:
        kind, key = checkpoint
        if kind == "tiny":
            return tiny.meta(key), tiny.hf(key), key
        meta, hf = real_pairs[key]
        return meta, hf, None
    return get


@lru_cache(maxsize=4)
def _models(meta: Path, hf: Path, variant_id: str | None, device: str, dtype: torch.dtype):
    rope = parity.expected_rope_scaling(meta, variant_id)
    ref = load_meta_checkpoint(meta, rope_scaling=rope, device=device, dtype=dtype)
    model = parity.load_hf_model(hf, device=device, dtype=dtype)
    return ref, model


@pytest.fixture
def models(pair_of, checkpoint, device):
    meta, hf, vid = pair_of(checkpoint)

    def get(dtype=torch.float32):
        ref, model = _models(meta, hf, vid, device, dtype)
        tokens = parity.fixed_prompt(min(model.config.vocab_size, ref.args.vocab_size))
        return ref, model, tokens
    return get


def _assert(check: parity.Check):
    assert check.ok, f"{check.name}: measured {check.measured:.3g} > bound {check.bound:.3g}; {check.detail}"


def test_logits_fp32(models, device):
    """Bug class: q/k rotary permutation with the wrong head count, shards merged on the wrong dim,
    swapped weights or norms, wrong FFN size, eps or theta. fp32 logits must agree to 1e-4 relative."""
    ref, hf, tokens = models()
    _assert(parity.check_logits(ref, hf, tokens, device))


def test_logits_bf16(models, device):
    """Bug class: a conversion that is right in fp32 but loses bits in bf16 (a round trip through
    fp16, a dtype mix-up). Both sides in bf16; bound 5% of the logit scale, argmax mostly equal."""
    ref, hf, tokens = models(torch.bfloat16)
    _assert(parity.check_logits(ref, hf, tokens, device, bf16=True))


def test_kv_cache_decode(models, device):
    """Bug class: k/v laid out or repeated wrongly for GQA, positions off by one in incremental
    decoding: prefill then token-by-token decode must match Meta's KV cache with start_pos."""
    ref, hf, tokens = models()
    _assert(parity.check_kv_cache(ref, hf, tokens, device))


def test_far_positions(models, device):
    """Bug class: missing or wrong RoPE scaling (factor 8 instead of 32 on Llama 3.2 / Guard 3 1B,
    scaling dropped on 3.1). Queries at position 12000 attend keys at 0..7: beyond the original
    8192 context, where the scaled frequencies dominate."""
    ref, hf, tokens = models()
    _assert(parity.check_far_positions(ref, hf, tokens, device))


def test_greedy_generation(models, device):
    """Bug class: anything that flips a generated token (cache handling in generate, a lost
    lm_head on tied models): 20 greedy tokens must be identical."""
    ref, hf, tokens = models()
    _assert(parity.check_greedy(ref, hf, tokens[:8], device))
