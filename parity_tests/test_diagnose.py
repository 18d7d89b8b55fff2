"""`diagnose` names the bug: for each catalogued bug, the first divergent stage and the repair.

Bug class of the tool itself: a diagnosis that blames the wrong layer or the wrong bug sends a
researcher the wrong way. Each mutation is applied to a correct conversion and must be named.
"""

from __future__ import annotations

import pytest
import torch

from llama_parity.diagnose import diagnose
from llama_parity.mutations import BY_NAME, mutate_copy

EXPECTED = {
    "k_permuted_with_n_heads": ("layer 0 attention", "wk permuted with n_heads instead of n_kv_heads"),
    "q_not_permuted": ("layer 0 attention", "wq left in Meta's interleaved rotary layout"),
    "gate_up_swapped": ("layer 0 feed-forward", "w1/w3 (gate/up) swapped"),
    "norms_swapped": ("layer 0 attention", "attention_norm/ffn_norm swapped"),
    "rope_factor_8_not_32": (None, "RoPE scaling missing or with the wrong factor"),
    "rope_theta_dropped": ("layer 0 attention", "rope_theta differs from params.json"),
    "untied_without_lm_head": ("logits", "tie_word_embeddings lost"),
    "wrong_norm_eps": ("config.json", "rms_norm_eps"),
    "k_not_permuted": ("layer 0 attention", "wk left in Meta's interleaved rotary layout"),
    "tied_on_untied": ("logits", "tie_word_embeddings set on an untied model"),
    # transformers cannot build this rope: the metadata check names the field, no traceback
    "low_freq_factor_missing": (None, "config: rope_scaling.low_freq_factor"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_diagnose_names_the_bug(tiny, tmp_path, name):
    """Bug class: a diagnosis blaming the wrong stage or bug (the catalog's repair, not a table here)."""
    variant = BY_NAME[name].layouts[0]  # where the bug class shows (GQA, tied or untied, scaled RoPE)
    broken = mutate_copy(tiny.hf(variant), tmp_path / "broken", BY_NAME[name])
    d = diagnose(tiny.meta(variant), broken)
    stage, bug = EXPECTED[name]
    assert not d.parity
    if stage is not None:
        assert d.first_divergence == stage, d.render()
    assert any(bug in b for b in d.explained_by), d.render()
    assert len(d.explained_by) == 1, d.render()


def test_diagnose_other_model(tiny):
    """Bug class: a folder of another model (shapes differ) crashing diagnose instead of being named."""
    d = diagnose(tiny.meta("llama3.1-8b"), tiny.hf("llama3.2-1b-instruct"))
    assert not d.parity and d.first_divergence == "tensor shapes and config dims"
    assert any("tensors: shapes" in b and "mlp.gate_proj" in b for b in d.explained_by), d.render()


def test_diagnose_clean_conversion(tiny):
    """Bug class: false alarms on a correct conversion."""
    d = diagnose(tiny.meta("llama3.1-8b"), tiny.hf("llama3.1-8b"))
    assert d.parity and d.first_divergence is None


def test_diagnose_names_dtype_narrowing(tiny, tmp_path):
    """Bug class: rounding from a dtype change (fp32 -> bf16, bf16 -> fp16) blamed on the layout."""
    from llama_parity.converter.convert import ConvertOptions, convert_meta_to_hf

    meta = tiny.meta("llama3.2-1b")  # tiny checkpoints are fp32
    out = tmp_path / "bf16"
    convert_meta_to_hf(meta, out, ConvertOptions(dtype=torch.bfloat16, progress=False))
    d = diagnose(meta, out)
    assert not d.parity and d.first_divergence == "embedding"
    assert len(d.explained_by) == 1 and "stored as bfloat16 while the checkpoint is float32" in d.explained_by[0]
