"""The checks bite, and only where they should.

Harmful: every catalogued conversion bug (llama_parity/mutations.py), applied to a correct
conversion of the tiny layouts where its bug class shows, makes `verify` fail, in every check the
catalog names for it. A parity suite that passes a broken model is worse than none.
Benign: changes that do not change the release (re-sharding, tensor order, an exact upcast, JSON
formatting, version stamps, transformers 5's spelling, old rotary buffers) must pass: a gate that
fails a right release is not used for long.

Byte faults no prompt reaches (rows swapped, zeroed or NaN, a flipped bit, a norm 1 ulp off) are
caught by the byte check alone, which every mode runs (test_exact_bytes.py runs one per mode).

Tokenizer faults (a merge at another priority, a token's bytes, an added token's flags, fields that
change truncation, decoding or padding) are entries too, judged with the tokenizer check on.

Cost: single-process, bugs that only metadata and tokenizer checks can see run verify with
checks="metadata" (no model run); the others, and the benign changes, with checks="quick" (every
metadata check, the exact-copy check of the weights, fp32 logits and far positions): a file-level
change that keeps those passes leaves the same weights and config, so the cache, greedy and bf16
checks cannot differ. Each entry is applied once per layout and judged in each of its modes.
With 2 ranks (test_verify_paths.py: test_every_fault_with_two_ranks), every entry runs --quick, the
model checks included, in the one launch that module makes.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from llama_parity.mutations import BENIGN, CATALOG, MODEL_CHECKS, TOKENIZER_PREFIX, mutate_copy
from llama_parity.verify import verify

# Faults in the weight files (bytes, names, shapes) run in both single-process model paths (both
# models in memory, and streamed): the byte check is the same code in each, the model checks are
# not, and each path must reach both. So do model-visible faults in the HF folder's metadata (each
# path reads config.json its own way). The others (metadata no model sees, the tokenizer files) are
# judged with no model run, by code that runs before any path is chosen and is the same in every
# path (test_verify_paths.py compares the paths' rows, the tokenizer's included). With 2 ranks
# (test_verify_paths.py: test_every_fault_with_two_ranks) every entry runs too.
def _modes(m) -> tuple[str, ...]:
    return ("streaming", "full") if m.in_weights or m.needs_model else ("metadata",)


HARMFUL = [pytest.param(m, v, mode, id=f"{m.name}-{v}-{mode}") for m in CATALOG for v in m.layouts
           for mode in _modes(m)]


def _judge(meta, hf, mutation, mode: str):
    return verify(meta, hf, bf16=False, tokenizer=mutation.tokenizer, checks="metadata" if mode == "metadata"
                  else "quick", memory="streaming" if mode == "metadata" else mode)


def failed_checks(rep: dict) -> set[str]:
    """Every failed row's name as verify's table prints it (tokenizer rows with their prefix)."""
    tok = rep.get("tokenizer") or {"checks": []}
    return {c["name"] for c in rep["checks"] if not c["ok"]} | {
        f"{TOKENIZER_PREFIX}{c['name']}" for c in tok["checks"] if not c["ok"]}


def _assert_caught(mutation, variant_id: str, rep: dict) -> None:
    failed = failed_checks(rep)
    assert not rep["ok"], f"{mutation.name} ({mutation.bug}) passed verify on {variant_id}"
    missing = set(mutation.caught_by) - failed
    assert not missing, f"{mutation.name}: {sorted(missing)} did not fail; failed: {sorted(failed)}"


@pytest.fixture(scope="module")
def mutated(tiny, tmp_path_factory):
    """Each entry applied once per layout and shared by the modes that judge it (verify reads it only)."""
    made = {}

    def get(mutation, variant_id):
        key = (mutation.name, variant_id)
        if key not in made:
            made[key] = mutate_copy(tiny.hf(variant_id), tmp_path_factory.mktemp("mutant") / "hf", mutation)
        return made[key]
    return get


@pytest.mark.parametrize("mutation,variant_id,mode", HARMFUL)
def test_mutation_is_caught(tiny, mutated, mutation, variant_id, mode):
    """Bug class: whichever the mutation names (see its `bug` field): the checks must not pass it,
    and the check meant for it must be among the failures (not an unrelated one by luck), in
    every single-process path (both models in memory, streamed; --nproc: test_verify_paths.py)."""
    rep = _judge(tiny.meta(variant_id), mutated(mutation, variant_id), mutation, mode)
    _assert_caught(mutation, variant_id, rep.to_dict())


@pytest.fixture(scope="module")
def bf16_tiny(tmp_path_factory):
    """Tiny checkpoints stored in bf16 (as Meta ships Llama 3), converted: the start of an upcast."""
    from llama_parity.converter.convert import ConvertOptions, convert_meta_to_hf
    from llama_parity.fixtures.factory import make_tiny_checkpoint
    from llama_parity.releases import get

    made = {}

    def get_pair(variant_id):
        if variant_id not in made:
            root = tmp_path_factory.mktemp(f"bf16-{variant_id}")
            meta = make_tiny_checkpoint(get(variant_id), root, dtype=torch.bfloat16)
            convert_meta_to_hf(meta, root / "hf", ConvertOptions(progress=False))
            made[variant_id] = (meta, root / "hf")
        return made[variant_id]
    return get_pair


@pytest.mark.parametrize("change,variant_id", [pytest.param(b, v, id=f"{b.name}-{v}") for b in BENIGN for v in b.layouts])
def test_benign_change_passes(tiny, bf16_tiny, tmp_path, change, variant_id):
    """Bug class: false failures: a re-sharded, reordered, upcast, re-serialised or re-stamped copy
    of a right release rejected as if it were wrong. Judged with both models in memory
    (transformers' from_pretrained reads the changed files its own way); the streamed checks judge
    every benign twin with 2 ranks (test_verify_paths.py: test_every_fault_with_two_ranks)."""
    meta, hf = bf16_tiny(variant_id) if change.meta_dtype == torch.bfloat16 else (tiny.meta(variant_id),
                                                                                   tiny.hf(variant_id))
    changed = mutate_copy(hf, tmp_path / "changed", change)
    rep = verify(meta, changed, bf16=False, tokenizer=change.tokenizer, checks="quick", memory="full")
    assert rep.ok, f"{change.name} ({change.change}) failed verify on {variant_id}\n{rep.render()}"
    assert any(c.name in MODEL_CHECKS for c in rep.checks), "the model checks did not run"


def test_full_verify_includes_the_metadata_checks(tiny, tmp_path):
    """Bug class: a check that only the fast test path runs (the gate a user runs must fail too)."""
    from llama_parity.mutations import BY_NAME

    m = BY_NAME["base_eos_on_instruct"]
    rep = verify(tiny.meta(m.layouts[0]), mutate_copy(tiny.hf(m.layouts[0]), tmp_path / "b", m), bf16=False,
                 tokenizer=False, checks="quick")
    assert not rep.ok and set(m.caught_by) <= {c.name for c in rep.checks if not c.ok}


def test_catalog_size():
    """Bug class: a catalog that shrinks unnoticed (issue 16: at least 40 harmful, 12 benign), or a
    mutation with no layout to run on (its bug untested)."""
    assert len(CATALOG) >= 40 and len(BENIGN) >= 12
    assert all(m.layouts for m in CATALOG) and all(b.layouts for b in BENIGN)
    assert len({m.name for m in CATALOG} | {b.name for b in BENIGN}) == len(CATALOG) + len(BENIGN)
