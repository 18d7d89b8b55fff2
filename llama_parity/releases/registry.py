"""The table of released Llama checkpoints: real `params.json` values, shard layouts, download
folder names and per-release facts.

Sources: the params.json files Meta ships with each download (mirrored in Meta's llama-models
`sku_list.py` for Llama 3.x; Llama 1/2 and Code Llama from their original repos), Meta's download
CLI for folder names (`llama model download` names a folder after the model descriptor with ":"
replaced by "-"), and the official Hugging Face repos for the HF-side facts
(`official/<id>/config.json` beside this file, recorded with their sources in official/SOURCES.md).
The rules that read this table live in `rules.py`; docs/facts.md lists the deliberate copies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from .params import Arch, implied_arch


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1-style frequency scaling ("llama3" rope type in transformers)."""

    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


LLAMA31_SCALING = RopeScaling(factor=8.0)
# Llama 3.2 1B/3B (and Llama Guard 3 1B, a 3.2 model) were trained with factor 32. Meta's
# llama-models reference hard-codes 8 (upstream issues #166, #241); the difference only shows at
# long relative distances, which is why the parity suite tests far positions.
LLAMA32_SCALING = RopeScaling(factor=32.0)

# Families: how a checkpoint's files and HF metadata differ, independent of size.
FAMILIES = ("llama1", "llama2", "codellama", "llama3", "llama3.1", "llama3.2", "llama3.3", "llama-guard-3")


@dataclass(frozen=True)
class FamilyFacts:
    label: str
    tokenizer: str  # "sentencepiece" | "tiktoken"
    # Llama 1/2 and Code Llama used fairscale's ParallelEmbedding, which splits the embedding
    # matrix along the hidden dim (dim 1); Llama 3 switched to VocabParallelEmbedding (dim 0),
    # since a 128k vocab is the larger axis and vocab-parallel also suits the tied 3.2 models.
    embedding_shard_dim: int
    max_position_embeddings: int
    has_rope_freqs_key: bool  # Llama 1/2 files carry a (replicated) `rope.freqs` buffer
    instruct_label: str = "Instruct"  # what Meta calls the fine-tuned models: Llama 2's are "Chat"


FAMILY_FACTS: Mapping[str, FamilyFacts] = {
    "llama1": FamilyFacts("Llama 1", "sentencepiece", 1, 2048, True),
    "llama2": FamilyFacts("Llama 2", "sentencepiece", 1, 4096, True, instruct_label="Chat"),
    "codellama": FamilyFacts("Code Llama", "sentencepiece", 1, 16384, False),
    "llama3": FamilyFacts("Llama 3", "tiktoken", 0, 8192, False),
    "llama3.1": FamilyFacts("Llama 3.1", "tiktoken", 0, 131072, False),
    "llama3.2": FamilyFacts("Llama 3.2", "tiktoken", 0, 131072, False),
    "llama3.3": FamilyFacts("Llama 3.3", "tiktoken", 0, 131072, False),
    "llama-guard-3": FamilyFacts("Llama Guard 3", "tiktoken", 0, 131072, False),
}


@dataclass(frozen=True)
class VariantSpec:
    """One released checkpoint: what Meta ships and what the official HF repo holds."""

    id: str
    family: str
    size: str
    params: Mapping[str, object] = field(compare=False)  # params.json exactly as Meta ships it
    num_shards: int
    instruct: bool
    vocab_size: int  # the model's real vocab (params.json, or the tokenizer when params says -1)
    tie_word_embeddings: bool
    rope_scaling: RopeScaling | None
    hf_repo: str
    # Meta's download folder name (evidence for detection): `llama model download` names it after
    # the model descriptor with ":" as "-" (e.g. Llama3.1-405B-bf16-mp8); `aliases` are the other
    # real spellings (Meta's server folders, older download.sh names, HF repo names).
    meta_dir_name: str
    # Real number of kv heads; differs from params["n_kv_heads"] only for the 405B MP16 layout,
    # whose params say 16 because each of the 8 kv heads is replicated on two shards.
    hf_num_kv_heads: int | None = None
    aliases: tuple[str, ...] = ()
    guard_categories: int | None = None  # Llama Guard 3: hazard categories it was trained on

    @property
    def facts(self) -> FamilyFacts:
        return FAMILY_FACTS[self.family]

    @property
    def real_kv_heads(self) -> int:
        return self.hf_num_kv_heads or int(self.params.get("n_kv_heads") or self.params["n_heads"])

    @property
    def arch(self) -> Arch:
        return implied_arch(self.params)

    @property
    def folder_names(self) -> tuple[str, ...]:
        return (self.meta_dir_name,) + self.aliases


