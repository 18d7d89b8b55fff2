"""Detection: what a Meta checkpoint is, decided from its files alone (no --model_size needed).

Every decision the converter makes is a field of `Variant`, with the evidence for it, so one object
explains a conversion. The steps, each a function below; every fact they apply is decided once in
`llama_parity.releases`:
1. Refuse what cannot be converted faithfully: Meta's FP8 checkpoints (fp8_scales_N.pt, fp8 weights).
2. params.json -> the architecture it implies (after Meta's FFN rounding), validated; the vocab
   (params.json, or the tokenizer when it says -1); tokenizer and params must describe one model.
3. Every tensor's shape on every shard must agree with that architecture and the shard count.
4. The release and the twin: `releases.identify` (the one decision convert, verify, the tokenizer
   check, to-meta and diagnose share): the releases implying the same architecture, narrowed by
   shard count, tying and the folder's name; releases that convert differently and that nothing
   tells apart are refused with the line verify prints too ("pass --variant ID ..."). A shape no
   release has takes the release its folder names when the traits agree, else family defaults.
5. RoPE scaling and tying from the same identification; kv-head replication by the registry's rule,
   confirmed from the data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from llama_parity import releases
from llama_parity.releases import FAMILY_FACTS, Arch, RopeScaling, VariantSpec

from .errors import ConversionError
from .keymap import meta_keys
from .meta_checkpoint import MetaCheckpoint


@dataclass(frozen=True)
class Variant:
    family: str
    label: str
    registry_id: str | None
    instruct: bool
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int  # as stored (params.json)
    hf_num_kv_heads: int  # after de-duplicating replicated kv heads
    intermediate_size: int
    vocab_size: int
    norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int
    num_shards: int
    embedding_shard_dim: int
    kv_replication: int
    tie_word_embeddings: bool
    has_output_weight: bool
    dtype: torch.dtype
    tokenizer_path: Path | None
    tokenizer_kind: str | None
    evidence: tuple[str, ...] = field(default=(), compare=False)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def facts(self):
        return FAMILY_FACTS[self.family]

    def summary_rows(self) -> list[tuple[str, str]]:
        rs = self.rope_scaling
        return [
            ("variant", self.label + (f"  [{self.registry_id}]" if self.registry_id else "")),
            ("family", self.family),
            ("layers / dim / heads / kv heads", f"{self.n_layers} / {self.dim} / {self.n_heads} / {self.hf_num_kv_heads}"
             + (f" (stored {self.n_kv_heads}, x{self.kv_replication} replicated)" if self.kv_replication > 1 else "")),
            ("ffn / vocab", f"{self.intermediate_size} / {self.vocab_size}"),
            ("rope", f"theta {self.rope_theta:g}" + (f", llama3 scaling factor {rs.factor:g}" if rs else ", no scaling")),
            ("context", str(self.max_position_embeddings)),
            ("shards", f"{self.num_shards} (embedding split on dim {self.embedding_shard_dim})"),
            ("tied embeddings", str(self.tie_word_embeddings)),
            ("dtype", str(self.dtype).replace("torch.", "")),
        ]


def tokenizer_n_words(path: Path, kind: str) -> int:
    try:
        return releases.tokenizer_n_words(path, kind)
    except (OSError, RuntimeError, ValueError) as e:
        raise ConversionError(f"{path} is not a readable {kind} tokenizer: {e}") from None


def _is_llama3_params(arch: Arch) -> bool:
    # theta 5e5 (or scaled RoPE) is Llama 3's; no Llama 1/2 or Code Llama release has either
    return arch.rope_theta == 500000.0 or arch.use_scaled_rope


def structural_family(params: dict, tokenizer_kind: str | None, vocab_size: int) -> str:
    """The family a checkpoint of unknown shape belongs to, from traits (not a release match); a
    scaled model counts as 3.1 here (tying, seen later, makes it 3.2)."""
    return releases.family_by_traits(
        rope_theta=float(params.get("rope_theta", releases.DEFAULT_ROPE_THETA)),
        scaling=releases.LLAMA31_SCALING if params.get("use_scaled_rope") else None,
        norm_eps=releases.norm_eps(params), tokenizer=tokenizer_kind, vocab_size=vocab_size)


# --- step 1: what cannot be converted --------------------------------------------------------------

def refuse_quantized(ckpt: MetaCheckpoint) -> None:
    """Meta's FP8 checkpoints (and any non-float weights) would be misread as plain weights."""
    dtypes = {}
    for key in ckpt.keys(0):
        try:
            dtypes[key] = ckpt.info(key).dtype
        except AttributeError:
            raise ConversionError(f"{key!r} in {ckpt.shard_paths[0].name} is not a tensor: not a Meta "
                                  "checkpoint shard") from None
    fp8 = next((f"{k} is {str(d).replace('torch.', '')} in {ckpt.shard_paths[0].name}"
                for k, d in dtypes.items() if d in releases.FP8_DTYPES), None)
    problem = releases.fp8_refusal(ckpt.dir, fp8)
    if problem:
        raise ConversionError(problem)
    for key, dtype in dtypes.items():
        if not dtype.is_floating_point:
            raise ConversionError(f"{key} in {ckpt.shard_paths[0].name} is {str(dtype).replace('torch.', '')}, not "
                                  "floating point: a quantized checkpoint; convert Meta's bf16 release instead")


