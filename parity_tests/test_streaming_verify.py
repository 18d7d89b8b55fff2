"""Bounded-memory verification (one decoder layer at a time) judges like the full one.

`verify` streams by default, and it is what runs on real 70B+ weights: it must run every check the
full verify runs, agree with it on every layout it will meet, and each streamed check must catch the
bug class it exists for (proved with the mutation catalog, llama_parity/mutations.py).
"""

from __future__ import annotations

from functools import lru_cache

import pytest

from llama_parity import parity
from llama_parity.mutations import BY_NAME, mutate_copy
from llama_parity.streaming import streaming_model_checks

LAYOUTS = ["llama2-70b", "codellama-34b", "llama3.1-405b-mp16", "llama3.2-1b", "llama-guard-3-1b"]
FULL_CHECKS = {"logits (fp32)", "next-token KL (fp32)", "top-1 agreement (fp32)", "kv-cache decode", "far positions",
               "greedy generation", "logits (bf16)", "next-token KL (bf16)"}


def _streamed(meta, hf, **kw):
    return {c.name: c for c in streaming_model_checks(meta, hf, rope_scaling=parity.expected_rope_scaling(meta), **kw)}


@lru_cache(maxsize=None)
def _correct(tiny, variant_id):
    return _streamed(tiny.meta(variant_id), tiny.hf(variant_id))


@pytest.mark.parametrize("variant_id", LAYOUTS)
def test_streaming_runs_every_check_and_passes_correct_conversions(tiny, variant_id):
    """Bug class: a streamed judge that skips a check the full one runs, or disagrees with the real
    model (a false alarm on a correct conversion would make the release gate useless on big weights)."""
    checks = _correct(tiny, variant_id)
    assert FULL_CHECKS <= set(checks), FULL_CHECKS - set(checks)
    assert all(c.ok for c in checks.values()), [(c.name, c.measured, c.detail) for c in checks.values() if not c.ok]


@pytest.mark.parametrize("variant_id", ["llama3.2-1b", "llama2-70b"])
def test_streamed_measures_what_full_measures(tiny, variant_id):
    """Bug class: a streamed pass that computes something else than the whole-model pass (another
    prompt, positions, cache steps or dtype): each check's measured value must match the full one's
    to within a tenth of its bound (both sides compute the same functions, only layer by layer)."""
    meta, hf = tiny.meta(variant_id), tiny.hf(variant_id)
    full = {c.name: c for c in parity.run_model_checks(meta, hf, rope_scaling=parity.expected_rope_scaling(meta))}
    streamed = _correct(tiny, variant_id)
    assert set(full) == FULL_CHECKS
    for name, c in full.items():
        assert abs(streamed[name].measured - c.measured) <= max(c.bound, 1e-12) / 10, (name, streamed[name], c)


@pytest.mark.parametrize("mutation,variant_id,check", [
    ("k_permuted_with_n_heads", "llama2-70b", "kv-cache decode"),
    ("k_permuted_with_n_heads", "llama2-70b", "hidden states per layer"),
    ("q_not_permuted", "codellama-34b", "greedy generation"),
    ("q_not_permuted", "codellama-34b", "logits (bf16)"),
    ("q_not_permuted", "codellama-34b", "next-token KL (fp32)"),
    ("rope_factor_8_not_32", "llama-guard-3-1b", "far positions"),
    ("rope_scaling_dropped", "llama3.1-405b-mp16", "far positions"),
    ("norms_swapped", "llama3.2-1b", "logits (fp32)"),
    ("untied_without_lm_head", "llama3.2-1b", "logits (fp32)")])
def test_each_streamed_check_catches_its_bug(tiny, tmp_path, mutation, variant_id, check):
    """Bug class: a streamed check that cannot fail (the streamed gate passing a broken conversion the
    full checks would fail): the named check itself must fail on the mutant of its class."""
    meta = tiny.meta(variant_id)
    broken = mutate_copy(tiny.hf(variant_id), tmp_path / "broken", BY_NAME[mutation])
    checks = _streamed(meta, broken)
    assert check in checks and not checks[check].ok, (mutation, check, checks.get(check))


def test_streamed_bf16_is_judged_against_meta_noise(tiny, tmp_path):
    """Bug class: precision lost in the HF weights that a fixed share of the logit scale would excuse:
    weights rounded to 4 mantissa bits (a quantisation or a lossy round trip) sit far outside K times
    Meta's own bf16 error, so the bf16 check fails, not only the fp32 one."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "coarse"
    shutil.copytree(tiny.hf("llama3.2-1b"), broken)
    for f in sorted(broken.glob("*.safetensors")):
        sd = load_file(str(f))
        coarse = {k: (v.float().view(torch.int32) & ~0x7FFFF).view(torch.float32).to(v.dtype).contiguous()
                  if v.dim() == 2 else v for k, v in sd.items()}
        save_file(coarse, str(f), metadata={"format": "pt"})
    checks = _streamed(tiny.meta("llama3.2-1b"), broken)
    assert not checks["logits (bf16)"].ok, checks["logits (bf16)"]
