"""HF -> Meta: the inverse plan, so a model can go back to Meta's format (and round trips prove both).

Every step is the inverse of the Meta -> HF step beside it in transforms.py: q/k rows back to
interleaved rotary pairs, kv heads replicated when shards outnumber them, tensors cut into
model-parallel shards along each family's dims. params.json comes from the registry when the
config is a known release, otherwise it is reconstructed so that Meta's FFN rounding gives the
same hidden size. Every HF tensor is consumed or listed as harmless (keymap.py), else refused.
Memory: one tensor at a time (pth_writer.py writes torch.save's format tensor by tensor), each
built from only the rows of the HF tensors it holds.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from llama_parity import releases as registry
from llama_parity.formats.safetensors import SafetensorsHeader, SafetensorsReader
from llama_parity.releases import FAMILY_FACTS

from .errors import ConversionError
from .input_checks import check_hf_folder, read_json
from .keymap import KeyRule, meta_keys
from .pth_writer import save_one_at_a_time
from .staging import write_atomically
from .transforms import replicate_heads, unpermute_from_hf_rotary


@dataclass
class HFToMetaReport:
    output_dir: Path
    num_shards: int
    params: dict
    family: str
    notes: list[str]
    instruct: bool = False  # the HF folder carries chat metadata (verify then needs --instruct)


def _params_for(cfg: dict, family: str, num_shards: int | None, notes: list[str]) -> tuple[dict, int]:
    dim, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", heads)
    hidden = cfg["intermediate_size"]
    for spec in registry.releases_for_hf_config(cfg, num_shards):
        if FAMILY_FACTS[spec.family].tokenizer == FAMILY_FACTS[family].tokenizer:
            notes.append(f"params.json of the released {spec.id}")
            return dict(spec.params), spec.num_shards
    # Unknown shape: choose multiple_of / ffn_dim_multiplier reproducing the hidden size exactly.
    params = {"dim": dim, "n_layers": cfg["num_hidden_layers"], "n_heads": heads}
    if kv != heads:
        params["n_kv_heads"] = kv
    try:
        params["multiple_of"], mult = registry.ffn_params_for(dim, hidden)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    if mult is not None:
        params["ffn_dim_multiplier"] = mult
    params["norm_eps"] = cfg.get("rms_norm_eps", 1e-5)
    if family.startswith("llama3") or family == "llama-guard-3":
        params["vocab_size"] = cfg["vocab_size"]
    else:
        params["vocab_size"] = -1  # Llama 1/2 convention: the tokenizer decides
    theta = registry.hf_rope_theta(cfg)  # 4.x or 5.x spelling
    if theta != registry.DEFAULT_ROPE_THETA:
        params["rope_theta"] = cfg.get("rope_theta", theta)  # as the config writes it (Code Llama: an int)
    if family in ("llama3.1", "llama3.2"):
        params["use_scaled_rope"] = True
    notes.append("shape not in the registry: params.json reconstructed from config.json")
    return params, num_shards or 1


@dataclass(frozen=True)
class _Layout:
    """How the HF tensors are cut into Meta's model-parallel shards."""
    n: int  # shards
    heads: int
    kv: int
    rep: int  # each kv head stored this many times (shards > kv heads)
    emb_dim: int  # the embedding's shard dim in this family


def _cut(sl, rule: KeyRule, s: int, lay: _Layout, key: str) -> torch.Tensor:
    """Shard s of one Meta tensor, read from the HF tensor's slice `sl` (only the rows it needs).

    q/k rows go back to Meta's interleaved rotary pairs head by head, and kv heads are replicated
    when shards outnumber them, so a shard's rows come from a contiguous range of whole HF heads.
    """
    shape = sl.get_shape()
    split = lay.emb_dim if rule.split == "embedding" else rule.split
    if split is None:
        return sl[:]
    if shape[split] * (lay.rep if key.endswith(("wk.weight", "wv.weight")) else 1) % lay.n:
        raise ConversionError(f"{key}: dim {split} of size {shape[split]} does not split into {lay.n} shards")
    if split == 1:
        c = shape[1] // lay.n
        return sl[:, s * c:(s + 1) * c].contiguous()
    heads, rep = (lay.kv, lay.rep) if rule.rotary == "k" or key.endswith("attention.wv.weight") else (lay.heads, 1)
    if rule.rotary is None and rep == 1:
        r = shape[0] // lay.n
        return sl[s * r:(s + 1) * r].contiguous()
    hd = shape[0] // heads
    m = heads * rep // lay.n  # stored heads per shard
    lo, hi = s * m // rep, ((s + 1) * m - 1) // rep + 1  # the HF heads they come from
    t = sl[lo * hd:hi * hd]
    if rule.rotary:
        t = unpermute_from_hf_rotary(t, hi - lo)
    t = replicate_heads(t, hi - lo, rep)
    off = s * m - lo * rep
    return t[off * hd:(off + m) * hd].contiguous()


