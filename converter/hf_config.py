"""config.json and generation_config.json, written the way Meta's official HF repos have them.

The official file of the matched release (llama_parity/releases/official/<id>/, recorded facts) is the template:
it fixes which keys exist and the sampling defaults. Every architecture value is computed from the
detected `Variant`, never copied, and tests compare the result with the official file, so a wrong
rope factor, eos list or head count cannot pass. Token ids are taken from the template by meaning:
Llama 3 special tokens sit right after the BPE ranks, so an id is re-based onto the actual
tokenizer (the same for real tokenizers, shifted for the tiny test tokenizers).

Written in the official format (`rope_theta` + `rope_scaling`, `torch_dtype`), which transformers
4.43+ and 5.x both read; transformers 5's own `rope_parameters` format is not readable by 4.x.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llama_parity import releases as registry
from llama_parity.releases import official_file

from .detect import Variant

# Keys that record who wrote a file, not what the model is.
STAMP_KEYS = ("_name_or_path", "transformers_version", "torch_dtype")

_REAL_LLAMA3_WORDS = 128256


def template_id(variant: Variant) -> str:
    """The official files this conversion follows: the detected release's, or its base/instruct
    twin's when --instruct/--base asked for the other (everything that differs between the two,
    eos ids and generation defaults, comes from there), or the family's representative."""
    spec = registry.get(variant.registry_id) if variant.registry_id else None
    # The MP16 layout is the same HF model as the MP8 one.
    return registry.metadata_release(spec, variant.family, variant.instruct).id.replace("-mp16", "")


def _rebase(ids, vocab_size: int):
    """Map an official token id onto this checkpoint's tokenizer (Llama 3 specials follow the ranks)."""
    shift = vocab_size - _REAL_LLAMA3_WORDS

    def one(i: int) -> int:
        return i + shift if i >= 128000 else i

    return [one(i) for i in ids] if isinstance(ids, list) else (None if ids is None else one(ids))


def _transformers_version() -> str:
    """The installed transformers' version, read from package metadata (importing it costs ~1 s)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformers")
    except PackageNotFoundError:
        return "unknown"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def build_config(variant: Variant, dtype: torch.dtype) -> dict:
    tpl = official_file(template_id(variant), "config.json")
    rs = variant.rope_scaling
    values = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": variant.dim,
        "intermediate_size": variant.intermediate_size,
        "num_attention_heads": variant.n_heads,
        "num_hidden_layers": variant.n_layers,
        "num_key_value_heads": variant.hf_num_kv_heads,
        "head_dim": variant.head_dim,
        "rms_norm_eps": variant.norm_eps,
        "vocab_size": variant.vocab_size,
        "max_position_embeddings": variant.max_position_embeddings,
        "max_sequence_length": variant.max_position_embeddings,
        "tie_word_embeddings": variant.tie_word_embeddings,
        "rope_scaling": None if rs is None else {
            "factor": rs.factor, "low_freq_factor": rs.low_freq_factor, "high_freq_factor": rs.high_freq_factor,
            "original_max_position_embeddings": rs.original_max_position_embeddings, "rope_type": "llama3"},
        # Code Llama's official config writes the integer 1000000; the others a float.
        "rope_theta": int(variant.rope_theta) if isinstance(tpl.get("rope_theta"), int) else variant.rope_theta,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "bos_token_id": _rebase(tpl.get("bos_token_id"), variant.vocab_size),
        "eos_token_id": _rebase(tpl.get("eos_token_id"), variant.vocab_size),
        "torch_dtype": _dtype_name(dtype),
        "use_cache": True,
    }
    if isinstance(tpl.get("rope_scaling"), dict) and rs is not None:
        # keep the template's key order inside rope_scaling (it differs between releases)
        values["rope_scaling"] = {k: values["rope_scaling"][k] for k in tpl["rope_scaling"]}
    out = {}
    for key, official_value in tpl.items():
        if key == "_name_or_path":
            continue
        if key == "transformers_version":
            out[key] = _transformers_version()
        else:
            # initializer_range, pretraining_tp, pad_token_id: fixed facts of the release
            out[key] = values.get(key, official_value)
    if "head_dim" not in tpl and variant.head_dim * variant.n_heads != variant.dim:
        out["head_dim"] = variant.head_dim  # cannot happen for Meta shapes; never silently wrong
    # A custom shape may change what the release's template leaves to transformers' defaults
    # (GQA or another theta on a Llama 1/2 shape): write those values rather than lose them.
    for key, default in (("num_key_value_heads", variant.n_heads), ("rope_theta", 10000.0), ("rope_scaling", None)):
        if key not in out and values[key] != default:
            out[key] = values[key]
    return out


def build_generation_config(variant: Variant) -> dict:
    tpl = official_file(template_id(variant), "generation_config.json")
    out = {}
    for key, value in tpl.items():
        if key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            out[key] = _rebase(value, variant.vocab_size)
        elif key == "transformers_version":
            out[key] = _transformers_version()
        else:
            out[key] = value
    return out


def write_configs(out_dir: Path, variant: Variant, dtype: torch.dtype) -> None:
    (out_dir / "config.json").write_text(json.dumps(build_config(variant, dtype), indent=2) + "\n")
    (out_dir / "generation_config.json").write_text(json.dumps(build_generation_config(variant), indent=2) + "\n")