def _params(**kw) -> dict:
    return kw


# --- params.json as Meta ships them -----------------------------------------------------------
_L1 = dict(multiple_of=256, norm_eps=1e-06, vocab_size=-1)
_L2 = dict(multiple_of=256, norm_eps=1e-05, vocab_size=-1)
_CL = dict(multiple_of=256, ffn_dim_multiplier=1.0, norm_eps=1e-5, rope_theta=1000000)
_L3 = dict(vocab_size=128256, norm_eps=1e-05, rope_theta=500000.0)

_PARAMS = {
    "llama1-7b": _params(dim=4096, n_heads=32, n_layers=32, **_L1),
    "llama1-13b": _params(dim=5120, n_heads=40, n_layers=40, **_L1),
    "llama1-33b": _params(dim=6656, n_heads=52, n_layers=60, **_L1),
    # 65B's params.json says norm_eps 1e-05, unlike the smaller Llama 1 models
    "llama1-65b": _params(dim=8192, n_heads=64, n_layers=80, multiple_of=256, norm_eps=1e-05, vocab_size=-1),
    "llama2-7b": _params(dim=4096, n_heads=32, n_layers=32, **_L2),
    "llama2-13b": _params(dim=5120, n_heads=40, n_layers=40, **_L2),
    "llama2-70b": _params(dim=8192, multiple_of=4096, ffn_dim_multiplier=1.3, n_heads=64, n_kv_heads=8,
                     n_layers=80, norm_eps=1e-05, vocab_size=-1),
    "codellama-7b": _params(dim=4096, n_layers=32, n_heads=32, **_CL),
    "codellama-13b": _params(dim=5120, n_layers=40, n_heads=40, **_CL),
    "codellama-34b": _params(dim=8192, n_layers=48, n_heads=64, n_kv_heads=8, **_CL),
    "codellama-70b": _params(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096,
                        ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=1000000),
    "llama3-8b": _params(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, multiple_of=1024,
                    ffn_dim_multiplier=1.3, **_L3),
    "llama3-70b": _params(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096,
                     ffn_dim_multiplier=1.3, **_L3),
    "llama3.1-8b": _params(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, multiple_of=1024,
                      ffn_dim_multiplier=1.3, use_scaled_rope=True, **_L3),
    "llama3.1-70b": _params(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096,
                       ffn_dim_multiplier=1.3, use_scaled_rope=True, **_L3),
    "llama3.1-405b": _params(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, multiple_of=4096,
                        ffn_dim_multiplier=1.2, use_scaled_rope=True, **_L3),
    "llama3.1-405b-mp16": _params(dim=16384, n_layers=126, n_heads=128, n_kv_heads=16, multiple_of=4096,
                             ffn_dim_multiplier=1.2, use_scaled_rope=True, **_L3),
    # Llama Guard 3 8B: the 3.1 8B architecture, but its params.json says use_scaled_rope false
    # (Meta's llama-models sku_list), so Meta's reference runs it without RoPE scaling.
    "llama-guard-3-8b": _params(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, multiple_of=1024,
                           ffn_dim_multiplier=1.3, use_scaled_rope=False, **_L3),
    "llama3.2-1b": _params(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, multiple_of=256,
                      ffn_dim_multiplier=1.5, use_scaled_rope=True, **_L3),
    "llama3.2-3b": _params(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, multiple_of=256,
                      ffn_dim_multiplier=1.0, use_scaled_rope=True, **_L3),
}