_META_DTYPES = {"BF16", "F16", "F32", "F64"}  # what a Meta checkpoint may hold


class _Slice:
    """Rows of one HF tensor, read with positioned reads when asked for (formats.SafetensorsReader).

    Not safetensors' memory map: the pages of a mapped file count in RSS for as long as it stays
    mapped, so one output shard at a time would still show the whole model in `top`.
    """

    def __init__(self, files: SafetensorsReader, key: str):
        self.files, self.key = files, key
        self.shape, self.dtype = files.shape(key), files.dtype(key)

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def __getitem__(self, idx) -> torch.Tensor:
        rows = self.shape[0] if self.shape else 1
        if isinstance(idx, tuple):  # [:, a:b]: whole rows, then the columns
            return self.files.rows(self.key, 0, rows)[idx]
        a, b, _ = idx.indices(rows)
        t = self.files.rows(self.key, a, b)
        return t if self.shape else t.reshape(())


class _Reader:
    """Every HF tensor by name, from the files check_hf_folder checked (pages read are dropped from
    the page cache: each is read once)."""

    def __init__(self, hf_dir: Path, files: dict[str, SafetensorsHeader]):
        self.files = SafetensorsReader(hf_dir, files)
        self.slices = {name: _Slice(self.files, name) for name in self.files.keys()}

    def close(self) -> None:
        self.files.close()


def _check_tensors(hf_dir: Path, cfg: dict, files: dict[str, SafetensorsHeader]) -> None:
    """Refuse an HF folder lacking a tensor the inverse plan needs (extras: check_hf_folder)."""
    where = {k: f for f, h in files.items() for k in h.tensors}
    n_layers = cfg.get("num_hidden_layers")
    if not isinstance(n_layers, int) or n_layers <= 0:
        raise ConversionError(f"{hf_dir / 'config.json'}: num_hidden_layers is {n_layers!r}, expected a positive integer")
    tied = bool(cfg.get("tie_word_embeddings", False))
    missing = [hk for _, _, hk in meta_keys(n_layers, with_output=not tied) if hk not in where]
    if missing and missing == ["lm_head.weight"]:
        raise ConversionError(f"{hf_dir} has no lm_head.weight and config.json does not say tie_word_embeddings: "
                              "the output layer is missing")
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ConversionError(f"{hf_dir} lacks {', '.join(missing[:3])}{more} (incomplete download?)")
    odd = sorted({t.dtype for h in files.values() for t in h.tensors.values()} - _META_DTYPES)
    if odd:
        raise ConversionError(f"{hf_dir} holds {', '.join(odd)} tensors; Meta checkpoints are bf16/fp16/fp32")


class _ShapeOnly:
    """A _Slice stand-in that reads nothing: `_cut` on it gives the output tensor's shape and dtype
    (the same indexing and transforms on a meta-device tensor)."""

    def __init__(self, sl: _Slice):
        self.sl = sl

    def get_shape(self) -> list[int]:
        return self.sl.get_shape()

    def __getitem__(self, idx) -> torch.Tensor:
        t = torch.empty(self.sl.shape, dtype=self.sl.dtype, device="meta")
        return t[idx] if self.sl.shape else t


def _meta_shard(s: int, lay: _Layout, n_layers: int, reader: _Reader, rope_freqs):
    """Meta shard s: {key: (shape, dtype)} in Meta's key order, and a function producing each tensor
    (read then, so that only one tensor of the shard is in memory at a time)."""
    sources = {}
    for rule, mkey, hkey in meta_keys(n_layers):
        src = hkey if hkey in reader.slices else "model.embed_tokens.weight"  # tied: output.weight is the embedding
        sources[mkey] = (rule, reader.slices[src])
    layout = {k: (tuple(t.shape), t.dtype) for k, t in
              ((k, _cut(_ShapeOnly(sl), rule, s, lay, k)) for k, (rule, sl) in sources.items())}
    if rope_freqs is not None:
        layout["rope.freqs"] = (tuple(rope_freqs.shape), rope_freqs.dtype)

    def produce(key: str) -> torch.Tensor:
        if key == "rope.freqs":
            return rope_freqs.clone()
        rule, sl = sources[key]
        return _cut(sl, rule, s, lay, key)

    return layout, produce


def _input_files(hf_dir: Path, files, tokenizer: Path | None) -> list[Path]:
    out = [hf_dir / "config.json", *(hf_dir / f for f in files), hf_dir / "model.safetensors.index.json"]
    out += [p for p in (tokenizer, hf_dir / "tokenizer.model", hf_dir / "original" / "tokenizer.model") if p]
    return [p for p in out if p.exists()]


