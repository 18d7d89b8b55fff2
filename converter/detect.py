"""Detection: what a Meta checkpoint is, decided from its files alone (no --model_size needed).

Every decision the converter makes is a field of `Variant`, with the evidence for it, so one object
explains a conversion. The rules, in order:
1. params.json + tokenizer kind give the family by structural traits (tiktoken -> Llama 3.x;
   use_scaled_rope -> 3.1+; rope_theta 1e6 -> Code Llama; norm_eps 1e-6 -> Llama 1; else Llama 2).
2. An exact params.json match against the registry (fixtures/variants.py) names the release;
   the shard count, whether output.weight equals the embedding, and the folder name break ties
   (3.2 1B vs Llama Guard 3 1B, base vs instruct, 3.1 70B vs 3.3 70B).
3. A shape the registry does not know (a fine-tune with a custom shape, our tiny test
   checkpoints) takes the release named by its folder when that agrees with the traits, else the
   family's defaults, and says so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llama_parity.fixtures import variants as registry
from llama_parity.fixtures.variants import FAMILY_FACTS, RopeScaling, VariantSpec

from .errors import ConversionError
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


def _norm_name(s: str) -> str:
    s = s.lower().replace("meta-llama", "llama").replace("meta_llama", "llama")
    if s.startswith("meta"):
        s = s[4:]
    return re.sub(r"[^a-z0-9.]", "", s)


def variant_named_by_folder(directory: Path) -> VariantSpec | None:
    """The release whose Meta download folder name appears in this folder's name (longest wins)."""
    name = _norm_name(directory.resolve().name)
    best = None
    for v in registry.VARIANTS:
        key = _norm_name(v.meta_dir_name)
        # a bare size folder ("7B") as Llama 1 shipped is only evidence when it is the whole name
        if (key == name) if len(key) <= 3 else (key in name):
            if best is None or len(key) > len(_norm_name(best.meta_dir_name)):
                best = v
    return best


def _instruct_hint(directory: Path) -> bool | None:
    name = directory.resolve().name.lower()
    if re.search(r"instruct|chat", name):
        return True
    return None


def tokenizer_n_words(path: Path, kind: str) -> int:
    if kind == "sentencepiece":
        import sentencepiece

        try:
            return sentencepiece.SentencePieceProcessor(model_file=str(path)).vocab_size()
        except Exception as e:
            raise ConversionError(f"{path} is not a readable sentencepiece model: {e}") from None
    n = sum(1 for line in path.open("rb") if line.strip())
    return n + 256  # Meta's Llama 3 tokenizer appends 256 special tokens after the ranks


def structural_family(params: dict, tokenizer_kind: str | None, vocab_size: int) -> str:
    # Without a tokenizer, Llama 3's params give it away: theta 5e5 (or scaled RoPE), explicit vocab.
    llama3_params = float(params.get("rope_theta", 10000.0)) == 500000.0 or bool(params.get("use_scaled_rope"))
    if tokenizer_kind == "tiktoken" or (tokenizer_kind is None and (llama3_params or vocab_size >= 100000)):
        return "llama3.1" if params.get("use_scaled_rope") else "llama3"
    if float(params.get("rope_theta", 10000.0)) == 1e6:
        return "codellama"
    if float(params.get("norm_eps", 1e-5)) == 1e-6:
        return "llama1"
    return "llama2"


