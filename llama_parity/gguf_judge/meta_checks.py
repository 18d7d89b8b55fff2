"""GGUF metadata against what Meta's files and the release imply (nothing in the file is trusted).

Expected values come from params.json and the shards (dims, heads, kv heads after de-replication,
FFN from w1's shape, theta, eps, tying), the registry (family's context length, RoPE scaling, base
or instruct) and Meta's tokenizer (bos/eos/eot/eom ids). llama.cpp stores Llama 3.1+ RoPE scaling as
`rope_freqs.weight`, one factor per rotary pair that divides the pair's frequency; the expected
factors are Meta's unscaled frequencies over its scaled ones (reference_model.rope_frequencies).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llama_parity import releases as registry
from llama_parity.parity import Check
from llama_parity.reference_model.model import ModelArgs, rope_frequencies

from .names import ROPE_FREQS, expected_names

ROPE_FACTOR_REL_BOUND = 1e-5  # float32 evaluation of the same formula (2^-24 per step, a few steps)


@dataclass
class Expected:
    """What the Meta side implies, computed once."""

    meta: object  # llama_parity.metadata.MetaSide
    tokenizer: object | None  # Meta's tokenizer (reference_model.tokenizer), None when absent
    rope: object | None  # RopeScalingArgs or None
    vocab: int
    head_dim: int
    kv_heads: int
    ffn: int


def expected_from(meta, tokenizer, rope) -> Expected:
    p = meta.params
    heads = int(p["n_heads"])
    kv = int(p.get("n_kv_heads") or heads) // meta.kv_replication
    shapes = meta.merged_shapes()
    return Expected(meta, tokenizer, rope, shapes["model.embed_tokens.weight"][0], int(p["dim"]) // heads, kv,
                    shapes["model.layers.0.mlp.gate_proj.weight"][0])


def _eq(name: str, got, want, catches: str) -> Check:
    ok = got == want
    return Check(name, catches, 0.0 if ok else 1.0, 0.0, ok, f"the GGUF has {got!r}, the Meta checkpoint implies "
                                                                 f"{want!r}")


def _f32(x) -> float | None:
    return None if x is None else float(np.float32(x))


def architecture_checks(gf, ex: Expected) -> list[Check]:
    p = ex.meta.params
    want = {"context_length": registry.FAMILY_FACTS[ex.meta.family].max_position_embeddings,
            "embedding_length": int(p["dim"]), "block_count": int(p["n_layers"]),
            "feed_forward_length": ex.ffn, "attention.head_count": int(p["n_heads"]),
            "attention.head_count_kv": ex.kv_heads, "rope.dimension_count": ex.head_dim}
    out = [_eq("gguf: general.architecture", gf.arch, "llama", "a GGUF of another architecture (llama.cpp would "
               "build another graph)")]
    for k, v in want.items():
        out.append(_eq(f"gguf: llama.{k}", gf.key(k), v, "dims, heads, kv heads, FFN, context length or rotary "
                       "dims of another model or release"))
    for k in ("attention.key_length", "attention.value_length"):
        if gf.key(k) is not None:
            out.append(_eq(f"gguf: llama.{k}", gf.key(k), ex.head_dim, "head size of another model"))
    if gf.key("vocab_size") is not None:
        out.append(_eq("gguf: llama.vocab_size", gf.key("vocab_size"), ex.vocab, "a vocabulary of another size"))
    out.append(_eq("gguf: llama.rope.freq_base", _f32(gf.key("rope.freq_base", 10000.0)),
                   _f32(p.get("rope_theta", 10000.0)), "rope_theta dropped or of another release (Code Llama 1e6, "
                   "Llama 3 5e5 becoming 1e4)"))
    out.append(_eq("gguf: llama.attention.layer_norm_rms_epsilon",
                   _f32(gf.key("attention.layer_norm_rms_epsilon")), _f32(p.get("norm_eps", 1e-5)),
                   "norm eps of another version (Llama 1 1e-6 vs 1e-5)"))
    return out


def expected_rope_factors(ex: Expected) -> np.ndarray | None:
    """llama.cpp's per-pair divisors that give Meta's scaled frequencies (None: no scaling)."""
    if ex.rope is None:
        return None
    p = ex.meta.params
    args = ModelArgs(dim=int(p["dim"]), n_layers=1, n_heads=int(p["n_heads"]), n_kv_heads=ex.kv_heads,
                     vocab_size=ex.vocab, rope_theta=float(p.get("rope_theta", 10000.0)), use_scaled_rope=True,
                     rope_scaling=ex.rope)
    plain = rope_frequencies(ModelArgs(**{**args.__dict__, "rope_scaling": None, "use_scaled_rope": False}))
    return (plain.double() / rope_frequencies(args).double()).numpy()


def rope_scaling_checks(gf, ex: Expected) -> list[Check]:
    """The llama3 RoPE scaling as llama.cpp applies it: the rope_freqs factors (factor 8 vs 32, the
    interpolation band), and no other scaling type declared."""
    want = expected_rope_factors(ex)
    t = gf.tensors.get(ROPE_FREQS)
    got = None if t is None else t.dequantized().reshape(-1).astype(np.float64)
    catches = ("RoPE frequency factors missing (Llama 3.1 GGUFs before llama.cpp stored them), of another factor "
               "(8 vs 32) or band, or present on a model without scaling")
    if want is None:
        ok = got is None or bool(np.all(got == 1.0))
        detail = "no scaling expected and none stored" if ok else f"rope_freqs present: {got[:8].tolist()}..."
        out = [Check("gguf: rope_freqs (llama3 RoPE scaling)", catches, 0.0 if ok else 1.0, 0.0, ok, detail)]
    elif got is None or got.shape != want.shape:
        out = [Check("gguf: rope_freqs (llama3 RoPE scaling)", catches, 1.0, ROPE_FACTOR_REL_BOUND, False,
                     f"expected {len(want)} factors (factor {ex.rope.factor}), the GGUF has "
                     f"{'none' if got is None else len(got)}")]
    else:
        rel = float(np.max(np.abs(got - want) / want))
        ok = rel <= ROPE_FACTOR_REL_BOUND
        out = [Check("gguf: rope_freqs (llama3 RoPE scaling)", catches, rel, ROPE_FACTOR_REL_BOUND, ok,
                     f"{len(want)} factors, largest {got.max():g} (Meta: factor {ex.rope.factor:g})" if ok else
                     f"factors {np.round(got, 4).tolist()} where Meta's scaling (factor {ex.rope.factor:g}) gives "
                     f"{np.round(want, 4).tolist()}")]
    kind = gf.key("rope.scaling.type")
    if kind not in (None, "none"):
        out.append(_eq("gguf: llama.rope.scaling.type", kind, None, "a RoPE scaling type Meta's model does not use"))
    return out


def tying_check(gf, ex: Expected) -> Check:
    """Tied (Llama 3.2): no output.weight, or one equal to the embedding; untied: its own output matrix
    (without it llama.cpp silently uses the embedding)."""
    has = "output.weight" in gf.tensors
    catches = "the output matrix dropped (llama.cpp then reuses the embedding) or a tied model given another one"
    if not ex.meta.tied:
        return Check("gguf: separate output matrix", catches, 0.0 if has else 1.0, 0.0, has,
                     "output.weight stored" if has else "no output.weight: llama.cpp would use token_embd as output")
    same = not has or gf.tensors["output.weight"].same_bytes(gf.tensors["token_embd.weight"])
    return Check("gguf: tied output (embedding reused)", catches, 0.0 if same else 1.0, 0.0, same,
                 "no separate output.weight" if not has else
                 "output.weight equals token_embd" if same else "output.weight differs from token_embd")


def tensor_table_checks(gf, ex: Expected) -> list[Check]:
    """Names and shapes: every Meta tensor once under llama.cpp's name (rope_freqs when scaled)."""
    names = expected_names(ex.meta)
    want = set(names) | ({ROPE_FREQS} if ex.rope is not None else set())
    got = set(gf.tensors) - ({ROPE_FREQS} if ex.rope is None else set())
    if ex.meta.tied:
        got.discard("output.weight")  # judged by the tying check
    missing, extra = sorted(want - got), sorted(got - want)
    listing = [f"missing {n}" for n in missing] + [f"unexpected {n}" for n in extra]
    out = [Check("gguf: tensor names", "a tensor or layer dropped, or one the Meta checkpoint does not have",
                 float(len(listing)), 0.0, not listing, "; ".join(listing[:6]) or f"{len(want)} tensors")]
    differ, shapes = [], ex.meta.merged_shapes()
    for name in sorted(set(names) & got):
        want_shape = tuple(merged_shape(shapes, names[name], tuple(ex.meta.shards[0][names[name]].shape)))
        if gf.tensors[name].shape != want_shape:
            differ.append(f"{name}: GGUF {list(gf.tensors[name].shape)}, Meta implies {list(want_shape)}")
    out.append(Check("gguf: tensor shapes", "a GGUF of another model, kv heads not de-duplicated, a transposed "
                     "matrix", float(len(differ)), 0.0, not differ, "; ".join(differ[:6]) or "as Meta's"))
    return out


def merged_shape(shapes: dict, key: str, shard_shape: tuple) -> tuple:
    """A Meta tensor's shape after merging shards (metadata.MetaSide.merged_shapes, keyed by HF name)."""
    from llama_parity.metadata import hf_key

    hf = hf_key(key)
    return shapes.get(hf, shard_shape) if hf else shard_shape


def structure_ok(checks: list[Check]) -> bool:
    keys = ("gguf: tensor names", "gguf: tensor shapes", "gguf: general.architecture")
    return all(c.ok for c in checks if c.name in keys)