# --- step 2: params.json and the tokenizer ----------------------------------------------------------

def read_arch(ckpt: MetaCheckpoint) -> Arch:
    try:
        return releases.implied_arch(ckpt.params)
    except releases.ParamsError as e:
        raise ConversionError(f"{ckpt.params_path} does not describe a Llama model: {e}") from None


def resolve_vocab(ckpt: MetaCheckpoint, arch: Arch, ev: list[str]) -> int:
    """The model's vocab size; the tokenizer (when present) must be the model's own."""
    kind = ckpt.tokenizer_kind
    tok_words = tokenizer_n_words(ckpt.tokenizer_path, kind) if ckpt.tokenizer_path else None
    vocab = arch.vocab_size
    if vocab is None:
        if tok_words is None:
            raise ConversionError(f"params.json says vocab_size -1 (take it from the tokenizer) but no "
                                  f"tokenizer.model is in {ckpt.dir} or its parent")
        vocab = tok_words
        ev.append(f"vocab_size {vocab} from tokenizer.model (params.json says -1)")
    llama3 = _is_llama3_params(arch)
    if kind is not None and (kind == "tiktoken") != llama3:
        raise ConversionError(
            f"{ckpt.tokenizer_path} is a {kind} tokenizer but params.json describes a "
            f"{'Llama 3.x' if llama3 else 'Llama 1/2 or Code Llama'} model: the tokenizer belongs to another model")
    if tok_words is not None and tok_words != vocab:
        raise ConversionError(f"{ckpt.tokenizer_path} defines {tok_words} tokens but params.json says vocab_size "
                              f"{vocab}: the tokenizer belongs to another model")
    return vocab


# --- step 3: the tensors agree with params.json ----------------------------------------------------

def expected_shard_shapes(arch: Arch, vocab: int, n: int, embedding_dim: int) -> dict[str, tuple[int, ...]]:
    """Per-shard shape of every weight Meta's model-parallel layers hold (rules in keymap.py)."""
    hd, dim = arch.head_dim, arch.dim
    full = {"tok_embeddings.weight": (vocab, dim), "norm.weight": (dim,), "output.weight": (vocab, dim)}
    per_layer = {"attention_norm.weight": (dim,), "ffn_norm.weight": (dim,),
                 "attention.wq.weight": (arch.n_heads * hd, dim), "attention.wk.weight": (arch.n_kv_heads * hd, dim),
                 "attention.wv.weight": (arch.n_kv_heads * hd, dim), "attention.wo.weight": (dim, arch.n_heads * hd),
                 "feed_forward.w1.weight": (arch.hidden, dim), "feed_forward.w2.weight": (dim, arch.hidden),
                 "feed_forward.w3.weight": (arch.hidden, dim)}
    out = {}
    for rule, key, _hf in meta_keys(arch.n_layers, with_output=True):
        shape = list(full.get(key) or per_layer[key.split(".", 2)[2]])
        split = embedding_dim if rule.split == "embedding" else rule.split
        if split is not None:
            shape[split] //= n
        out[key] = tuple(shape)
    return out


