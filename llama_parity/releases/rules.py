"""Release rules, each decided once for the converter and the judge alike: which releases a
params.json fits (`releases_matching`), which a folder name names (`releases_named_by`), RoPE
scaling (`rope_scaling_for`), kv-head replication (`kv_replication`, `stored_kv_replication`),
the family of an unknown shape (`family_by_traits`) and the release whose official files hold a
conversion's chat metadata (`metadata_release`)."""

from __future__ import annotations

import re
from typing import Callable, Mapping

from .params import DEFAULT_ROPE_THETA, Arch, ParamsError, implied_arch
from .registry import LLAMA31_SCALING, LLAMA32_SCALING, VARIANTS, RopeScaling, VariantSpec, get


def releases_matching(arch: Arch, vocab_size: int | None = None) -> list[VariantSpec]:
    """Releases whose params.json implies the same function (vocab_size: the resolved vocab, if known)."""
    return [v for v in VARIANTS if v.arch == arch and (vocab_size is None or v.vocab_size == vocab_size)]


def output_facts(spec: VariantSpec) -> tuple:
    """What a conversion writes differently per release, base/instruct aside: two candidate
    releases with equal facts here convert to the same files (Llama 3.1 8B vs its Instruct twin
    differ only in chat metadata, which --instruct/--base decide)."""
    return (spec.family, spec.rope_scaling, spec.tie_word_embeddings, spec.real_kv_heads, spec.guard_categories)


# --- folder names ----------------------------------------------------------------------------------

# Tokens that name a layout or format, not a release (Llama3.1-405B-bf16-mp8, Llama-2-7b-chat-hf).
_LAYOUT_TOKEN = re.compile(r"^(hf|bf16|fp16|fp8|original|mp\d+)$")


def name_tokens(name: str) -> tuple[str, ...]:
    """A folder or repo name as comparable tokens: case, separators, a leading "Meta" and layout
    suffixes ignored, letters split from the version that follows them, version dots as separators
    ("Llama3.1" = "Llama-3.1" = "llama_3_1"). "Llama3.1-405B-bf16-mp8", "Llama-3.1-405B-MP8" and
    "meta-llama/Llama-3.1-405B" all give ("llama", "3", "1", "405b"); "llama_guard_3_1b" and
    "Llama-Guard-3-1B" give ("llama", "guard", "3", "1b")."""
    out: list[str] = []
    for t in re.split(r"[^a-z0-9]+", name.lower()):
        if not t or _LAYOUT_TOKEN.match(t):
            continue
        out += re.findall(r"[a-z]+|\d+[a-z]*", t)
    while out and out[0] in ("meta", "models"):
        out.pop(0)
    return tuple(out)


def _contains(hay: tuple[str, ...], needle: tuple[str, ...]) -> bool:
    n = len(needle)
    return any(hay[i:i + n] == needle for i in range(len(hay) - n + 1))


def releases_named_by(folder_name: str) -> tuple[VariantSpec, ...]:
    """The releases whose download or repo name appears in `folder_name` (the longest match wins;
    several when only the layout differs, e.g. 405B MP8 and MP16). A bare size ("7B", as Llama 1
    shipped) counts only as the whole name."""
    tokens = name_tokens(folder_name)
    best: list[VariantSpec] = []
    best_len = 0
    for spec in VARIANTS:
        for alias in spec.folder_names:
            key = name_tokens(alias)
            hit = key == tokens if len(key) == 1 else _contains(tokens, key)
            if hit and len(key) >= best_len:
                if len(key) > best_len:
                    best, best_len = [], len(key)
                if spec not in best:
                    best.append(spec)
    return tuple(best)


# --- facts decided once ----------------------------------------------------------------------------

def kv_replication(num_shards: int, real_kv_heads: int) -> int:
    """How many times Meta stores each kv head: model parallelism gives every shard at least one,
    so with more shards than kv heads each is replicated (405B MP16: 8 kv heads stored twice)."""
    return num_shards // real_kv_heads if num_shards > real_kv_heads else 1


