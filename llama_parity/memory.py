"""Memory: what a verify of a model needs, and the allocator policy that keeps a streamed one bounded."""

from __future__ import annotations

import json
from pathlib import Path


def return_freed_memory() -> None:
    """Make glibc serve every allocation of 1 MB or more with its own mapping, returned to the system
    when freed. By default the threshold grows to 32 MB after the first large free, and the weight
    chunks below that are carved from the heap, which small tensors kept alive (logits, hidden
    states) then pin: measured on the 1B shape, +580 MB of RSS after one pass over the output matrix.
    At most two malloc arenas (threads share them)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (glibc); elsewhere there is no such call
        # M_ARENA_MAX: the passes run together through a layer (shared_products.py) are a dozen
        # threads; with an arena each, their freed small tensors stayed in RSS (+95 MB on the 1B shape)
        libc.mallopt(-8, 2)
    except (OSError, AttributeError):
        pass


def model_bytes_fp32(hf_dir: Path) -> int:
    cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    d, layers, v = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    kv = cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    hd = cfg.get("head_dim") or d // cfg["num_attention_heads"]
    per_layer = 2 * d * d + 2 * d * kv * hd + 3 * d * cfg["intermediate_size"]
    return 4 * (layers * per_layer + 2 * v * d)
