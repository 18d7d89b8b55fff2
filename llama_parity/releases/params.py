"""What a params.json implies: the architecture (after Meta's FFN rounding), validated."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping


# --- what a params.json implies ------------------------------------------------------------------

# What a params.json without rope_theta means (Meta's ModelArgs default; Llama 1/2 files omit it).
DEFAULT_ROPE_THETA = 10000.0


class ParamsError(ValueError):
    """params.json cannot describe a Llama model (missing key, wrong type, impossible value)."""


@dataclass(frozen=True)
class Arch:
    """The function a params.json describes, after Meta's FFN rounding.

    Releases are matched on this, not on raw params: Llama 3 70B's multiple_of is quoted as both
    4096 and 1024 (same hidden size), and the first Llama 2 7B chat download said norm_eps 1e-06.
    norm_eps is not part of it: it is taken from the file, whatever the release.
    """

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int  # as stored (replicated kv heads counted)
    hidden: int  # the SwiGLU hidden size
    vocab_size: int | None  # None: from the tokenizer (params.json says -1 or nothing)
    rope_theta: float
    use_scaled_rope: bool

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def intermediate_size(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's SwiGLU hidden size: 2/3 of 4*dim, scaled, rounded up to a multiple of `multiple_of`."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def ffn_params_for(dim: int, hidden: int) -> tuple[int, float | None]:
    """The inverse of `intermediate_size`: a (multiple_of, ffn_dim_multiplier or None) that Meta's
    rounding turns back into `hidden` (the largest power-of-two multiple_of dividing it, up to
    4096; a multiplier only when the plain 8/3 rule misses). ValueError when none exists."""
    multiple_of = 1
    while multiple_of < 4096 and hidden % (multiple_of * 2) == 0:
        multiple_of *= 2
    if intermediate_size(dim, multiple_of, None) == hidden:
        return multiple_of, None
    mult = round(hidden / int(2 * (4 * dim) / 3), 6)
    while intermediate_size(dim, multiple_of, mult) < hidden:
        mult = round(mult + 1e-6, 6)
    while intermediate_size(dim, multiple_of, mult) > hidden:
        mult = round(mult - 1e-6, 6)
    if intermediate_size(dim, multiple_of, mult) != hidden:
        raise ValueError(f"cannot express intermediate_size {hidden} with Meta's FFN rounding")
    return multiple_of, mult


def _int(params: Mapping, key: str, default=None, *, minimum: int = 1) -> int:
    v = params.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ParamsError(f"{key} is {v!r}; it must be an integer")
    if v < minimum:
        raise ParamsError(f"{key} is {v}; it must be at least {minimum}")
    return v


def _number(params: Mapping, key: str, default=None) -> float | None:
    v = params.get(key, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ParamsError(f"{key} is {v!r}; it must be a positive number")
    return float(v)


# Keys of Meta's quantized and multimodal params.json: this converter handles dense text models.
_UNSUPPORTED_KEYS = ("quantization_args", "lora_args", "vision_chunk_size", "moe_args")


def implied_arch(params: Mapping) -> Arch:
    """Validate a params.json and return the architecture it implies; ParamsError names the key."""
    if not isinstance(params, Mapping):
        raise ParamsError("it is not a JSON object")
    for key in ("dim", "n_layers", "n_heads"):
        if key not in params:
            raise ParamsError(f"it lacks {key!r}")
    for key in _UNSUPPORTED_KEYS:
        if key in params:
            raise ParamsError(f"it has {key!r}: a quantized or multimodal checkpoint, not a dense Llama text model")
    dim, n_layers, n_heads = _int(params, "dim"), _int(params, "n_layers"), _int(params, "n_heads")
    n_kv = _int(params, "n_kv_heads", n_heads) if params.get("n_kv_heads") is not None else n_heads
    if dim % n_heads or (dim // n_heads) % 2:
        raise ParamsError(f"dim {dim} is not n_heads {n_heads} times an even head size")
    if n_heads % n_kv:
        raise ParamsError(f"n_heads {n_heads} is not a multiple of n_kv_heads {n_kv}")
    hidden = intermediate_size(dim, _int(params, "multiple_of", 256), _number(params, "ffn_dim_multiplier"))
    if hidden <= 0:
        raise ParamsError(f"ffn_dim_multiplier {params.get('ffn_dim_multiplier')!r} leaves no feed-forward hidden size")
    vocab = _int(params, "vocab_size", -1, minimum=-1)
    if vocab == 0:
        raise ParamsError("vocab_size is 0; it must be -1 (from the tokenizer) or the vocabulary size")
    _number(params, "norm_eps", 1e-5)
    _number(params, "rope_scaling_factor")
    scaled = params.get("use_scaled_rope", False)
    if not isinstance(scaled, bool):
        raise ParamsError(f"use_scaled_rope is {scaled!r}; it must be true or false")
    return Arch(dim, n_layers, n_heads, n_kv, hidden, vocab if vocab > 0 else None,
                _number(params, "rope_theta", DEFAULT_ROPE_THETA), scaled)


def norm_eps(params: Mapping) -> float:
    return float(params.get("norm_eps", 1e-5))
