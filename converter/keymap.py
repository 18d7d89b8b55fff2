"""Explicit key tables between Meta's checkpoint names and Hugging Face's LlamaForCausalLM names.

`{i}` is the layer index. `split` is how Meta's model-parallel shards cut each tensor:
0 = column-parallel (output features), 1 = row-parallel (input features), None = replicated.
`rotary` names which head count the rotary permutation uses ("q": n_heads, "k": kv heads).
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class KeyRule:
    meta: str
    hf: str
    split: int | None | str  # "embedding": depends on the family (see FamilyFacts.embedding_shard_dim)
    rotary: str | None = None


GLOBAL_KEYS: tuple[KeyRule, ...] = (
    KeyRule("tok_embeddings.weight", "model.embed_tokens.weight", "embedding"),
    KeyRule("norm.weight", "model.norm.weight", None),
    KeyRule("output.weight", "lm_head.weight", 0),
)

LAYER_KEYS: tuple[KeyRule, ...] = (
    KeyRule("layers.{i}.attention_norm.weight", "model.layers.{i}.input_layernorm.weight", None),
    KeyRule("layers.{i}.attention.wq.weight", "model.layers.{i}.self_attn.q_proj.weight", 0, "q"),
    KeyRule("layers.{i}.attention.wk.weight", "model.layers.{i}.self_attn.k_proj.weight", 0, "k"),
    KeyRule("layers.{i}.attention.wv.weight", "model.layers.{i}.self_attn.v_proj.weight", 0),
    KeyRule("layers.{i}.attention.wo.weight", "model.layers.{i}.self_attn.o_proj.weight", 1),
    KeyRule("layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight", None),
    KeyRule("layers.{i}.feed_forward.w1.weight", "model.layers.{i}.mlp.gate_proj.weight", 0),
    KeyRule("layers.{i}.feed_forward.w2.weight", "model.layers.{i}.mlp.down_proj.weight", 1),
    KeyRule("layers.{i}.feed_forward.w3.weight", "model.layers.{i}.mlp.up_proj.weight", 0),
)

# Present in Llama 1/2 files: the precomputed RoPE frequencies, a buffer, not a weight. Dropped
# (HF recomputes them from rope_theta), after checking they agree with params.json.
IGNORED_META_KEYS = ("rope.freqs",)


def meta_keys(n_layers: int, *, with_output: bool = True) -> list[tuple[KeyRule, str, str]]:
    """(rule, meta key, hf key) for every tensor of an n-layer model, in HF's write order."""
    out = [(r, r.meta, r.hf) for r in GLOBAL_KEYS[:1]]
    for i in range(n_layers):
        out += [(r, r.meta.format(i=i), r.hf.format(i=i)) for r in LAYER_KEYS]
    out.append((GLOBAL_KEYS[1], GLOBAL_KEYS[1].meta, GLOBAL_KEYS[1].hf))
    if with_output:
        out.append((GLOBAL_KEYS[2], GLOBAL_KEYS[2].meta, GLOBAL_KEYS[2].hf))
    return out


_HF_TO_RULE: dict[str, KeyRule] = {}
for _r in GLOBAL_KEYS + LAYER_KEYS:
    _HF_TO_RULE[_r.hf] = _r
_LAYER_RE = re.compile(r"\.(\d+)\.")


def rule_for_hf_key(hf_key: str) -> tuple[KeyRule, int | None]:
    """The rule and layer index for an HF key (for HF -> Meta conversion)."""
    m = _LAYER_RE.search(hf_key)
    if m:
        generic = hf_key[: m.start()] + ".{i}." + hf_key[m.end():]
        rule = _HF_TO_RULE.get(generic)
        if rule:
            return rule, int(m.group(1))
    rule = _HF_TO_RULE.get(hf_key)
    if rule is None:
        raise KeyError(hf_key)
    return rule, None
