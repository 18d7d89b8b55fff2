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


class ReadBuffers:
    """Buffers that a side's layer reads fill, reused once nothing references them any more.

    Why: with return_freed_memory's policy every large tensor is a fresh mapping, so a layer read
    into new tensors pays a page fault per 4 KB page (and the kernel zeroes each page) before the
    copy: measured on the 1B shape's shard from the page cache, 0.7-1.0 GB/s into fresh tensors
    against 2.4-3.4 GB/s into reused ones. (Greedy decoding's extra passes map their layers instead:
    Transformer.map_layer, no copy at all.)

    A buffer is reused only when its storage has no user but this pool (PyTorch's storage use count:
    every tensor viewing it, wherever it went, holds one), so a layer still in use is never
    overwritten; where that count is not available, every take is a fresh buffer. At most `keep`
    buffers are kept (prefetching needs two: the layer in use and the one being read); one taken
    while all are in use is fresh and not kept, so peak memory is what fresh reads would use.
    """

    def __init__(self, keep: int = 2):
        import threading

        self.keep = keep
        self._bufs: list = []
        self._lock = threading.Lock()

    @staticmethod
    def _users(buf) -> int | None:
        count = getattr(__import__("torch")._C, "_storage_Use_Count", None)
        return None if count is None else count(buf.untyped_storage()._cdata)

    def take(self, nbytes: int):
        """A uint8 tensor of `nbytes` bytes that nothing else uses."""
        import torch

        with self._lock:
            for k, (buf, idle) in enumerate(self._bufs):
                if self._users(buf) == idle:
                    if buf.numel() < nbytes:  # a bigger layer (none in Llama, but never assume)
                        buf = torch.empty(nbytes, dtype=torch.uint8)
                        self._bufs[k] = (buf, self._users(buf))
                    return buf[:nbytes]
            buf = torch.empty(nbytes, dtype=torch.uint8)
            idle = self._users(buf)
            if idle is not None and len(self._bufs) < self.keep:
                self._bufs.append((buf, idle))
            return buf[:nbytes]

    def tensors(self, specs: list[tuple[str, tuple[int, ...], object]]) -> dict:
        """Empty tensors (name -> tensor of shape and dtype) carved from one taken buffer, each
        64-byte aligned."""
        import torch

        offsets, total = [], 0
        for _name, shape, dtype in specs:
            offsets.append(total)
            n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            total += -(-n // 64) * 64
        buf = self.take(total)
        out = {}
        for (name, shape, dtype), at in zip(specs, offsets):
            n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            out[name] = buf[at:at + n].view(dtype).view(shape)
        return out
