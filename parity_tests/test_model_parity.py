"""Converted HF model == Meta's model, numerically, for every architecture variant and device.

The reference (reference_model/) runs the Meta files with shards unmerged; transformers runs the
converted folder. Bounds and why they are what they are: llama_parity/parity.py. Real weights given
with `--meta-dir` (any size) go through the streamed checks, one layer in memory at a time.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pytest

from llama_parity import parity


@pytest.fixture(scope="session")
def pair_of(tiny, real_pairs, verify_options):
    def get(checkpoint) -> tuple[Path, Path, str | None]:
        kind, key = checkpoint
        if kind == "tiny":
            return tiny.meta(key), tiny.hf(key), key
        meta, hf = real_pairs[key]
        return meta, hf, verify_options.variant_id
    return get


@lru_cache(maxsize=2)
def _checks(meta: Path, hf: Path, variant_id: str | None, device: str, streamed: bool,
            greedy_tokens: int | None = None) -> dict[str, parity.Check]:
    """Every model check on one pair, run once per module. Tiny checkpoints hold both models in memory
    (the full path); real weights of any size stream one layer at a time (verify's default path),
    with the options given to pytest as verify takes them (llama_parity.pytest_plugin)."""
    rope = parity.expected_rope_scaling(meta, variant_id)
    if streamed:
        from llama_parity.streaming import streaming_model_checks

        greedy = {} if greedy_tokens is None else {"greedy_tokens": greedy_tokens}
        checks = streaming_model_checks(meta, hf, rope_scaling=rope, device=device, **greedy)
    else:
        checks = parity.run_model_checks(meta, hf, rope_scaling=rope, device=device)
    return {c.name: c for c in checks}


@pytest.fixture
def judged(pair_of, checkpoint, device, verify_options):
    meta, hf, vid = pair_of(checkpoint)
    real = checkpoint[0] == "real"
    return _checks(meta, hf, vid, device, real, verify_options.greedy_tokens if real else None)


def _assert(check: parity.Check):
    assert check.ok, f"{check.name}: measured {check.measured:.3g} > bound {check.bound:.3g}; {check.detail}"


def test_logits_fp32(judged):
    """Bug class: q/k rotary permutation with the wrong head count, shards merged on the wrong dim,
    swapped weights or norms, wrong FFN size, eps or theta. fp32 logits must agree to 1e-4 relative on
    a prompt with the family's BOS/header/end-of-turn tokens (text and a chat dialog through the
    checkpoint's tokenizer when it has one), next-token KL <= 1e-6 nats, top-1 equal."""
    for name in ("logits (fp32)", "next-token KL (fp32)", "top-1 agreement (fp32)"):
        _assert(judged[name])


def test_logits_bf16(judged):
    """Bug class: a conversion that is right in fp32 but loses bits in bf16 (a round trip through a
    coarser format, a dtype mix-up): HF in bf16 may be at most 3x further from Meta fp32 than Meta's
    own bf16 run (logits and next-token KL)."""
    _assert(judged["logits (bf16)"])
    _assert(judged["next-token KL (bf16)"])


def test_kv_cache_decode(judged):
    """Bug class: k/v laid out or repeated wrongly for GQA, positions off by one in incremental
    decoding: prefill then token-by-token decode must match Meta's KV cache with start_pos."""
    _assert(judged["kv-cache decode"])


def test_far_positions(judged):
    """Bug class: missing or wrong RoPE scaling (factor 8 instead of 32 on Llama 3.2 / Guard 3 1B,
    scaling dropped on 3.1). Queries at 12000 (and 32768, 131056 on scaled models) attend keys at
    0..7: beyond the original 8192 context, where the scaled frequencies dominate."""
    _assert(judged["far positions"])


def test_greedy_generation(judged):
    """Bug class: anything that flips a generated token (cache handling in generate, a lost
    lm_head on tied models): greedy tokens must be identical."""
    _assert(judged["greedy generation"])
