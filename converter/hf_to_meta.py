"""HF -> Meta: the inverse plan, so a model can go back to Meta's format (and round trips prove both).

Every step is the inverse of the Meta -> HF step beside it in transforms.py: q/k rows back to
interleaved rotary pairs, kv heads replicated when shards outnumber them, tensors cut into
model-parallel shards along each family's dims. params.json comes from the registry when the
config is a known release, otherwise it is reconstructed so that Meta's FFN rounding gives the
same hidden size. Memory: one output shard at a time (torch.save writes a whole state dict).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from llama_parity.fixtures import variants as registry
from llama_parity.fixtures.variants import FAMILY_FACTS, intermediate_size

from .convert import _commit_output, _prepare_output
from .errors import ConversionError
from .keymap import rule_for_hf_key
from .safetensors_writer import iter_hf_tensors, read_index
from .transforms import replicate_heads, split_shards, unpermute_from_hf_rotary


@dataclass
class HFToMetaReport:
    output_dir: Path
    num_shards: int
    params: dict
    family: str
    notes: list[str]


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
    multiple_of = 1
    while multiple_of < 4096 and hidden % (multiple_of * 2) == 0:
        multiple_of *= 2
    params["multiple_of"] = multiple_of
    if intermediate_size(dim, multiple_of, None) != hidden:
        base = int(2 * (4 * dim) / 3)
        mult = round(hidden / base, 6)
        while intermediate_size(dim, multiple_of, mult) < hidden:
            mult = round(mult + 1e-6, 6)
        while intermediate_size(dim, multiple_of, mult) > hidden:
            mult = round(mult - 1e-6, 6)
        if intermediate_size(dim, multiple_of, mult) != hidden:
            raise ConversionError(f"cannot express intermediate_size {hidden} with Meta's FFN rounding")
        params["ffn_dim_multiplier"] = mult
    params["norm_eps"] = cfg.get("rms_norm_eps", 1e-5)
    if family.startswith("llama3") or family == "llama-guard-3":
        params["vocab_size"] = cfg["vocab_size"]
    else:
        params["vocab_size"] = -1  # Llama 1/2 convention: the tokenizer decides
    theta = cfg.get("rope_theta")
    if theta is not None and float(theta) != 10000.0:
        params["rope_theta"] = theta
    if family in ("llama3.1", "llama3.2"):
        params["use_scaled_rope"] = True
    notes.append("shape not in the registry: params.json reconstructed from config.json")
    return params, num_shards or 1


def convert_hf_to_meta(hf_dir: str | Path, output_dir: str | Path, *, num_shards: int | None = None,
                       overwrite: bool = False, tokenizer: str | Path | None = None) -> HFToMetaReport:
    hf_dir, output_dir = Path(hf_dir), Path(output_dir)
    if not (hf_dir / "config.json").is_file():
        raise ConversionError(f"config.json missing in {hf_dir}: not a Hugging Face model folder")
    cfg = json.loads((hf_dir / "config.json").read_text())
    if cfg.get("model_type") != "llama":
        raise ConversionError(f"{hf_dir} holds a {cfg.get('model_type')!r} model, not llama")
    try:
        read_index(hf_dir)
    except FileNotFoundError as e:
        raise ConversionError(str(e)) from None
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
    emb_dim = FAMILY_FACTS[family].embedding_shard_dim

    staging = _prepare_output(output_dir, overwrite)
    try:
        shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
        embed = None
        for name, t in iter_hf_tensors(hf_dir):
            rule, layer = rule_for_hf_key(name)
            key = rule.meta if layer is None else rule.meta.format(i=layer)
            if rule.rotary == "q":
                t = unpermute_from_hf_rotary(t, heads)
            elif rule.rotary == "k":
                t = replicate_heads(unpermute_from_hf_rotary(t, kv), kv, rep)
            elif key.endswith("attention.wv.weight"):
                t = replicate_heads(t, kv, rep)
            split = emb_dim if rule.split == "embedding" else rule.split
            pieces = [t.contiguous()] * n if split is None else split_shards(t, n, split)
            for s, piece in enumerate(pieces):
                shards[s][key] = piece.clone() if split is None else piece
            if key == "tok_embeddings.weight":
                embed = t
        if "output.weight" not in shards[0]:
            # Meta's files always carry output.weight; a tied model stores the embedding again.
            for s, piece in enumerate(split_shards(embed, n, 0)):
                shards[s]["output.weight"] = piece.clone()
        if FAMILY_FACTS[family].has_rope_freqs_key:
            hd = cfg["hidden_size"] // heads
            theta = float(params.get("rope_theta", 10000.0))
            freqs = 1.0 / (theta ** (torch.arange(0, hd, 2).float() / hd))
            for sd in shards:
                sd["rope.freqs"] = freqs.to(embed.dtype)
        for s, sd in enumerate(shards):
            torch.save(sd, staging / f"consolidated.{s:02d}.pth")
        (staging / "params.json").write_text(json.dumps(params))
        for cand in ([Path(tokenizer)] if tokenizer else []) + [hf_dir / "tokenizer.model",
                                                               hf_dir / "original" / "tokenizer.model"]:
            if cand.is_file():
                shutil.copy(cand, staging / "tokenizer.model")
                break
        else:
            notes.append("no tokenizer.model in the HF folder: copy Meta's tokenizer.model next to the shards")
        _commit_output(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return HFToMetaReport(output_dir, n, params, family, notes)
