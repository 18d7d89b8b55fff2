"""params.json bounded by what the shards hold, before anything is planned or built.

Planning and the checks iterate over layers and size buffers from params.json: a layer count of
10**9 grew the process past several GB within seconds (the kernel's OOM killer came). Each size is
compared with the tensors actually present, whose shapes come from the shards' headers (no data
read), so an absurd value is one line naming the key and what the files hold. Values that fit the
shards but are merely wrong are left to detection and the metadata checks, which say more.

Neutral code: the converter (before detection) and the judge (in its input checks) both call it.
"""

from __future__ import annotations

import re
from pathlib import Path

_LAYER = re.compile(r"^layers\.(\d+)\.")
# Sizes split across shards (vocabulary, FFN) are bounded by shard 0's part times this: more than any
# release's shard count (16), so a missing shard is still left to detection, which names the shapes.
_MAX_SHARDS = 64


def _int(params: dict, key: str) -> int | None:
    v = params.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def params_problem(params: dict, shapes: dict[str, tuple[int, ...]], where: str) -> str | None:
    """The first params.json value larger than the shards can hold, as one line; None when all fit.
    `shapes`: shard 0's tensor shapes (norms and layer counts are the same in every shard)."""
    held = {int(m.group(1)) for k in shapes if (m := _LAYER.match(k))}
    n_layers = _int(params, "n_layers")
    if n_layers is not None and n_layers > len(held):
        return (f"{where}: n_layers is {n_layers} but the shards hold {len(held)} layer(s); params.json does not "
                "describe these shards (re-download it, or fix n_layers)")
    norm = shapes.get("norm.weight")
    dim = _int(params, "dim")
    if dim is not None and norm and dim > norm[0] * _MAX_SHARDS:  # a smaller mismatch: detection names the shapes
        return f"{where}: dim is {dim} but the shards' norm.weight has {norm[0]} values; params.json does not match"
    if dim is not None and dim > 0:
        for key, most in (("n_heads", dim), ("n_kv_heads", _int(params, "n_heads") or dim)):
            v = _int(params, key)
            if v is not None and v > most:
                return f"{where}: {key} is {v}, more than {'dim' if key == 'n_heads' else 'n_heads'} ({most})"
    emb = shapes.get("tok_embeddings.weight")
    vocab = _int(params, "vocab_size")
    if vocab is not None and emb and len(emb) == 2 and vocab > max(emb) * _MAX_SHARDS:
        return (f"{where}: vocab_size is {vocab}, impossible for shards whose embedding is {list(emb)}; "
                "params.json does not match")
    w1 = shapes.get("layers.0.feed_forward.w1.weight")
    multiple_of, mult = _int(params, "multiple_of"), params.get("ffn_dim_multiplier")
    if w1 and len(w1) == 2:
        most = w1[0] * _MAX_SHARDS  # Meta's FFN size is a multiple of multiple_of and above 2 * dim * multiplier
        if multiple_of is not None and multiple_of > most:
            return (f"{where}: multiple_of is {multiple_of}, larger than any FFN size shards whose w1 has {w1[0]} "
                    "rows can hold; params.json does not match")
        if dim and isinstance(mult, (int, float)) and not isinstance(mult, bool) and 2 * dim * mult > most:
            return (f"{where}: ffn_dim_multiplier is {mult}, which gives an FFN size beyond what shards whose w1 "
                    f"has {w1[0]} rows can hold; params.json does not match")
    return None


def meta_dir_problem(meta_dir: Path) -> str | None:
    """params_problem for a checkpoint folder: params.json and shard 0's header (torch's memory map with
    weights_only: shapes only, no data, no code run). None also when the files cannot be read: their
    own checks name that."""
    import json

    import torch

    shards = sorted(Path(meta_dir).glob("consolidated.*.pth"))
    try:
        params = json.loads((Path(meta_dir) / "params.json").read_text())
        sd = torch.load(shards[0], map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # noqa: BLE001 - unreadable input is reported by the folder checks, by name
        return None
    if not isinstance(params, dict) or not isinstance(sd, dict):
        return None
    shapes = {k: tuple(t.shape) for k, t in sd.items() if isinstance(t, torch.Tensor)}
    return params_problem(params, shapes, str(Path(meta_dir) / "params.json"))