def _traits_agree(spec: VariantSpec, params: dict, tokenizer_kind: str | None) -> bool:
    """Can this checkpoint be `spec` with another shape? Same tokenizer kind and same RoPE."""
    p = spec.params
    return ((tokenizer_kind is None or FAMILY_FACTS[spec.family].tokenizer == tokenizer_kind)
            and bool(p.get("use_scaled_rope")) == bool(params.get("use_scaled_rope"))
            and float(p.get("rope_theta", 10000.0)) == float(params.get("rope_theta", 10000.0)))


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
    """How many times each kv head is stored. Meta replicates when shards outnumber kv heads; the
    params then state the stored count. Found from the data: the smallest r (>1) for which
    layer 0's kv heads come in r identical consecutive copies across the merged shards."""
    # Meta replicates only so that each shard owns exactly one kv head.
    if ckpt.num_shards < 2 or n_kv_heads != ckpt.num_shards:
        return 1
    wk = torch.cat([ckpt.tensor("layers.0.attention.wk.weight", s) for s in range(ckpt.num_shards)], 0)
    wv = torch.cat([ckpt.tensor("layers.0.attention.wv.weight", s) for s in range(ckpt.num_shards)], 0)
    for r in range(2, n_kv_heads + 1):
        if n_kv_heads % r:
            continue
        ok = True
        for w in (wk, wv):
            g = w.view(n_kv_heads // r, r, head_dim, -1)
            if not torch.equal(g, g[:, :1].expand_as(g)):
                ok = False
                break
        if ok:
            return r
    return 1


def detect(ckpt: MetaCheckpoint, *, variant_id: str | None = None, instruct: bool | None = None) -> Variant:
    p = ckpt.params
    ev: list[str] = []
    kind = ckpt.tokenizer_kind
    if ckpt.tokenizer_path is None:
        ev.append("no tokenizer.model found next to the shards or in the parent folder")
    dim, n_layers, n_heads = int(p["dim"]), int(p["n_layers"]), int(p["n_heads"])
    n_kv = int(p.get("n_kv_heads") or n_heads)
    if dim % n_heads or n_heads % n_kv:
        raise ConversionError(f"params.json is inconsistent: dim {dim}, n_heads {n_heads}, n_kv_heads {n_kv}")
    vocab = int(p.get("vocab_size", -1))
    tok_words = tokenizer_n_words(ckpt.tokenizer_path, kind) if ckpt.tokenizer_path else None
    if vocab == -1:
        if tok_words is None:
            raise ConversionError(f"params.json says vocab_size -1 (take it from the tokenizer) but no "
                                  f"tokenizer.model is in {ckpt.dir} or its parent")
        vocab = tok_words
        ev.append(f"vocab_size {vocab} from tokenizer.model (params.json says -1)")
    llama3_params = float(p.get("rope_theta", 10000.0)) == 500000.0 or bool(p.get("use_scaled_rope"))
    if kind is not None and (kind == "tiktoken") != llama3_params:
        raise ConversionError(
            f"{ckpt.tokenizer_path} is a {kind} tokenizer but params.json describes a "
            f"{'Llama 3.x' if llama3_params else 'Llama 1/2 or Code Llama'} model: the tokenizer belongs to another model")
    if tok_words is not None and tok_words != vocab:
        raise ConversionError(f"{ckpt.tokenizer_path} defines {tok_words} tokens but params.json says vocab_size "
                              f"{vocab}: the tokenizer belongs to another model")
    emb = ckpt.info("tok_embeddings.weight")
    n = ckpt.num_shards

    # Shapes must agree with params and the shard count before anything is trusted.
    fam = structural_family(p, kind, vocab)
    emb_dim_guess = FAMILY_FACTS[fam].embedding_shard_dim
    want = (vocab // n, dim) if emb_dim_guess == 0 else (vocab, dim // n)
    if emb.shape != want:
        raise ConversionError(
            f"tok_embeddings.weight in {ckpt.shard_paths[0].name} has shape {list(emb.shape)}, but params.json "
            f"(dim {dim}, vocab {vocab}) with {n} shard(s) of a {FAMILY_FACTS[fam].label} checkpoint means {list(want)}: "
            "a shard is missing, params.json belongs to another model, or vocab_size disagrees with the tokenizer")
    if n_heads % n or n_kv % n:
        raise ConversionError(f"{n} shards cannot split {n_heads} heads and {n_kv} kv heads")
    wq = ckpt.info("layers.0.attention.wq.weight")
    if wq.shape != (dim // n, dim):
        raise ConversionError(f"layers.0.attention.wq.weight has shape {list(wq.shape)}, expected {[dim // n, dim]}")
    for s in range(1, n):
        if ckpt.info("tok_embeddings.weight", s).shape != emb.shape:
            raise ConversionError(f"{ckpt.shard_paths[s].name} has a different embedding shard shape than shard 00")

    has_output, equal_output = _output_tied(ckpt)
    tied = equal_output
    if not has_output:
        ev.append("no output.weight: the output matrix is the embedding (tied)")
    elif tied:
        ev.append("output.weight equals tok_embeddings.weight bit for bit: tied embeddings")

    # Registry: exact params match, then tie-breakers.
    spec: VariantSpec | None = None
    folder_spec = variant_named_by_folder(ckpt.dir)
    if variant_id:
        spec = registry.get(variant_id)
        ev.append(f"variant {variant_id} given on the command line")
    else:
        key = registry.arch_key(p) + (p.get("vocab_size"),)
        cands = [v for v in registry.VARIANTS if v.params_key() == key]
        if cands:
            by_shards = [v for v in cands if v.num_shards == n] or cands
            by_tie = [v for v in by_shards if v.tie_word_embeddings == tied] or by_shards
            cands = by_tie
            if folder_spec in cands:
                spec = folder_spec
                ev.append(f"params.json matches the released {spec.id}; folder name {ckpt.dir.name!r} picks it")
            else:
                hint = _instruct_hint(ckpt.dir)
                pick = [v for v in cands if v.instruct == bool(hint)] or cands
                spec = pick[0]
                ev.append(f"params.json matches the released {spec.id}"
                          + (f" (also matches {', '.join(v.id for v in cands if v is not spec)})" if len(cands) > 1 else ""))
        elif folder_spec and _traits_agree(folder_spec, p, kind):
            spec = folder_spec
            ev.append(f"shape not in the registry; folder name {ckpt.dir.name!r} names {spec.id}, "
                      "whose facts (rope scaling, context, special tokens) are used")
        else:
            ev.append(f"shape not in the registry; {FAMILY_FACTS[fam].label} assumed from structural traits")

    if spec is not None:
        fam = spec.family
        scaling = spec.rope_scaling
    else:
        if fam == "llama3.1" and tied:
            fam = "llama3.2"
            ev.append("tied embeddings with scaled RoPE: a Llama 3.2 model (rope factor 32)")
        scaling = {"llama3.1": registry.LLAMA31_SCALING, "llama3.2": registry.LLAMA32_SCALING}.get(fam)
    if "rope_scaling_factor" in p and scaling is not None:  # newer params.json may state it
        scaling = RopeScaling(factor=float(p["rope_scaling_factor"]))
        ev.append(f"rope scaling factor {scaling.factor:g} from params.json")
    if bool(p.get("use_scaled_rope")) != (scaling is not None):
        raise ConversionError(f"use_scaled_rope={p.get('use_scaled_rope')} in params.json contradicts "
                              f"{spec.id if spec else fam}; pass the right --variant")

    if instruct is None:
        instruct = spec.instruct if spec else bool(_instruct_hint(ckpt.dir))
    head_dim = dim // n_heads
    rep = _kv_replication(ckpt, n_kv, head_dim)
    if rep > 1:
        ev.append(f"each kv head is stored {rep} times across the {n} shards (shards > real kv heads): de-duplicated")
    facts = FAMILY_FACTS[fam]
    ffn = registry.intermediate_size(dim, int(p.get("multiple_of", 256)), p.get("ffn_dim_multiplier"))
    w1 = ckpt.info("layers.0.feed_forward.w1.weight")
    if w1.shape != (ffn // n, dim):
        raise ConversionError(f"layers.0.feed_forward.w1.weight has shape {list(w1.shape)}; params.json "
                              f"(multiple_of, ffn_dim_multiplier) gives hidden size {ffn}, i.e. {[ffn // n, dim]} per shard")
    if spec is not None and spec.tie_word_embeddings and not tied:
        ev.append(f"{spec.id} is released with tied embeddings but this output.weight differs: kept untied")
    label = (f"{facts.label} {spec.size}" + (" Instruct" if spec.instruct else "")) if spec else \
        f"{facts.label} (custom shape: {n_layers} layers, dim {dim})"
    return Variant(
        family=fam, label=label, registry_id=spec.id if spec else None, instruct=bool(instruct),
        dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, hf_num_kv_heads=n_kv // rep,
        intermediate_size=ffn, vocab_size=vocab, norm_eps=float(p.get("norm_eps", 1e-5)),
        rope_theta=float(p.get("rope_theta", 10000.0)), rope_scaling=scaling,
        max_position_embeddings=facts.max_position_embeddings, num_shards=n,
        embedding_shard_dim=facts.embedding_shard_dim, kv_replication=rep, tie_word_embeddings=tied,
        has_output_weight=has_output, dtype=emb.dtype, tokenizer_path=ckpt.tokenizer_path,
        tokenizer_kind=kind, evidence=tuple(ev))