def check_shapes(ckpt: MetaCheckpoint, arch: Arch, vocab: int, family: str) -> None:
    n = ckpt.num_shards
    emb_dim = FAMILY_FACTS[family].embedding_shard_dim
    for what, count in (("heads", arch.n_heads), ("kv heads", arch.n_kv_heads), ("feed-forward rows", arch.hidden),
                        ("vocab rows" if emb_dim == 0 else "hidden columns", vocab if emb_dim == 0 else arch.dim)):
        if count % n:
            raise ConversionError(f"{n} shards cannot split {count} {what}: params.json (dim {arch.dim}, heads "
                                  f"{arch.n_heads}, kv heads {arch.n_kv_heads}) does not fit {n} consolidated.NN.pth files")
    if ckpt.has("output.weight") and vocab % n:
        raise ConversionError(f"{n} shards cannot split the {vocab}-row output matrix")
    want = expected_shard_shapes(arch, vocab, n, emb_dim)
    for s in range(n):
        for key, shape in want.items():
            if key == "output.weight" and not ckpt.has(key):
                continue
            got = ckpt.info(key, s).shape
            if got != shape:
                raise ConversionError(
                    f"{key} in {ckpt.shard_paths[s].name} has shape {list(got)}, but params.json (dim {arch.dim}, "
                    f"{arch.n_heads} heads, {arch.n_kv_heads} kv heads, ffn {arch.hidden}, vocab {vocab}) with {n} "
                    f"shard(s) of a {FAMILY_FACTS[family].label} checkpoint means {list(shape)}: a shard is missing, "
                    "params.json belongs to another model, or vocab_size disagrees with the tokenizer")


def _output_tied(ckpt: MetaCheckpoint) -> tuple[bool, bool]:
    """(has output.weight, output equals the embedding bit for bit)."""
    if not ckpt.has("output.weight"):
        return False, True
    emb, out = ckpt.info("tok_embeddings.weight"), ckpt.info("output.weight")
    if emb.shape != out.shape or emb.dtype != out.dtype:
        return True, False
    # Compared in chunks read from the files, not through the memory map (which would leave both
    # whole matrices resident). Bit equality: a fine-tuned untied output must never be tied.
    return True, all(ckpt.tensors_equal("tok_embeddings.weight", "output.weight", s) for s in range(ckpt.num_shards))


