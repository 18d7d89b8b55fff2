"""Bounded-memory verification (one decoder layer at a time) judges like the full one.

`verify --memory streaming` is what runs on real 70B+ weights; it must agree with the in-memory
checks on every layout it will meet and catch the same layout bugs.
"""

from __future__ import annotations

import pytest

from llama_parity import parity
from llama_parity.mutations import BY_NAME, mutate_copy
from llama_parity.streaming import streaming_model_checks

LAYOUTS = ["llama2-70b", "codellama-34b", "llama3.1-405b-mp16", "llama3.2-1b", "llama-guard-3-1b"]


@pytest.mark.parametrize("variant_id", LAYOUTS)
def test_streaming_checks_pass_on_correct_conversions(tiny, variant_id):
    """Bug class: a streamed judge that disagrees with the real model (a false alarm on a correct
    conversion would make the release gate useless on big weights)."""
    meta = tiny.meta(variant_id)
    checks = streaming_model_checks(meta, tiny.hf(variant_id), rope_scaling=parity.expected_rope_scaling(meta))
    assert all(c.ok for c in checks), [(c.name, c.measured) for c in checks]


@pytest.mark.parametrize("mutation,variant_id", [
    ("k_permuted_with_n_heads", "llama2-70b"), ("q_not_permuted", "codellama-34b"),
    ("rope_factor_8_not_32", "llama-guard-3-1b"), ("rope_scaling_dropped", "llama3.1-405b-mp16"),
    ("norms_swapped", "llama3.2-1b"), ("untied_without_lm_head", "llama3.2-1b")])
def test_streaming_checks_catch_layout_bugs(tiny, tmp_path, mutation, variant_id):
    """Bug class: the streamed gate passing a broken conversion the full checks would fail."""
    meta = tiny.meta(variant_id)
    broken = mutate_copy(tiny.hf(variant_id), tmp_path / "broken", BY_NAME[mutation])
    checks = streaming_model_checks(meta, broken, rope_scaling=parity.expected_rope_scaling(meta))
    assert not all(c.ok for c in checks)
