"""The checks bite: every catalogued conversion bug, applied to a correct conversion, fails verify.

A parity suite that passes a broken model is worse than none. For each bug in
llama_parity/mutations.py and each variant where it is a bug (k permuted with n_heads only differs
under GQA, factor 8 vs 32 only on scaled models...), verify must fail and the check named in the
catalog must be among the failures.
"""

from __future__ import annotations

import json

import pytest

from llama_parity.mutations import CATALOG, mutate_copy
from llama_parity.verify import verify

# Representatives of each structural trait: MHA + sentencepiece + shards on dim 1 (Llama 2 13B),
# theta 1e6 + GQA (Code Llama 34B), Llama 3 GQA unscaled, 3.1 scaled (8), 3.2 tied scaled (32),
# Guard 3 1B (untied, 32), 405B MP16 (replicated kv heads).
VARIANTS = ["llama2-13b", "codellama-34b", "llama3-8b", "llama3.1-8b", "llama3.2-3b", "llama-guard-3-1b",
            "llama3.1-405b-mp16"]


def _tiny_config(variant_id: str) -> dict:
    """The config keys mutations look at, known at collection time from the tiny shape."""
    from llama_parity.fixtures.factory import HEAD_DIM, tiny_shape
    from llama_parity.fixtures.variants import get

    spec = get(variant_id)
    shape = tiny_shape(spec, spec.num_shards)
    return {"num_key_value_heads": shape.n_kv_heads, "num_attention_heads": shape.n_heads,
            "hidden_size": shape.n_heads * HEAD_DIM,
            "rope_scaling": {"factor": spec.rope_scaling.factor} if spec.rope_scaling else None,
            "rope_theta": spec.params.get("rope_theta", 10000.0), "tie_word_embeddings": spec.tie_word_embeddings}


# Only (bug, variant) pairs where the mutation is a bug: no test is collected just to be skipped.
CASES = [pytest.param(m, v, id=f"{m.name}-{v}") for m in CATALOG for v in VARIANTS if m.applies(_tiny_config(v))]


@pytest.mark.parametrize("mutation,variant_id", CASES)
def test_mutation_is_caught(tiny, tmp_path, mutation, variant_id):
    """Bug class: whichever the mutation names (see its `bug` field): the checks must not pass it."""
    hf = tiny.hf(variant_id)
    assert mutation.applies(json.loads((hf / "config.json").read_text()))
    broken = mutate_copy(hf, tmp_path / "broken", mutation)
    rep = verify(tiny.meta(variant_id), broken, bf16=False, tokenizer=False)
    failed = {c.name for c in rep.checks if not c.ok}
    assert not rep.ok, f"{mutation.name} ({mutation.bug}) passed verify on {variant_id}"
    assert failed & set(mutation.caught_by), f"{mutation.name} caught only by {failed}, expected {mutation.caught_by}"


def test_every_mutation_applies_somewhere():
    """Bug class: a catalog entry that never runs (its bug untested)."""
    assert {p.values[0].name for p in CASES} == {m.name for m in CATALOG}
