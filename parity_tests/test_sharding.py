"""Model-parallel merging: a sharded checkpoint converts to exactly its single-file twin.

The factory cuts the same weights into the release's shard count and into one file; the two
conversions must be bit-identical, tensor by tensor. Catches: a shard merged along the wrong dim
(Llama 1/2 embeddings on dim 1 vs Llama 3 on dim 0), shards taken out of numeric order, kv heads
replicated across shards (405B MP16) kept or de-duplicated wrongly, replicated norms averaged.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from llama_parity.converter.convert import ConvertOptions, convert_meta_to_hf
from llama_parity.converter.errors import ConversionError
from llama_parity.releases import architecture_variants

SHARDED = [v.id for v in architecture_variants() if v.num_shards > 1]


def _tensors(hf_dir):
    out = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("variant_id", SHARDED)
def test_sharded_equals_single_file_twin(tiny, variant_id):
    """Bug class: wrong merge dim / shard order / kv de-duplication for model-parallel checkpoints."""
    sharded, single = _tensors(tiny.hf(variant_id)), _tensors(tiny.hf(variant_id, num_shards=1))
    assert sharded.keys() == single.keys()
    for k in single:
        assert sharded[k].dtype == single[k].dtype and torch.equal(sharded[k], single[k]), k
    c1 = json.loads((tiny.hf(variant_id) / "config.json").read_text())
    c2 = json.loads((tiny.hf(variant_id, num_shards=1) / "config.json").read_text())
    assert c1 == c2


def test_405b_mp16_kv_heads_deduplicated(tiny):
    """Bug class: the MP16 layout's params say 16 kv heads because each real kv head is stored on
    two shards; the HF model must have 8 (the real count), not 16 duplicated heads."""
    meta = tiny.meta("llama3.1-405b-mp16")
    stored = json.loads((meta / "params.json").read_text())["n_kv_heads"]
    cfg = json.loads((tiny.hf("llama3.1-405b-mp16") / "config.json").read_text())
    assert cfg["num_key_value_heads"] * 2 == stored


def test_diverging_replicas_refused(tiny, tmp_path):
    """Bug class: silently picking one copy when replicated kv heads differ between shards."""
    import shutil

    src = tiny.meta("llama3.1-405b-mp16")
    bad = tmp_path / src.name
    shutil.copytree(src, bad)
    sd = torch.load(bad / "consolidated.01.pth", weights_only=True)
    sd["layers.1.attention.wk.weight"] = sd["layers.1.attention.wk.weight"] + 1
    torch.save(sd, bad / "consolidated.01.pth")
    with pytest.raises(ConversionError, match="copies of each kv head differ"):
        convert_meta_to_hf(bad, tmp_path / "out", ConvertOptions(progress=False))
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial-*")), "a half-written output was left behind"


def test_replicated_norm_difference_reported(tiny, tmp_path):
    """Bug class: shards whose replicated norm copies disagree converted without a word."""
    import shutil

    src = tiny.meta("llama2-13b")
    bad = tmp_path / src.name
    shutil.copytree(src, bad)
    shutil.copy(src.parent / "tokenizer.model", tmp_path / "tokenizer.model")
    sd = torch.load(bad / "consolidated.01.pth", weights_only=True)
    sd["norm.weight"] = sd["norm.weight"] + 0.5
    torch.save(sd, bad / "consolidated.01.pth")
    rep = convert_meta_to_hf(bad, tmp_path / "out", ConvertOptions(progress=False))
    assert rep.replicated_max_abs_diff == pytest.approx(0.5, rel=1e-3)
    assert rep.replicated_worst_key == "norm.weight"
    assert any("replicated tensors differ" in w for w in rep.warnings)