def _release(id, family, size, params_id, shards, *, instruct=False, vocab, tie=False, scaling=None,
             repo, meta_dir, hf_kv=None, aliases=(), guard=None) -> VariantSpec:
    # Every release is also known by its HF repo's name (people download there, then rename).
    aliases = tuple(aliases) + (repo.split("/")[-1],)
    return VariantSpec(id=id, family=family, size=size, params=_PARAMS[params_id], num_shards=shards,
                       instruct=instruct, vocab_size=vocab, tie_word_embeddings=tie, rope_scaling=scaling,
                       hf_repo=repo, meta_dir_name=meta_dir, hf_num_kv_heads=hf_kv, aliases=aliases,
                       guard_categories=guard)


LLAMA3_VOCAB = 128256  # Meta's Llama 3 tokenizer: 128000 BPE ranks + 256 special tokens
VARIANTS: tuple[VariantSpec, ...] = (
    # Llama 1: no official HF repo from Meta; huggyllama's conversions are the de-facto reference.
    _release("llama1-7b", "llama1", "7B", "llama1-7b", 1, vocab=32000, repo="huggyllama/llama-7b", meta_dir="7B", aliases=("LLaMA-7B",)),
    _release("llama1-13b", "llama1", "13B", "llama1-13b", 2, vocab=32000, repo="huggyllama/llama-13b", meta_dir="13B"),
    _release("llama1-33b", "llama1", "33B", "llama1-33b", 4, vocab=32000, repo="huggyllama/llama-30b", meta_dir="30B", aliases=("llama-33b",)),
    _release("llama1-65b", "llama1", "65B", "llama1-65b", 8, vocab=32000, repo="huggyllama/llama-65b", meta_dir="65B"),
    _release("llama2-7b", "llama2", "7B", "llama2-7b", 1, vocab=32000, repo="meta-llama/Llama-2-7b-hf", meta_dir="llama-2-7b"),
    _release("llama2-13b", "llama2", "13B", "llama2-13b", 2, vocab=32000, repo="meta-llama/Llama-2-13b-hf", meta_dir="llama-2-13b"),
    _release("llama2-70b", "llama2", "70B", "llama2-70b", 8, vocab=32000, repo="meta-llama/Llama-2-70b-hf", meta_dir="llama-2-70b"),
    _release("llama2-7b-chat", "llama2", "7B", "llama2-7b", 1, instruct=True, vocab=32000,
       repo="meta-llama/Llama-2-7b-chat-hf", meta_dir="llama-2-7b-chat"),
    _release("llama2-13b-chat", "llama2", "13B", "llama2-13b", 2, instruct=True, vocab=32000,
       repo="meta-llama/Llama-2-13b-chat-hf", meta_dir="llama-2-13b-chat"),
    _release("llama2-70b-chat", "llama2", "70B", "llama2-70b", 8, instruct=True, vocab=32000,
       repo="meta-llama/Llama-2-70b-chat-hf", meta_dir="llama-2-70b-chat"),
    # Code Llama: rope_theta 1e6; 7B/13B/70B add 16 tokens (infilling) to the 32000 vocab, 34B does not.
    _release("codellama-7b", "codellama", "7B", "codellama-7b", 1, vocab=32016, repo="codellama/CodeLlama-7b-hf", meta_dir="CodeLlama-7b"),
    _release("codellama-13b", "codellama", "13B", "codellama-13b", 2, vocab=32016, repo="codellama/CodeLlama-13b-hf", meta_dir="CodeLlama-13b"),
    _release("codellama-34b", "codellama", "34B", "codellama-34b", 4, vocab=32000, repo="codellama/CodeLlama-34b-hf", meta_dir="CodeLlama-34b"),
    _release("codellama-70b", "codellama", "70B", "codellama-70b", 8, vocab=32016, repo="codellama/CodeLlama-70b-hf", meta_dir="CodeLlama-70b"),
    _release("llama3-8b", "llama3", "8B", "llama3-8b", 1, vocab=LLAMA3_VOCAB, repo="meta-llama/Meta-Llama-3-8B", meta_dir="Meta-Llama-3-8B"),
    _release("llama3-8b-instruct", "llama3", "8B", "llama3-8b", 1, instruct=True, vocab=LLAMA3_VOCAB,
       repo="meta-llama/Meta-Llama-3-8B-Instruct", meta_dir="Meta-Llama-3-8B-Instruct"),
    _release("llama3-70b", "llama3", "70B", "llama3-70b", 8, vocab=LLAMA3_VOCAB, repo="meta-llama/Meta-Llama-3-70B", meta_dir="Meta-Llama-3-70B"),
    _release("llama3-70b-instruct", "llama3", "70B", "llama3-70b", 8, instruct=True, vocab=LLAMA3_VOCAB,
       repo="meta-llama/Meta-Llama-3-70B-Instruct", meta_dir="Meta-Llama-3-70B-Instruct"),
    _release("llama3.1-8b", "llama3.1", "8B", "llama3.1-8b", 1, vocab=LLAMA3_VOCAB, scaling=LLAMA31_SCALING,
       repo="meta-llama/Llama-3.1-8B", meta_dir="Llama3.1-8B"),
    _release("llama3.1-8b-instruct", "llama3.1", "8B", "llama3.1-8b", 1, instruct=True, vocab=LLAMA3_VOCAB, scaling=LLAMA31_SCALING,
       repo="meta-llama/Llama-3.1-8B-Instruct", meta_dir="Llama3.1-8B-Instruct"),
    _release("llama3.1-70b", "llama3.1", "70B", "llama3.1-70b", 8, vocab=LLAMA3_VOCAB, scaling=LLAMA31_SCALING,
       repo="meta-llama/Llama-3.1-70B", meta_dir="Llama3.1-70B"),
    _release("llama3.1-70b-instruct", "llama3.1", "70B", "llama3.1-70b", 8, instruct=True, vocab=LLAMA3_VOCAB, scaling=LLAMA31_SCALING,
       repo="meta-llama/Llama-3.1-70B-Instruct", meta_dir="Llama3.1-70B-Instruct"),
    # 405B: `llama model download` writes the bf16 checkpoints to Llama3.1-405B-bf16-mp8 / -mp16
    # (Meta's server: Llama-3.1-405B-MP8 / -MP16); plain "Llama3.1-405B" is the FP8 checkpoint
    # (fp8_scales_N.pt beside the shards), which detection refuses.
    _release("llama3.1-405b", "llama3.1", "405B", "llama3.1-405b", 8, vocab=LLAMA3_VOCAB, scaling=LLAMA31_SCALING,
       repo="meta-llama/Llama-3.1-405B", meta_dir="Llama3.1-405B-bf16-mp8", aliases=("Llama-3.1-405B-MP8",)),
    _release("llama3.1-405b-instruct", "llama3.1", "405B", "llama3.1-405b", 8, instruct=True, vocab=LLAMA3_VOCAB, scaling=LLAMA31_SCALING,
       repo="meta-llama/Llama-3.1-405B-Instruct", meta_dir="Llama3.1-405B-Instruct-bf16-mp8",
       aliases=("Llama-3.1-405B-Instruct-MP8",)),
    # The MP16 layout: params say n_kv_heads 16 because each shard must own one kv head, so each
    # of the 8 real kv heads is stored twice (on shards 2i and 2i+1).
    _release("llama3.1-405b-mp16", "llama3.1", "405B", "llama3.1-405b-mp16", 16, vocab=LLAMA3_VOCAB, scaling=LLAMA31_SCALING,
       repo="meta-llama/Llama-3.1-405B", meta_dir="Llama3.1-405B-bf16-mp16", hf_kv=8,
       aliases=("Llama-3.1-405B-MP16", "Llama3.1-405B-MP16")),
    _release("llama3.1-405b-instruct-mp16", "llama3.1", "405B", "llama3.1-405b-mp16", 16, instruct=True, vocab=LLAMA3_VOCAB,
       scaling=LLAMA31_SCALING, repo="meta-llama/Llama-3.1-405B-Instruct", meta_dir="Llama3.1-405B-Instruct-bf16-mp16",
       hf_kv=8, aliases=("Llama-3.1-405B-Instruct-MP16", "Llama3.1-405B-Instruct-MP16")),
    _release("llama3.2-1b", "llama3.2", "1B", "llama3.2-1b", 1, vocab=LLAMA3_VOCAB, tie=True, scaling=LLAMA32_SCALING,
       repo="meta-llama/Llama-3.2-1B", meta_dir="Llama3.2-1B"),
    _release("llama3.2-1b-instruct", "llama3.2", "1B", "llama3.2-1b", 1, instruct=True, vocab=LLAMA3_VOCAB, tie=True,
       scaling=LLAMA32_SCALING, repo="meta-llama/Llama-3.2-1B-Instruct", meta_dir="Llama3.2-1B-Instruct"),
    _release("llama3.2-3b", "llama3.2", "3B", "llama3.2-3b", 1, vocab=LLAMA3_VOCAB, tie=True, scaling=LLAMA32_SCALING,
       repo="meta-llama/Llama-3.2-3B", meta_dir="Llama3.2-3B"),
    _release("llama3.2-3b-instruct", "llama3.2", "3B", "llama3.2-3b", 1, instruct=True, vocab=LLAMA3_VOCAB, tie=True,
       scaling=LLAMA32_SCALING, repo="meta-llama/Llama-3.2-3B-Instruct", meta_dir="Llama3.2-3B-Instruct"),
    # Llama 3.3 70B has exactly the 3.1 70B architecture and params.json; only the folder name
    # (and the weights) tell them apart. Their HF configs are identical, so a mix-up is harmless.
    _release("llama3.3-70b-instruct", "llama3.3", "70B", "llama3.1-70b", 8, instruct=True, vocab=LLAMA3_VOCAB, scaling=LLAMA31_SCALING,
       repo="meta-llama/Llama-3.3-70B-Instruct", meta_dir="Llama3.3-70B-Instruct"),
    # Llama Guard 3 1B: the 3.2 1B architecture (factor 32) with an untied output matrix, 13
    # hazard categories (no S14 Code Interpreter Abuse).
    _release("llama-guard-3-1b", "llama-guard-3", "1B", "llama3.2-1b", 1, instruct=True, vocab=LLAMA3_VOCAB, tie=False,
       scaling=LLAMA32_SCALING, repo="meta-llama/Llama-Guard-3-1B", meta_dir="Llama-Guard-3-1B", guard=13),
    # Llama Guard 3 8B: 14 categories (adds S14 Code Interpreter Abuse); params.json says
    # use_scaled_rope false, so no scaling (see README "Known deviations").
    _release("llama-guard-3-8b", "llama-guard-3", "8B", "llama-guard-3-8b", 1, instruct=True, vocab=LLAMA3_VOCAB,
       repo="meta-llama/Llama-Guard-3-8B", meta_dir="Llama-Guard-3-8B", guard=14),
)

