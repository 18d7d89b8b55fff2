"""Explicit key tables between Meta's checkpoint names and Hugging Face's LlamaForCausalLM names.

`{i}` is the layer index. `split` is how Meta's model-parallel shards cut each tensor:
0 = column-parallel (output features), 1 = row-parallel (input features), None = replicated.
`rotary` names which head count the rotary permutation uses ("q": n_heads, "k": kv heads).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import ConversionError


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

# The one table of tensors that are read but not converted, each with the reason it is harmless.
# Any other key a conversion does not consume is refused by name: a silently dropped tensor
# (a bias, an extra layer) is a different model converted as if it were the planned one.
HARMLESS_META_KEYS: dict[str, str] = {
    # Llama 1/2 files: precomputed RoPE frequencies, a buffer, not a weight. HF recomputes them
    # from rope_theta; convert checks they agree with params.json first.
    "rope.freqs": "RoPE frequencies recomputed from rope_theta",
}
HARMLESS_HF_KEYS: dict[str, str] = {
    # Old transformers versions (< 4.32) saved the rotary buffer with the weights.
    "model.layers.{i}.self_attn.rotary_emb.inv_freq": "RoPE frequencies recomputed from rope_theta",
    "model.rotary_emb.inv_freq": "RoPE frequencies recomputed from rope_theta",
}


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


def _generic(key: str) -> tuple[str, int | None]:
    m = _LAYER_RE.search(key)
    if not m:
        return key, None
    return key[: m.start()] + ".{i}." + key[m.end():], int(m.group(1))


def _describe_extras(unknown: list[str], beyond: dict[int, list[str]], n_layers: int, where, layers_from: str) -> str:
    parts = []
    if beyond:
        ls = sorted(beyond)
        span = f"layer {ls[0]}" if len(ls) == 1 else f"layers {ls[0]}..{ls[-1]}"
        parts.append(f"{span} beyond {layers_from}'s {n_layers} layers ({beyond[ls[0]][0]}, ...)")
    if unknown:
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        parts.append(f"tensors the Llama architecture has no place for: {', '.join(unknown[:5])}{more}")
    return (f"{where} holds " + "; ".join(parts) + ". Converting would silently drop them; this is not the model "
            f"{layers_from} describes (fix {layers_from}, or remove the tensors if you know they are unused)")


def _check_keys(keys, n_layers: int, known: dict[str, KeyRule], harmless, where, layers_from: str) -> None:
    unknown, beyond = [], {}
    for k in keys:
        generic, layer = _generic(k)
        if k in harmless or generic in harmless:
            continue
        if generic in known and (layer is None or layer < n_layers):
            continue
        if generic in known:
            beyond.setdefault(layer, []).append(k)
        else:
            unknown.append(k)
    if unknown or beyond:
        raise ConversionError(_describe_extras(sorted(unknown), beyond, n_layers, where, layers_from))


def check_meta_keys(keys, n_layers: int, *, where) -> None:
    """Refuse (naming them) tensors of a Meta shard that conversion would not consume."""
    _check_keys(keys, n_layers, {r.meta: r for r in GLOBAL_KEYS + LAYER_KEYS}, HARMLESS_META_KEYS, where,
                "params.json")


def check_hf_keys(keys, n_layers: int, *, where) -> None:
    """Refuse (naming them) tensors of an HF folder that the inverse plan would not consume."""
    _check_keys(keys, n_layers, _HF_TO_RULE, HARMLESS_HF_KEYS, where, "config.json")
