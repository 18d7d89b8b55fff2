"""Release facts, one home for the converter and the judge: which Llama release a checkpoint is and
what that implies.

- `registry`: the table of releases (real params.json, shard layouts, folder names, facts per release);
- `params`: what a params.json implies (`implied_arch`, Meta's FFN rounding in `intermediate_size`);
- `identify`: the one decision "which release, which twin" (`identify() -> Identification`), for
  convert, verify, the tokenizer check, to-meta and diagnose; `HFClaim` is what an HF folder says;
- `rules`: which releases fit (`releases_matching`, `releases_named_by`), RoPE scaling, kv-head
  replication, the family of an unknown shape, the release holding a conversion's chat metadata;
- `files`: where the tokenizer is and its kind, and Meta's FP8 downloads;
- `official/`: the official Hugging Face config.json / generation_config.json per release (data,
  with their sources in official/SOURCES.md), read through `official_file`.

Neutral code: the converter and the judge both import it (neither imports the other).
Copies kept on purpose (so the judge stays independent) are listed in docs/facts.md.
"""

from __future__ import annotations

import json
from importlib import resources

from .files import (FP8_DTYPES, LLAMA3_SPECIAL_TOKEN_COUNT, find_tokenizer, fp8_refusal, fp8_scale_files,
                    tokenizer_kind, tokenizer_n_words)
from .identify import (GENERATION_DEFAULTS, HFClaim, Identification, IdentifyError, ambiguity_line, decide_twin,
                       eos_token_name, expects_chat_template, identify, rebase_official_ids, token_ids)
from .params import (DEFAULT_ROPE_THETA, Arch, ParamsError, ffn_params_for, implied_arch, intermediate_size,
                     norm_eps)
from .registry import (BY_ID, FAMILIES, FAMILY_FACTS, GUARD3_CATEGORY_COUNTS, LLAMA3_VOCAB, LLAMA31_SCALING,
                       LLAMA32_SCALING, VARIANTS, FamilyFacts, RopeScaling, VariantSpec, architecture_variants, get,
                       guard_categories)
from .rules import (family_by_traits, family_for_hf_config, hf_rope_scaling, hf_rope_theta, kv_replication,
                    kv_replication_choices, metadata_release, name_tokens, output_facts, releases_for_hf_config,
                    releases_matching, releases_named_by, rope_scaling_for, stored_kv_replication)


def official_file(release_id: str, name: str) -> dict | None:
    """An official HF file of a release (config.json, generation_config.json) as recorded in
    official/, or None when that repo has none. The 405B MP16 layout shares the MP8 repo's files."""
    path = resources.files(__name__) / "official" / release_id.replace("-mp16", "") / name
    return json.loads(path.read_text()) if path.is_file() else None


__all__ = [n for n in dir() if not n.startswith("_") and n not in ("annotations", "json", "resources")]