BY_ID: Mapping[str, VariantSpec] = {v.id: v for v in VARIANTS}


def get(variant_id: str) -> VariantSpec:
    try:
        return BY_ID[variant_id]
    except KeyError:
        raise KeyError(f"unknown variant {variant_id!r}; known: {', '.join(BY_ID)}") from None


# Llama Guard 3's hazard categories: the 8B (a Llama 3.1 model) was trained on S1-S14, the 1B (a 3.2
# model) on S1-S13, without Code Interpreter Abuse (Meta's model cards; llama-stack's
# MODEL_TO_SAFETY_CATEGORIES_MAP). The converter's template and verify's expectation both read this.
GUARD3_CATEGORY_COUNTS: Mapping[str, int] = {v.id: v.guard_categories for v in VARIANTS if v.guard_categories}


def guard_categories(variant_id: str | None) -> int | None:
    """Number of Llama Guard 3 hazard categories of a release (None: not a Guard 3 release)."""
    return GUARD3_CATEGORY_COUNTS.get(variant_id or "")


def architecture_variants() -> tuple[VariantSpec, ...]:
    """One variant per distinct (architecture, layout, family) — what the tiny parity suite covers.

    Base/instruct twins share weights' structure; they differ in metadata (eos ids, chat template),
    which the config and tokenizer tests cover separately.
    """
    seen, out = set(), []
    for v in VARIANTS:
        key = (v.family, v.arch, v.num_shards, v.tie_word_embeddings)
        if key not in seen:
            seen.add(key)
            out.append(v)
    return tuple(out)