def _kv_replication(ckpt: MetaCheckpoint, n_kv_heads: int, head_dim: int) -> int:
    """How many times each kv head is stored (releases.stored_kv_replication, Meta's rule), confirmed
    from layer 0's data here."""
    n = ckpt.num_shards
    if not releases.kv_replication_choices(n, n_kv_heads):
        return 1
    wk = torch.cat([ckpt.tensor("layers.0.attention.wk.weight", s) for s in range(n)], 0)
    wv = torch.cat([ckpt.tensor("layers.0.attention.wv.weight", s) for s in range(n)], 0)

    def copies_equal(r: int) -> bool:
        return all(torch.equal(g, g[:, :1].expand_as(g)) for g in (w.view(n_kv_heads // r, r, head_dim, -1) for w in (wk, wv)))
    return releases.stored_kv_replication(n, n_kv_heads, copies_equal)


# --- step 4: which release ---------------------------------------------------------------------------

def identify_release(ckpt: MetaCheckpoint, vocab: int, tied: bool, variant_id: str | None,
                     instruct: bool | None) -> releases.Identification:
    """releases.identify on what these files say; an ambiguity is the same one line verify prints."""
    try:
        return releases.identify(ckpt.params, folder_name=ckpt.dir.resolve().name, num_shards=ckpt.num_shards,
                                 tied=tied, variant_id=variant_id, instruct=instruct, vocab_size=vocab,
                                 tokenizer_kind=ckpt.tokenizer_kind).require()
    except releases.IdentifyError as e:
        raise ConversionError(str(e)) from None


def _note_deviations(spec: VariantSpec | None, params: dict, tied: bool, ev: list[str]) -> None:
    """Values this file holds that differ from the release's params.json: the file wins."""
    if spec is None:
        return
    if releases.norm_eps(params) != releases.norm_eps(spec.params):
        ev.append(f"norm_eps {releases.norm_eps(params):g} in params.json, {releases.norm_eps(spec.params):g} in "
                  f"{spec.id}'s registry entry: the file's value is used")
    if bool(params.get("use_scaled_rope")) != bool(spec.params.get("use_scaled_rope")):
        ev.append(f"use_scaled_rope {bool(params.get('use_scaled_rope'))} in params.json, unlike {spec.id}'s; "
                  "the file decides")
    if spec.tie_word_embeddings and not tied:
        ev.append(f"{spec.id} is released with tied embeddings but this output.weight differs: kept untied")


# --- all steps ---------------------------------------------------------------------------------------

def detect(ckpt: MetaCheckpoint, *, variant_id: str | None = None, instruct: bool | None = None) -> Variant:
    p = ckpt.params
    ev: list[str] = []
    if ckpt.tokenizer_path is None:
        ev.append("no tokenizer.model found next to the shards or in the parent folder")
    refuse_quantized(ckpt)
    arch = read_arch(ckpt)
    vocab = resolve_vocab(ckpt, arch, ev)
    kind = ckpt.tokenizer_kind
    check_shapes(ckpt, arch, vocab, structural_family(p, kind, vocab))
    has_output, tied = _output_tied(ckpt)
    if not has_output:
        ev.append("no output.weight: the output matrix is the embedding (tied)")
    elif tied:
        ev.append("output.weight equals tok_embeddings.weight bit for bit: tied embeddings")
    ident = identify_release(ckpt, vocab, tied, variant_id, instruct)
    ev += ident.evidence
    spec, fam, scaling = ident.release, ident.family, ident.rope_scaling
    _note_deviations(spec, p, tied, ev)
    rep = _kv_replication(ckpt, arch.n_kv_heads, arch.head_dim)
    if rep > 1:
        ev.append(f"each kv head is stored {rep} times across the {ckpt.num_shards} shards (shards > real kv heads): "
                  "de-duplicated")
    ev.append(f"{'instruct' if ident.instruct else 'base'} metadata: {ident.twin_reason}")
    facts = FAMILY_FACTS[fam]
    label = ident.label if spec else f"{facts.label} (custom shape: {arch.n_layers} layers, dim {arch.dim})"
    return Variant(
        family=fam, label=label, registry_id=spec.id if spec else None, instruct=ident.instruct,
        dim=arch.dim, n_layers=arch.n_layers, n_heads=arch.n_heads, n_kv_heads=arch.n_kv_heads,
        hf_num_kv_heads=arch.n_kv_heads // rep, intermediate_size=arch.hidden, vocab_size=vocab,
        norm_eps=releases.norm_eps(p), rope_theta=arch.rope_theta, rope_scaling=scaling,
        max_position_embeddings=facts.max_position_embeddings, num_shards=ckpt.num_shards,
        embedding_shard_dim=facts.embedding_shard_dim, kv_replication=rep, tie_word_embeddings=tied,
        has_output_weight=has_output, dtype=ckpt.info("tok_embeddings.weight").dtype,
        tokenizer_path=ckpt.tokenizer_path, tokenizer_kind=kind, evidence=tuple(ev))