def convert_hf_to_meta(hf_dir: str | Path, output_dir: str | Path, *, num_shards: int | None = None,
                       overwrite: bool = False, tokenizer: str | Path | None = None) -> HFToMetaReport:
    hf_dir, output_dir = Path(hf_dir), Path(output_dir)
    if not (hf_dir / "config.json").is_file():
        raise ConversionError(f"config.json missing in {hf_dir}: not a Hugging Face model folder")
    tokenizer = Path(tokenizer) if tokenizer else None
    if tokenizer is not None and not tokenizer.is_file():
        raise ConversionError(f"--tokenizer {tokenizer} does not exist")
    files = check_hf_folder(hf_dir, all_keys_known=True)
    cfg = read_json(hf_dir / "config.json")
    if cfg.get("model_type") != "llama":
        raise ConversionError(f"{hf_dir} holds a {cfg.get('model_type')!r} model, not llama")
    _check_tensors(hf_dir, cfg, files)
    notes: list[str] = []
    family = registry.family_for_hf_config(cfg)
    params, n = _params_for(cfg, family, num_shards, notes)
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    rep = registry.kv_replication(n, kv)
    if rep > 1:
        params["n_kv_heads"] = kv * rep
        notes.append(f"{n} shards > {kv} kv heads: each kv head stored {rep} times")
    if heads % n or (kv * rep) % n:
        raise ConversionError(f"{n} shards cannot split {heads} heads / {kv} kv heads")
    lay = _Layout(n, heads, kv, rep, FAMILY_FACTS[family].embedding_shard_dim)

    ident = _identify(hf_dir, cfg, params, n, notes)
    write_atomically(output_dir, lambda staging: _write_meta(staging, hf_dir, cfg, params, lay, family, files,
                                                             tokenizer, notes),
                     overwrite=overwrite, notes=notes, input_files=_input_files(hf_dir, files, tokenizer),
                     input_dirs=[hf_dir], needed_bytes=_weight_bytes(hf_dir, files))
    return HFToMetaReport(output_dir, n, params, family, notes, ident.instruct)


def _identify(hf_dir: Path, cfg: dict, params: dict, n: int, notes: list[str]) -> registry.Identification:
    """releases.identify on the params.json written and what the HF folder says about itself: the
    release and the twin (base or instruct) verify will judge. Meta's files are the same for every
    candidate, so an ambiguity is reported here (verify will ask for --variant), not refused."""
    try:
        claim = registry.HFClaim.read(hf_dir)
    except (OSError, ValueError) as e:  # a damaged generation_config / tokenizer_config: bad input
        raise ConversionError(f"cannot read the metadata in {hf_dir}: {e}") from None
    ident = registry.identify(params, folder_name=hf_dir.resolve().name, num_shards=n,
                              tied=bool(cfg.get("tie_word_embeddings", False)), vocab_size=cfg["vocab_size"],
                              hf_claim=claim)
    if ident.ambiguity:
        notes.append(f"release not told apart ({', '.join(v.id for v in ident.candidates)}): the Meta files are "
                     "the same for each; verify will ask for --variant")
    else:
        notes.append(f"{'instruct' if ident.instruct else 'base'} metadata: {ident.twin_reason}")
    return ident


def _weight_bytes(hf_dir: Path, files) -> int:  # each tensor written once (kv replication aside)
    return sum((hf_dir / f).stat().st_size for f in files)


def _save(path: Path, layout: dict, produce) -> None:
    """The shard written one tensor at a time (pth_writer), with a full disk surfacing as the OSError
    it is (torch's own zip writer reports it as an opaque RuntimeError about zip positions)."""
    try:
        save_one_at_a_time(path, layout, produce)
    except RuntimeError as e:
        cause = e.__context__
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__context__
        if cause is not None:
            raise cause from None
        raise ConversionError(f"cannot write {path}: {str(e).splitlines()[0][:200]}") from None


def _write_meta(staging: Path, hf_dir: Path, cfg: dict, params: dict, lay: _Layout, family: str, files,
                tokenizer: Path | None, notes: list[str]) -> None:
    reader = _Reader(hf_dir, files)
    try:
        rope_freqs = None
        if FAMILY_FACTS[family].has_rope_freqs_key:
            hd = cfg["hidden_size"] // lay.heads
            theta = float(params.get("rope_theta", registry.DEFAULT_ROPE_THETA))
            freqs = 1.0 / (theta ** (torch.arange(0, hd, 2).float() / hd))
            rope_freqs = freqs.to(reader.slices["model.embed_tokens.weight"].dtype)
        for s in range(lay.n):
            layout, produce = _meta_shard(s, lay, cfg["num_hidden_layers"], reader, rope_freqs)
            _save(staging / f"consolidated.{s:02d}.pth", layout, produce)
    finally:
        reader.close()
    (staging / "params.json").write_text(json.dumps(params))
    for cand in ([tokenizer] if tokenizer else []) + [hf_dir / "tokenizer.model", hf_dir / "original" / "tokenizer.model"]:
        if cand.is_file():
            shutil.copy(cand, staging / "tokenizer.model")
            break
    else:
        notes.append("no tokenizer.model in the HF folder: copy Meta's tokenizer.model next to the shards")


