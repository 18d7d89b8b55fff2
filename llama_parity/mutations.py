"""A catalog of conversion bugs, applied to a correct HF directory, to prove the checks bite.

Each mutation reproduces a bug that has shipped (or easily would) in real conversions. The test
suite applies every one to fresh conversions and asserts that `verify` fails, and which check
catches it. Mutations edit the HF output (a copy), never the reference.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file


# The catalog keeps its own copies of the rotary row orders (not converter.transforms), so that a
# bug in the converter's permutation cannot make a mutation silently equal to the correct output.
def _rows_meta_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    o, i = w.shape
    return w.view(n_heads, o // n_heads // 2, 2, i).transpose(1, 2).reshape(o, i)


def _rows_hf_to_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    o, i = w.shape
    return w.view(n_heads, 2, o // n_heads // 2, i).transpose(1, 2).reshape(o, i)


def _edit_tensors(hf_dir: Path, edit: Callable[[str, torch.Tensor, dict], torch.Tensor | None]) -> None:
    cfg = json.loads((hf_dir / "config.json").read_text())
    for f in sorted(hf_dir.glob("*.safetensors")):
        sd = load_file(str(f))
        out = {}
        for k, v in sd.items():
            nv = edit(k, v, cfg)
            out[k] = v if nv is None else nv.contiguous()
        save_file(out, str(f), metadata={"format": "pt"})


def _edit_config(hf_dir: Path, edit: Callable[[dict], None]) -> None:
    p = hf_dir / "config.json"
    cfg = json.loads(p.read_text())
    edit(cfg)
    p.write_text(json.dumps(cfg, indent=2))


def _k_permuted_with_n_heads(hf_dir: Path) -> None:
    def edit(k, v, cfg):
        if k.endswith("k_proj.weight"):
            return _rows_meta_to_hf(_rows_hf_to_meta(v, cfg["num_key_value_heads"]), cfg["num_attention_heads"])
    _edit_tensors(hf_dir, edit)


def _q_not_permuted(hf_dir: Path) -> None:
    def edit(k, v, cfg):
        if k.endswith("q_proj.weight"):
            return _rows_hf_to_meta(v, cfg["num_attention_heads"])
    _edit_tensors(hf_dir, edit)


def _rope_factor(factor: float) -> Callable[[Path], None]:
    def mutate(hf_dir: Path) -> None:
        _edit_config(hf_dir, lambda c: c["rope_scaling"].__setitem__("factor", factor))
    return mutate


def _drop_rope_scaling(hf_dir: Path) -> None:
    _edit_config(hf_dir, lambda c: c.__setitem__("rope_scaling", None))


def _drop_rope_theta(hf_dir: Path) -> None:
    _edit_config(hf_dir, lambda c: c.pop("rope_theta", None))


def _swap_pair(hf_dir: Path, a: str, b: str) -> None:
    """Exchange every tensor named *a* with its twin named *b* (same layer)."""
    stash = {}

    def grab(k, v, cfg):
        if a in k or b in k:
            stash[k] = v
    _edit_tensors(hf_dir, grab)

    def swap(k, v, cfg):
        if a in k:
            return stash[k.replace(a, b)]
        if b in k:
            return stash[k.replace(b, a)]
    _edit_tensors(hf_dir, swap)


def _swap_gate_up(hf_dir: Path) -> None:
    _swap_pair(hf_dir, "mlp.gate_proj", "mlp.up_proj")


def _swap_norms(hf_dir: Path) -> None:
    _swap_pair(hf_dir, ".input_layernorm", ".post_attention_layernorm")


def _wrong_norm_eps(hf_dir: Path) -> None:
    _edit_config(hf_dir, lambda c: c.__setitem__("rms_norm_eps", 1e-6 if c["rms_norm_eps"] != 1e-6 else 1e-5))


def _untie_without_output(hf_dir: Path) -> None:
    # Forgetting tie_word_embeddings on a 3.2 model: transformers initialises lm_head randomly.
    _edit_config(hf_dir, lambda c: c.__setitem__("tie_word_embeddings", False))


@dataclass(frozen=True)
class Mutation:
    name: str
    bug: str
    applies: Callable[[dict], bool]
    apply: Callable[[Path], None]
    caught_by: tuple[str, ...]  # checks expected to fail (at least one of them)


def _gqa(c: dict) -> bool:
    # A silent bug only where the wrong head count still divides k's rows (else it crashes loudly).
    heads, kv = c["num_attention_heads"], c["num_key_value_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    return kv != heads and (kv * head_dim) % (2 * heads) == 0


def _scaled(c: dict) -> bool:
    return bool(c.get("rope_scaling"))


CATALOG: tuple[Mutation, ...] = (
    Mutation("k_permuted_with_n_heads", "wk permuted with n_heads instead of n_kv_heads (GQA models)", _gqa,
             _k_permuted_with_n_heads, ("logits (fp32)",)),
    Mutation("q_not_permuted", "wq left in Meta's interleaved rotary layout", lambda c: True,
             _q_not_permuted, ("logits (fp32)",)),
    Mutation("rope_factor_8_not_32", "Llama 3.2 rope scaling factor 8 instead of 32 (llama-models' hard-coded value)",
             lambda c: _scaled(c) and c["rope_scaling"]["factor"] == 32.0, _rope_factor(8.0),
             ("far positions", "config: rope scaling factor")),
    Mutation("rope_factor_32_not_8", "Llama 3.1 rope scaling factor 32 instead of 8",
             lambda c: _scaled(c) and c["rope_scaling"]["factor"] == 8.0, _rope_factor(32.0),
             ("far positions", "config: rope scaling factor")),
    Mutation("rope_scaling_dropped", "rope_scaling missing on a 3.1+ model", _scaled, _drop_rope_scaling,
             ("far positions", "config: rope scaling factor")),
    Mutation("rope_theta_dropped", "rope_theta missing (falls back to 10000)",
             lambda c: float(c.get("rope_theta", 10000.0)) != 10000.0, _drop_rope_theta,
             ("logits (fp32)", "config: rope_theta")),
    Mutation("gate_up_swapped", "w1/w3 mapped to up/gate the wrong way round", lambda c: True, _swap_gate_up,
             ("logits (fp32)",)),
    Mutation("norms_swapped", "attention_norm/ffn_norm mapped to the wrong HF norm", lambda c: True, _swap_norms,
             ("logits (fp32)",)),
    Mutation("wrong_norm_eps", "rms_norm_eps of another Llama version", lambda c: True, _wrong_norm_eps,
             ("config: rms_norm_eps",)),
    Mutation("untied_without_lm_head", "tie_word_embeddings lost on a tied model (random lm_head)",
             lambda c: bool(c.get("tie_word_embeddings")), _untie_without_output, ("logits (fp32)",)),
)

BY_NAME = {m.name: m for m in CATALOG}


def mutate_copy(hf_dir: Path, dst: Path, mutation: Mutation) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(hf_dir, dst)
    mutation.apply(dst)
    return dst
