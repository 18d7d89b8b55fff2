"""The judge of merging, judged: real fairscale model parallelism over unmerged shards.

One gloo process per shard runs Meta's model with fairscale's parallel layers
(reference_model/fairscale_mp.py). Its logits must equal both the single-process shard emulation
(reference_model/model.py, which every other parity test uses) and the converted HF model. Slow to
start (a process per shard group), so it runs on the two embedding layouts, Llama 2's
ParallelEmbedding (split on the hidden dim) and Llama 3's VocabParallelEmbedding (split on the
vocab), and on shard groups: the 405B MP16 layout (kv heads replicated across shards) on 2 ranks of
8 shards each.
"""

from __future__ import annotations

import pytest
import torch

from llama_parity import parity
from llama_parity.reference_model.fairscale_mp import fairscale_logits
from llama_parity.reference_model.model import load_meta_checkpoint

CASES = [pytest.param("llama2-13b", None, id="llama2-13b-mp2-parallel-embedding"),
         pytest.param("llama3.1-70b", 2, id="llama3.1-70b-mp2-vocab-parallel-embedding")]


@pytest.mark.parametrize("variant_id,num_shards", CASES)
def test_fairscale_equals_emulation_and_hf(tiny, variant_id, num_shards):
    """Bug class: a shard-merging error shared by the converter and the single-process emulation
    (e.g. both concatenating the embedding on the wrong dim) that only real fairscale would expose."""
    meta = tiny.meta(variant_id, num_shards)
    rope = parity.expected_rope_scaling(meta, variant_id)
    ref = load_meta_checkpoint(meta, rope_scaling=rope)
    tokens = parity.fixed_prompt(ref.args.vocab_size)
    fs = fairscale_logits(meta, tokens, rope_scaling=rope)
    emulated = ref.forward(torch.tensor([tokens]))[0]
    hf = parity.load_hf_model(tiny.hf(variant_id, num_shards))
    converted = parity.hf_logits(hf, tokens, "cpu")
    scale = float(fs.abs().max())
    assert float((fs - emulated).abs().max()) / scale <= parity.FP32_REL_BOUND
    assert float((fs - converted).abs().max()) / scale <= parity.FP32_REL_BOUND


def test_shard_groups_equal_emulation(tiny):
    """Bug class: a rank holding several shards joins them wrongly (a column-parallel weight on dim 1,
    replicated kv heads merged away or paired with the wrong query heads)."""
    meta = tiny.meta("llama3.1-405b-mp16")
    rope = parity.expected_rope_scaling(meta, "llama3.1-405b-mp16")
    ref = load_meta_checkpoint(meta, rope_scaling=rope)
    tokens = parity.fixed_prompt(ref.args.vocab_size)
    fs = fairscale_logits(meta, tokens, rope_scaling=rope, world=2)
    emulated = ref.forward(torch.tensor([tokens]))[0]
    assert float((fs - emulated).abs().max()) / float(fs.abs().max()) <= parity.FP32_REL_BOUND


# Groups of shards (MP16 on 1 and 4 ranks, kv heads replicated inside groups); pieces of shards: kv
# heads cut (8B on 2), kv heads replicated (8B on 4, 70B MP2 on 4), ParallelEmbedding cut (13B on 4).
REGROUPS = [pytest.param("llama3.1-405b-mp16", None, w, id=f"405b-mp16-on-{w}") for w in (1, 4)] + [
    pytest.param("llama3.1-8b", None, w, id=f"8b-on-{w}") for w in (2, 4)] + [
    pytest.param("llama3.1-70b", 2, 4, id="70b-mp2-on-4"), pytest.param("llama2-13b", None, 4, id="13b-mp2-on-4")]


@pytest.mark.parametrize("variant_id,num_shards,world", REGROUPS)
def test_rank_slices_compute_the_original_model(tiny, variant_id, num_shards, world):
    """Bug class: the slices ranks get when their count differs from the shard count (groups of
    shards, or pieces of one) joined or cut wrongly: a head cut in two, a kv head lost or serving
    the wrong query heads, a ParallelEmbedding cut on the vocab. The N slices, run by the
    single-process emulation as if they were N shards, must give the original model's logits."""
    import dataclasses

    from llama_parity.reference_model.fairscale_mp import load_shard_group
    from llama_parity.reference_model.model import Transformer

    meta = tiny.meta(variant_id, num_shards)
    ref = load_meta_checkpoint(meta, rope_scaling=parity.expected_rope_scaling(meta, variant_id))
    slices = [load_shard_group(meta, r, world, ref.embedding_dim, ref.args.head_dim) for r in range(world)]
    n_kv = slices[0]["layers.0.attention.wk.weight"].shape[0] // ref.args.head_dim * world
    regrouped = Transformer(dataclasses.replace(ref.args, n_kv_heads=n_kv), slices, embedding_dim=ref.embedding_dim)
    tokens = parity.fixed_prompt(ref.args.vocab_size)
    want, got = ref.forward(torch.tensor([tokens]))[0], regrouped.forward(torch.tensor([tokens]))[0]
    assert float((want - got).abs().max()) / float(want.abs().max()) <= parity.FP32_REL_BOUND