def kv_replication_choices(num_shards: int, stored_kv_heads: int) -> list[int]:
    """The replication factors (above 1) Meta's rule allows for `stored_kv_heads` on `num_shards`
    shards, smallest first: r such that stored/r real heads would be stored r times."""
    return [r for r in range(2, stored_kv_heads + 1)
            if stored_kv_heads % r == 0 and kv_replication(num_shards, stored_kv_heads // r) == r]


def stored_kv_replication(num_shards: int, stored_kv_heads: int, copies_equal: Callable[[int], bool]) -> int:
    """How often each kv head is stored: the smallest factor the rule allows whose r consecutive
    stored heads are equal copies (`copies_equal(r)`, read from the data by each caller), else 1.
    The smallest, because real heads that happen to be equal must stay distinct heads."""
    return next((r for r in kv_replication_choices(num_shards, stored_kv_heads) if copies_equal(r)), 1)


def rope_scaling_for(params: Mapping, spec: VariantSpec | None, tied: bool) -> RopeScaling | None:
    """The RoPE scaling a checkpoint computes with. params.json says whether (use_scaled_rope, as
    Meta's reference reads it); the factor is params.json's own when stated, else the release's,
    else Llama 3.2's 32 for a tied model (only 3.2 ties) and Llama 3.1's 8 otherwise."""
    if not params.get("use_scaled_rope"):
        return None
    if params.get("rope_scaling_factor") is not None:
        return RopeScaling(factor=float(params["rope_scaling_factor"]))
    if spec is not None and spec.rope_scaling is not None:
        return spec.rope_scaling
    return LLAMA32_SCALING if tied else LLAMA31_SCALING


def hf_rope_scaling(cfg: Mapping) -> RopeScaling | None:
    """The llama3-type RoPE scaling an HF config.json states (rope_scaling, or transformers 5's rope_parameters)."""
    rs = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if not isinstance(rs, Mapping) or rs.get("rope_type", rs.get("type")) != "llama3":
        return None
    d = RopeScaling(factor=8.0)
    return RopeScaling(float(rs.get("factor", d.factor)), float(rs.get("low_freq_factor", d.low_freq_factor)),
                       float(rs.get("high_freq_factor", d.high_freq_factor)),
                       int(rs.get("original_max_position_embeddings", d.original_max_position_embeddings)))


def hf_rope_theta(cfg: Mapping) -> float:
    """The rope_theta an HF config.json states (4.x top level, or 5.x's rope_parameters), else the default."""
    return float(cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", DEFAULT_ROPE_THETA)))


def releases_for_hf_config(cfg: Mapping, num_shards: int | None = None) -> list[VariantSpec]:
    """Releases whose Meta files convert to this HF config's function (HF -> Meta picks params.json so)."""
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    theta = hf_rope_theta(cfg)
    out = []
    for v in VARIANTS:
        a = v.arch
        if ((a.dim, a.n_layers, a.n_heads, v.real_kv_heads, a.hidden, v.vocab_size, a.rope_theta)
                == (cfg["hidden_size"], cfg["num_hidden_layers"], heads, kv, cfg["intermediate_size"],
                    cfg["vocab_size"], theta)
                and v.rope_scaling == hf_rope_scaling(cfg)
                and (num_shards is None or num_shards == v.num_shards)):
            out.append(v)
    return out


def family_by_traits(*, rope_theta: float, scaling: RopeScaling | None, norm_eps: float, tokenizer: str | None,
                     vocab_size: int) -> str:
    """The family of a model no release matches (a custom shape), from its traits: a tiktoken
    tokenizer, theta 5e5, scaled RoPE or a 100k+ vocab mean Llama 3 (3.1 scaled, 3.2 with factor 32);
    theta 1e6 means Code Llama; eps 1e-6 Llama 1; else Llama 2."""
    llama3 = rope_theta == 500000.0 or scaling is not None
    if tokenizer == "tiktoken" or (tokenizer is None and (llama3 or vocab_size >= 100000)):
        if scaling is None:
            return "llama3"
        return "llama3.2" if scaling.factor == LLAMA32_SCALING.factor else "llama3.1"
    if rope_theta == 1e6:
        return "codellama"
    return "llama1" if norm_eps == 1e-6 else "llama2"


def family_for_hf_config(cfg: Mapping) -> str:
    """The family of an HF Llama config no release matches."""
    theta = hf_rope_theta(cfg)
    return family_by_traits(rope_theta=theta, scaling=hf_rope_scaling(cfg), norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
                            tokenizer=None, vocab_size=int(cfg.get("vocab_size", 0)))



# The release whose official HF files stand for a family's chat metadata (bos/eos ids, generation
# defaults) when a checkpoint is no release's shape (fine-tunes, the tiny test checkpoints), or
# when --instruct/--base asks for a twin that was never released (Llama 3.3 base, Guard 3 base).
_FAMILY_TEMPLATE = {
    ("llama1", False): "llama1-7b", ("llama1", True): "llama1-7b",
    ("llama2", False): "llama2-7b", ("llama2", True): "llama2-7b-chat",
    ("codellama", False): "codellama-7b", ("codellama", True): "codellama-7b",
    ("llama3", False): "llama3-8b", ("llama3", True): "llama3-8b-instruct",
    ("llama3.1", False): "llama3.1-8b", ("llama3.1", True): "llama3.1-8b-instruct",
    ("llama3.2", False): "llama3.2-1b", ("llama3.2", True): "llama3.2-1b-instruct",
    ("llama3.3", False): "llama3.1-70b", ("llama3.3", True): "llama3.3-70b-instruct",
    ("llama-guard-3", False): "llama-guard-3-8b", ("llama-guard-3", True): "llama-guard-3-8b",
}


def metadata_release(spec: VariantSpec | None, family: str, instruct: bool) -> VariantSpec:
    """The release whose official config/generation_config hold a conversion's chat metadata:
    the release itself, its base/instruct twin when --instruct/--base asks for the other one
    (same family, size and layout), else the family's representative. Used by the converter
    (hf_config) and the judge (verify) alike."""
    if spec is not None:
        if spec.instruct == instruct:
            return spec
        twin = next((v for v in VARIANTS if v.family == spec.family and v.size == spec.size
                     and v.num_shards == spec.num_shards and v.instruct == instruct), None)
        if twin is not None:
            return twin
        family = spec.family
    return get(_FAMILY_TEMPLATE[(family, instruct)])
