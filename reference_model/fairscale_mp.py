"""Meta's model run the way Meta ran it: one process per shard, fairscale's model-parallel layers.

`reference_model.model.Transformer` emulates model parallelism in one process; this module is the
real thing, on CPU with the gloo backend over loopback: each rank loads only its own
`consolidated.NN.pth` into fairscale's ParallelEmbedding / VocabParallelEmbedding,
ColumnParallelLinear and RowParallelLinear, and the collectives do the merging. It judges the
emulation (and through it the converter's merging) with nothing shared but the math helpers.
Slow to start (a process per shard), so the tests use it on a few layouts only.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import socket
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .model import ModelArgs, RopeScalingArgs, apply_rotary, repeat_kv, rms_norm, rope_rotations


class _RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def _no_init(w: torch.Tensor) -> torch.Tensor:
    return w  # weights come from the checkpoint


class _Attention(nn.Module):
    def __init__(self, a: ModelArgs, mp: int):
        super().__init__()
        from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear

        self.a, self.n_local_heads, self.n_local_kv = a, a.n_heads // mp, a.n_kv_heads // mp
        hd = a.head_dim
        self.wq = ColumnParallelLinear(a.dim, a.n_heads * hd, bias=False, gather_output=False, init_method=_no_init)
        self.wk = ColumnParallelLinear(a.dim, a.n_kv_heads * hd, bias=False, gather_output=False, init_method=_no_init)
        self.wv = ColumnParallelLinear(a.dim, a.n_kv_heads * hd, bias=False, gather_output=False, init_method=_no_init)
        self.wo = RowParallelLinear(a.n_heads * hd, a.dim, bias=False, input_is_parallel=True, init_method=_no_init)

    def forward(self, x, rot, mask):
        b, s, hd = x.shape[0], x.shape[1], self.a.head_dim
        q = apply_rotary(self.wq(x).view(b, s, self.n_local_heads, hd), rot)
        k = apply_rotary(self.wk(x).view(b, s, self.n_local_kv, hd), rot)
        v = self.wv(x).view(b, s, self.n_local_kv, hd)
        rep = self.n_local_heads // self.n_local_kv
        q, k, v = q.transpose(1, 2), repeat_kv(k, rep).transpose(1, 2), repeat_kv(v, rep).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(hd) + mask
        o = torch.matmul(F.softmax(scores.float(), dim=-1).type_as(q), v)
        return self.wo(o.transpose(1, 2).reshape(b, s, -1))


class _FeedForward(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear

        h = a.ffn_hidden_dim
        self.w1 = ColumnParallelLinear(a.dim, h, bias=False, gather_output=False, init_method=_no_init)
        self.w2 = RowParallelLinear(h, a.dim, bias=False, input_is_parallel=True, init_method=_no_init)
        self.w3 = ColumnParallelLinear(a.dim, h, bias=False, gather_output=False, init_method=_no_init)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class _Block(nn.Module):
    def __init__(self, a: ModelArgs, mp: int):
        super().__init__()
        self.attention, self.feed_forward = _Attention(a, mp), _FeedForward(a)
        self.attention_norm, self.ffn_norm = _RMSNorm(a.dim, a.norm_eps), _RMSNorm(a.dim, a.norm_eps)

    def forward(self, x, rot, mask):
        h = x + self.attention(self.attention_norm(x), rot, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class FairscaleTransformer(nn.Module):
    """Module names equal Meta's checkpoint keys, so a shard loads with strict=True."""

    def __init__(self, a: ModelArgs, mp: int, vocab_parallel_embedding: bool):
        super().__init__()
        from fairscale.nn.model_parallel.layers import (ColumnParallelLinear, ParallelEmbedding,
                                                        VocabParallelEmbedding)

        emb = VocabParallelEmbedding if vocab_parallel_embedding else ParallelEmbedding
        self.a = a
        self.tok_embeddings = emb(a.vocab_size, a.dim, init_method=_no_init)
        self.layers = nn.ModuleList(_Block(a, mp) for _ in range(a.n_layers))
        self.norm = _RMSNorm(a.dim, a.norm_eps)
        self.output = ColumnParallelLinear(a.dim, a.vocab_size, bias=False, init_method=_no_init)

    @torch.inference_mode()
    def forward(self, tokens):
        s = tokens.shape[1]
        h = self.tok_embeddings(tokens)
        rot = rope_rotations(self.a, torch.arange(s))
        mask = torch.triu(torch.full((s, s), float("-inf")), 1)
        for layer in self.layers:
            h = layer(h, rot, mask)
        return self.output(self.norm(h)).float()


def _worker(rank: int, world: int, port: int, meta_dir: str, args: ModelArgs, vocab_parallel: bool,
            tokens: list[int], out_path: str) -> None:
    import torch.distributed as dist
    from fairscale.nn.model_parallel.initialize import initialize_model_parallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # fairscale prints its group sizes
            initialize_model_parallel(world)
        model = FairscaleTransformer(args, world, vocab_parallel)
        sd = torch.load(Path(meta_dir) / f"consolidated.{rank:02d}.pth", map_location="cpu", weights_only=True)
        sd.pop("rope.freqs", None)
        if "output.weight" not in sd:  # tied checkpoints may omit it: the output is the embedding
            sd["output.weight"] = sd["tok_embeddings.weight"]
        model.load_state_dict(sd, strict=True)
        logits = model(torch.tensor([tokens]))
        if rank == 0:
            torch.save(logits, out_path)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fairscale_logits(meta_dir: str | Path, tokens: list[int], *, rope_scaling: RopeScalingArgs | None,
                     vocab_size: int | None = None) -> torch.Tensor:
    """Logits of Meta's model over its unmerged shards, one gloo process per shard (fp32, CPU)."""
    import torch.multiprocessing as mp

    meta_dir = Path(meta_dir)
    params = json.loads((meta_dir / "params.json").read_text())
    shards = sorted(meta_dir.glob("consolidated.*.pth"))
    first = torch.load(shards[0], map_location="cpu", mmap=True, weights_only=True)
    if vocab_size is None and int(params.get("vocab_size", -1)) == -1:
        # Embedding split on the hidden dim (Llama 1/2): every shard has all vocab rows.
        vocab_size = first["tok_embeddings.weight"].shape[0]
    args = ModelArgs.from_params(params, vocab_size=vocab_size, rope_scaling=rope_scaling)
    vocab_parallel = first["tok_embeddings.weight"].shape[1] == args.dim and len(shards) > 1
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "logits.pt")
        mp.spawn(_worker, args=(len(shards), _free_port(), str(meta_dir), args, vocab_parallel, tokens, out),
                 nprocs=len(shards), join=True)
        return torch.load(out, weights_only=True)[0]
