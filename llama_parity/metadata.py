"""The judge's metadata checks: every fact an HF folder states, against what the Meta files imply.

Nothing in the HF folder is taken as ground truth. The expected values come from:
- the Meta shards (tensor names, shapes, dtype, whether output.weight is the embedding, how many
  times each kv head is stored) and params.json (dims, eps, theta, use_scaled_rope);
- the release and twin those files are (`identify_checkpoint`, i.e. releases.identify: `--variant`,
  else params and the folder's name, else what the HF folder claims when the Meta files allow
  several; base or instruct from --instruct/--base, the folder's name, else the HF folder's own
  metadata, all of which must name one twin), its family's facts (context length) and its
  official HF files in llama_parity/releases/official/ (bos/eos ids, sampling defaults, the
  presence of generation_config.json).

Differences that do not change the release pass: shard sizes and counts, tensor order, JSON
formatting, version stamps, a dtype change whose label matches the tensors (its rounding is judged
by the model checks, which then run the reference on Meta's weights rounded to that dtype).
Both config spellings are read: transformers 4.x (`rope_theta` + `rope_scaling`, `torch_dtype`)
and 5.x (`rope_parameters`, `dtype`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llama_parity import releases as registry
from llama_parity.releases import official_file

from .parity import Check

# Meta key -> HF key. The judge keeps its own copy (not converter/keymap.py), so a wrong entry in
# the converter's table cannot be confirmed by the same entry here.
_LAYER_KEYS = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
               "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
               "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
               "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
               "ffn_norm": "post_attention_layernorm"}
_TOP_KEYS = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
_CONCAT_DIM1 = ("attention.wo", "feed_forward.w2")  # row-parallel in Meta's model: split on dim 1
# Buffers some converters (transformers <= 4.31) wrote beside the weights; they do not change the model.
_HARMLESS_HF = ("rotary_emb.inv_freq",)
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def hf_key(meta_key: str) -> str | None:
    if meta_key in _TOP_KEYS:
        return _TOP_KEYS[meta_key]
    parts = meta_key.split(".")
    if parts[-1] != "weight":  # a bias or buffer has no place in Llama's layers
        return None
    if parts[0] == "layers" and len(parts) == 5 and ".".join(parts[2:4]) in _LAYER_KEYS:
        return f"model.layers.{parts[1]}.{_LAYER_KEYS['.'.join(parts[2:4])]}.weight"
    if parts[0] == "layers" and len(parts) == 4 and parts[2] in _LAYER_KEYS:
        return f"model.layers.{parts[1]}.{_LAYER_KEYS[parts[2]]}.weight"
    return None


@dataclass
class MetaSide:
    """What the Meta folder says, read once (shapes and dtypes only, plus the few tensors compared)."""

    params: dict
    shards: list  # memory-mapped state dicts
    release: registry.VariantSpec | None
    family: str
    instruct: bool
    tied: bool
    kv_replication: int
    evidence: list[str] = field(default_factory=list)
    ident: registry.Identification | None = None  # the one identification (release, twin, why)

    @property
    def dtype(self) -> torch.dtype:
        return self.shards[0]["tok_embeddings.weight"].dtype

    def embedding_split_dim(self) -> int:
        emb = self.shards[0]["tok_embeddings.weight"]
        return 1 if len(self.shards) > 1 and emb.shape[1] != int(self.params["dim"]) else 0

    def merged_shapes(self) -> dict[str, tuple[int, ...]]:
        """HF name -> shape after merging shards (and de-duplicating replicated kv heads)."""
        out = {}
        n = len(self.shards)
        for key, t in self.shards[0].items():
            name = hf_key(key)
            if name is None or (key == "output.weight" and self.tied):
                continue
            shape = list(t.shape)
            if t.dim() == 2 and n > 1:
                d = self.embedding_split_dim() if key == "tok_embeddings.weight" else \
                    (1 if any(s in key for s in _CONCAT_DIM1) else 0)
                shape[d] = sum(int(s[key].shape[d]) for s in self.shards)
            if key.endswith(("attention.wk.weight", "attention.wv.weight")):
                shape[0] //= self.kv_replication
            out[name] = tuple(shape)
        return out


def _load_shards(meta_dir: Path) -> list:
    """Every shard, memory-mapped (headers read, data on demand); a damaged one is bad input (a
    FormatError, an OSError naming the file)."""
    from llama_parity.formats.pth import load_state_dict

    return [load_state_dict(p) for p in sorted(meta_dir.glob("consolidated.*.pth"), key=lambda p: int(p.name.split(".")[1]))]


def output_tied(meta_dir: Path) -> bool:
    """Meta's tying: no output.weight in the first shard, or one holding the embedding's bytes."""
    from llama_parity.reference_model.model import ShardReader, find_shards

    shard = ShardReader(find_shards(meta_dir)[0])
    return "output.weight" not in shard or shard.same_bytes("output.weight", "tok_embeddings.weight")


def _kv_replication(shards: list, stored_kv: int, head_dim: int) -> int:
    """How often each kv head is stored: the registry's rule (Meta replicates only so that every
    shard owns one kv head, 405B MP16), confirmed here from layer 0's data."""
    def copies_equal(r: int) -> bool:
        return all(torch.equal(w.view(stored_kv // r, r, head_dim, -1),
                               w.view(stored_kv // r, r, head_dim, -1)[:, :1].expand(stored_kv // r, r, head_dim,
                                                                                     w.shape[-1]))
                   for w in (torch.cat([s[f"layers.0.attention.{k}.weight"] for s in shards]) for k in ("wk", "wv")))
    return registry.stored_kv_replication(len(shards), stored_kv, copies_equal)


def identify_checkpoint(meta_dir: Path, *, variant_id: str | None = None, instruct: bool | None = None,
                        hf_dir: Path | None = None) -> registry.Identification:
    """The judge's identification of a Meta folder: releases.identify on what the Meta files say
    (params.json, shard count, tying, vocab rows, tokenizer kind) and, given hf_dir, on what the HF
    folder claims (which of several fitting releases, which twin). An ambiguity stays in the result
    (`.require()` raises it as the one line convert prints)."""
    from llama_parity.reference_model.model import ShardReader, find_shards

    meta_dir = Path(meta_dir)
    params = json.loads((meta_dir / "params.json").read_text())
    paths = find_shards(meta_dir)
    rows, cols = ShardReader(paths[0]).shape("tok_embeddings.weight")
    vocab = rows * len(paths) if cols == params.get("dim") else rows  # Llama 3 splits rows, Llama 1/2 columns
    tok = registry.find_tokenizer(meta_dir)
    try:
        kind = registry.tokenizer_kind(tok) if tok is not None else None
    except ValueError:
        kind = None  # the tokenizer check reports an unreadable tokenizer
    claim = registry.HFClaim.read(Path(hf_dir)) if hf_dir is not None else None
    return registry.identify(params, folder_name=meta_dir.resolve().name, num_shards=len(paths),
                             tied=output_tied(meta_dir),
                             variant_id=variant_id, instruct=instruct, vocab_size=vocab, tokenizer_kind=kind,
                             hf_claim=claim)


def read_meta_side(meta_dir: Path, *, variant_id: str | None = None, instruct: bool | None = None,
                   ident: registry.Identification | None = None) -> MetaSide:
    params = json.loads((meta_dir / "params.json").read_text())
    shards = _load_shards(meta_dir)
    if ident is None:
        ident = identify_checkpoint(meta_dir, variant_id=variant_id, instruct=instruct).require()
    n_heads = int(params["n_heads"])
    stored_kv = int(params.get("n_kv_heads") or n_heads)
    rep = _kv_replication(shards, stored_kv, int(params["dim"]) // n_heads)
    rel = ident.release
    why = [f"release {rel.id}" if rel else f"no release: {registry.FAMILY_FACTS[ident.family].label} facts",
           *ident.evidence, f"{'instruct' if ident.instruct else 'base'} metadata expected "
           f"({ident.metadata_release.id}'s official files): {ident.twin_reason}"]
    return MetaSide(params, shards, rel, ident.family, ident.instruct, ident.tied, rep, why, ident)


def metadata_release(meta: MetaSide) -> registry.VariantSpec:
    """The release whose official files hold this conversion's chat metadata (base or instruct)."""
    return meta.ident.metadata_release if meta.ident else registry.metadata_release(meta.release, meta.family,
                                                                                     meta.instruct)


# The float formats the judge computes in; any other stored dtype is kept as its safetensors code.
_JUDGED_CODES = ("F32", "BF16", "F16", "F64")


@dataclass
class HFSide:
    config: dict
    generation: dict | None
    tensors: dict[str, tuple[tuple[int, ...], torch.dtype | str]]  # name -> (shape, dtype), from the headers
    files: dict[str, str]  # name -> file

    @property
    def dtypes(self) -> set:
        return {d for n, (_, d) in self.tensors.items() if not n.endswith(_HARMLESS_HF)}

    @property
    def matrix_dtypes(self) -> set:
        """The dtypes of the weight matrices: what the dtype label names. Norms (vectors) may be kept
        in float32 beside them (a faithful packaging when stored exactly: the byte check judges it)."""
        return {d for n, (s, d) in self.tensors.items() if not n.endswith(_HARMLESS_HF) and len(s) >= 2}

    def odd_vector_dtypes(self) -> set:
        """Vector dtypes that are neither the matrices' nor float32."""
        return {d for n, (s, d) in self.tensors.items()
                if not n.endswith(_HARMLESS_HF) and len(s) < 2 and d not in self.matrix_dtypes | {torch.float32}}


def read_hf_side(hf_dir: Path) -> HFSide:
    from llama_parity.formats.dtypes import torch_dtype
    from llama_parity.formats.safetensors import read_header, read_index

    cfg = json.loads((hf_dir / "config.json").read_text())
    gen_path = hf_dir / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else None
    files = read_index(hf_dir)
    tensors = {}
    for f in sorted(set(files.values())):
        for k, t in read_header(hf_dir / f).tensors.items():
            tensors[k] = (t.shape, torch_dtype(t.dtype) if t.dtype in _JUDGED_CODES else t.dtype)
    return HFSide(cfg, gen, {k: v for k, v in tensors.items() if k in files}, files)


def _check(name: str, got, want, catches: str, where: str = "config.json") -> Check:
    ok = got == want
    return Check(name, catches, 0.0 if ok else 1.0, 0.0, ok,
                 f"{where} has {got!r}, the Meta checkpoint implies {want!r}")


def _dtype_name(d) -> str:
    return _DTYPE_NAMES.get(d, str(d).replace("torch.", ""))


def tensor_checks(meta: MetaSide, hf: HFSide) -> list[Check]:
    """Names and shapes first (a folder of another model is named as such, not crashed on), and
    one dtype for all weights."""
    want = meta.merged_shapes()
    got = {n: s for n, (s, _) in hf.tensors.items() if not n.endswith(_HARMLESS_HF)}
    if meta.tied:
        got.pop("lm_head.weight", None)  # tied: transformers uses the embedding whatever the file holds
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    differ = [f"{n}: HF {list(got[n])}, Meta implies {list(want[n])}" for n in sorted(set(want) & set(got))
              if tuple(got[n]) != tuple(want[n])]
    names = [f"missing {n}" for n in missing] + [f"unexpected {n}" for n in extra]
    out = [Check("tensors: shapes", "an HF folder of another model (different shapes), kv heads not de-duplicated, "
                 "shards merged on the wrong dim", float(len(differ)), 0.0, not differ,
                 _listing(differ) or f"{len(set(want) & set(got))} tensors shaped as the Meta checkpoint implies"),
           Check("tensors: names", "a tensor dropped (lm_head of an untied model, a layer) or one the Meta "
                 "checkpoint does not have", float(len(names)), 0.0, not names,
                 _listing(names) or f"the {len(want)} tensors the Meta checkpoint implies")]
    dtypes = sorted(_dtype_name(d) for d in hf.matrix_dtypes)
    odd = sorted(_dtype_name(d) for d in hf.odd_vector_dtypes())
    vectors = sorted(_dtype_name(d) for d in hf.dtypes - hf.matrix_dtypes)
    ok = len(dtypes) == 1 and not odd
    out.append(Check("tensors: one float dtype", "weight matrices in mixed precision, norms in a dtype narrower than "
                     "the matrices'", float(len(dtypes) - 1 + len(odd)), 0.0, ok,
                     f"HF weight matrices are {', '.join(dtypes)}" + (f", norms {', '.join(vectors)} (kept wider; "
                                                                     "their values are judged by the byte check)"
                                                                     if vectors else "")))
    return out


def _listing(items: list[str], n: int = 6) -> str:
    return "; ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def _rope_parts(cfg: dict) -> tuple[set, dict | None]:
    """(every rope_theta the config states, the llama3 scaling dict or None) in 4.x and 5.x spellings."""
    params = cfg.get("rope_parameters") if isinstance(cfg.get("rope_parameters"), dict) else {}
    thetas = {float(v) for v in (cfg.get("rope_theta"), params.get("rope_theta")) if v is not None}
    scaling = cfg.get("rope_scaling") if isinstance(cfg.get("rope_scaling"), dict) else params
    if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        return thetas or {registry.DEFAULT_ROPE_THETA}, scaling
    return thetas or {registry.DEFAULT_ROPE_THETA}, None


def architecture_checks(meta: MetaSide, hf: HFSide) -> list[Check]:
    """Values that define the function: a mismatch means transformers builds another model."""
    p, cfg = meta.params, hf.config
    shapes = meta.merged_shapes()
    heads = int(p["n_heads"])
    want = {"hidden_size": int(p["dim"]), "num_hidden_layers": int(p["n_layers"]), "num_attention_heads": heads,
            "num_key_value_heads": int(p.get("n_kv_heads") or heads) // meta.kv_replication,
            "intermediate_size": shapes["model.layers.0.mlp.gate_proj.weight"][0],
            "vocab_size": shapes["model.embed_tokens.weight"][0]}
    got = dict(cfg)
    got.setdefault("num_key_value_heads", cfg.get("num_attention_heads"))
    out = [_check(f"config: {k}", got.get(k), v, "config of another model or size (dims, heads, kv heads, vocab)")
           for k, v in want.items()]
    if cfg.get("head_dim") is not None:
        out.append(_check("config: head_dim", cfg["head_dim"], int(p["dim"]) // heads, "head_dim of another model"))
    return out


_ROPE_FIELDS = ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def rope_and_norm_checks(meta: MetaSide, hf: HFSide, rope) -> list[Check]:
    """rope_theta, the llama3 scaling (every field, missing or wrong), rms_norm_eps."""
    p = meta.params
    thetas, rs = _rope_parts(hf.config)
    theta = float(p.get("rope_theta", registry.DEFAULT_ROPE_THETA))
    out = [_check("config: rope_theta", thetas.pop() if len(thetas) == 1 else sorted(thetas), theta,
                  "rope_theta dropped (Code Llama 1e6, Llama 3 5e5 silently become 1e4) or stated twice differently")]
    out.append(_check("config: rope scaling factor", None if rs is None else rs.get("factor"),
                      None if rope is None else float(rope.factor),
                      "RoPE scaling missing or with the wrong factor (Llama 3.2 / Guard 3 1B need 32, 3.1 needs 8)"))
    if rope is not None:  # the rule too: "linear" or "dynamic" with these fields is another function
        got = None if rs is None else rs.get("rope_type", rs.get("type"))
        out.append(_check("config: rope_scaling.rope_type", got, "llama3", "RoPE scaling of another rule (linear, "
                          "dynamic) than Llama 3.1's"))
        for key in _ROPE_FIELDS:
            got = None if rs is None else rs.get(key)
            out.append(_check(f"config: rope_scaling.{key}", got, getattr(rope, key),
                              f"RoPE scaling's {key} missing or wrong (changes every long-wavelength frequency)"))
    eps = hf.config.get("rms_norm_eps", 1e-6)  # transformers' default when absent
    out.append(_check("config: rms_norm_eps", eps,
                      float(p.get("norm_eps", 1e-5)), "norm eps of another version (Llama 1 1e-6 vs 1e-5)"))
    return out


def release_metadata_checks(meta: MetaSide, hf: HFSide) -> list[Check]:
    """Facts that do not change the logits but break users: context length, dtype label, tying,
    bos/eos ids, generation defaults."""
    cfg, vocab = hf.config, meta.merged_shapes()["model.embed_tokens.weight"][0]
    dtypes = hf.matrix_dtypes
    label = {cfg[k] for k in ("torch_dtype", "dtype") if isinstance(cfg.get(k), str)}
    out = [_check("config: max_position_embeddings", cfg.get("max_position_embeddings"),
                  registry.FAMILY_FACTS[meta.family].max_position_embeddings,
                  "context length of another release (2048 Llama 1, 4096 Llama 2, 16384 Code Llama, 8192 Llama 3, "
                  "131072 Llama 3.1+)"),
           _check("config: dtype label", sorted(label)[0] if len(label) == 1 else sorted(label),
                  _dtype_name(next(iter(dtypes))) if len(dtypes) == 1 else sorted(map(_dtype_name, dtypes)),
                  "torch_dtype/dtype saying another precision than the stored weights (loads in the wrong dtype)"),
           _check("config: tie_word_embeddings", bool(cfg.get("tie_word_embeddings", False)), meta.tied,
                  "tie flag lost (random lm_head) or set on an untied model (the output matrix ignored)")]
    rel = metadata_release(meta)
    off_cfg = official_file(rel.id, "config.json") or {}
    for key in ("bos_token_id", "eos_token_id"):
        want = registry.token_ids(registry.rebase_official_ids(off_cfg.get(key), vocab))
        out.append(_check(f"config: {key}", registry.token_ids(cfg.get(key)), want,
                          f"{key} of another release or of the base/instruct twin"))
    return out + generation_checks(meta, hf, rel, vocab) + [twin_check(meta)]


def twin_check(meta: MetaSide) -> Check:
    """Base or instruct is never assumed: the HF folder's own metadata names one twin (or the user
    or the folder name does), and every fact that differs between the twins must name that one."""
    ident = meta.ident
    mix = ident.twin_mix if ident else ()
    detail = (ident.twin_reason if ident else "") if not mix else \
        "; ".join(f"{w}: {', '.join(f for f, t in mix if t == w)}" for w in ("base", "instruct"))
    return Check("metadata: one twin (base or instruct)", "a folder mixing the base and instruct twins' metadata "
                 "(a base eos list with an instruct chat template: generation never stops, or stops early)",
                 float(len(mix)), 0.0, not mix, detail if not mix else f"the HF folder mixes the twins ({detail})")


def generation_checks(meta: MetaSide, hf: HFSide, rel, vocab: int) -> list[Check]:
    off = official_file(rel.id, "generation_config.json")
    if off is None:
        return []
    name = f"{rel.id}{' (instruct)' if meta.instruct else ' (base)'}"
    if hf.generation is None:
        return [Check("generation_config.json", "generation_config.json missing: generate() never stops at the "
                      "release's eos ids and samples with other defaults", 1.0, 0.0, False,
                      f"absent; the official {name} repository has one")]
    gen, out = hf.generation, []
    for key in ("bos_token_id", "eos_token_id"):
        want = registry.token_ids(registry.rebase_official_ids(off.get(key), vocab))
        out.append(_check(f"generation_config: {key}", registry.token_ids(gen.get(key)), want,
                          "stop/start ids of another release (e.g. a base eos list on an instruct model: "
                          "generation never stops at <|eot_id|>)", "generation_config.json"))
    for key, default in registry.GENERATION_DEFAULTS.items():
        out.append(_check(f"generation_config: {key}", gen.get(key, default), off.get(key, default),
                          f"sampling default {key} unlike the official {name} file", "generation_config.json"))
    return out


STRUCTURAL = ("tensors: shapes", "config: hidden_size", "config: num_hidden_layers",
              "config: num_attention_heads", "config: num_key_value_heads", "config: intermediate_size",
              "config: vocab_size", "config: head_dim", "tensors: one float dtype")


def metadata_checks(meta_dir: Path, hf_dir: Path, rope, *, variant_id: str | None = None,
                    instruct: bool | None = None,
                    ident: registry.Identification | None = None) -> tuple[list[Check], MetaSide, HFSide]:
    """Every metadata check; structural ones first. The model checks and the byte check
    (exact_bytes.py) need those to pass (else transformers would build another model than the Meta
    one, or fail to load it). `ident`: the
    identification verify made (else made here, with what the HF folder claims)."""
    if ident is None:
        ident = identify_checkpoint(Path(meta_dir), variant_id=variant_id, instruct=instruct, hf_dir=Path(hf_dir))
    meta = read_meta_side(Path(meta_dir), ident=ident.require())
    hf = read_hf_side(Path(hf_dir))
    checks = tensor_checks(meta, hf) + architecture_checks(meta, hf)
    checks += rope_and_norm_checks(meta, hf, rope) + release_metadata_checks(meta, hf)
    return checks, meta, hf


def structure_ok(checks: list[Check]) -> bool:
    return all(c.ok for c in checks if c.name in STRUCTURAL)


def hf_weights_dtype(hf: HFSide) -> torch.dtype | None:
    """The one float dtype of the HF weight matrices (None when mixed)."""
    d = hf.matrix_dtypes
    return next(iter(d)) if len(d) == 1 and isinstance(next(iter(d)), torch.dtype) else None
