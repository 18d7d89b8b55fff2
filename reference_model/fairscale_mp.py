"""Meta's model run the way Meta ran it: one process per shard group, fairscale's model-parallel layers.

`reference_model.model.Transformer` emulates model parallelism in one process; this module is the
real thing: each rank loads only its own `consolidated.NN.pth` files into fairscale's
ParallelEmbedding / VocabParallelEmbedding, ColumnParallelLinear and RowParallelLinear, and the
collectives do the merging (gloo on CPU, NCCL on GPUs). It judges the emulation (and through it the
converter's merging) with nothing shared but the math helpers, and it is the reference side of
`verify` across processes (llama_parity/distributed.py).

Shard groups: with S shard files and a model-parallel world of N ranks, N divides S or is a
multiple of it. N dividing S: rank r holds shards r*S/N .. (r+1)*S/N - 1 concatenated on each
tensor's split dim (consecutive shards of a column- or row-parallel layer are one contiguous slice,
exactly what fairscale gives rank r of N). S dividing N: each shard is cut into N/S contiguous
pieces of whole heads. Kv heads that Meta replicated across shards (MP16 405B) stay replicated
inside a group, and kv heads fewer than the pieces are replicated the same way: each copy serves
the query heads it served in the original layout.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile
from datetime import timedelta
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llama_parity.formats.pth import load_state_dict

from .model import (KVCache, ModelArgs, RopeScalingArgs, Transformer, apply_rotary, find_shards, repeat_kv,
                    rms_norm, rope_rotations)

# How fairscale splits each weight of Meta's model: 0 column-parallel, 1 row-parallel, absent: replicated.
_SPLIT_DIM = {"attention.wq": 0, "attention.wk": 0, "attention.wv": 0, "attention.wo": 1,
              "feed_forward.w1": 0, "feed_forward.w3": 0, "feed_forward.w2": 1, "output": 0}


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
    def __init__(self, a: ModelArgs, mp: int, n_local_kv: int):
        super().__init__()
        from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear

        self.a, self.n_local_heads, self.n_local_kv = a, a.n_heads // mp, n_local_kv
        hd, kv_rows = a.head_dim, n_local_kv * mp * a.head_dim
        self.wq = ColumnParallelLinear(a.dim, a.n_heads * hd, bias=False, gather_output=False, init_method=_no_init)
        self.wk = ColumnParallelLinear(a.dim, kv_rows, bias=False, gather_output=False, init_method=_no_init)
        self.wv = ColumnParallelLinear(a.dim, kv_rows, bias=False, gather_output=False, init_method=_no_init)
        self.wo = RowParallelLinear(a.n_heads * hd, a.dim, bias=False, input_is_parallel=True, init_method=_no_init)

    def forward(self, x, rot, mask, cache, start_pos: int):
        b, s, hd = x.shape[0], x.shape[1], self.a.head_dim
        q = apply_rotary(self.wq(x).view(b, s, self.n_local_heads, hd), rot)
        k = apply_rotary(self.wk(x).view(b, s, self.n_local_kv, hd), rot)
        v = self.wv(x).view(b, s, self.n_local_kv, hd)
        if cache is not None:  # Meta's cache: written at start_pos.., read from 0
            kv, layer = cache
            k, v = kv.write(layer, 0, start_pos, k, v)
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
    def __init__(self, a: ModelArgs, mp: int, n_local_kv: int):
        super().__init__()
        self.attention, self.feed_forward = _Attention(a, mp, n_local_kv), _FeedForward(a)
        self.attention_norm, self.ffn_norm = _RMSNorm(a.dim, a.norm_eps), _RMSNorm(a.dim, a.norm_eps)


class FairscaleTransformer(nn.Module):
    """Module names equal Meta's checkpoint keys, so a shard group loads with strict=True.

    Speaks the same interface as `model.Transformer` (forward with start_pos / positions / trace /
    cache, new_cache, generate_greedy), so parity.py's checks run on it unchanged; every rank
    calls it with the same tokens and gets the same full logits (the output layer gathers)."""

    def __init__(self, a: ModelArgs, mp: int, vocab_parallel_embedding: bool, n_local_kv: int | None = None):
        super().__init__()
        from fairscale.nn.model_parallel.layers import (ColumnParallelLinear, ParallelEmbedding,
                                                        VocabParallelEmbedding)

        emb = VocabParallelEmbedding if vocab_parallel_embedding else ParallelEmbedding
        self.a, self.args, self.mp = a, a, mp
        self.n_local_kv = n_local_kv or a.n_kv_heads // mp
        self.tok_embeddings = emb(a.vocab_size, a.dim, init_method=_no_init)
        self.layers = nn.ModuleList(_Block(a, mp, self.n_local_kv) for _ in range(a.n_layers))
        self.norm = _RMSNorm(a.dim, a.norm_eps)
        self.output = ColumnParallelLinear(a.dim, a.vocab_size, bias=False, init_method=_no_init)

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def new_cache(self, max_batch: int, max_seq_len: int) -> KVCache:
        """An empty KV cache for one decoding: this rank's kv heads of every layer."""
        shape = (max_batch, max_seq_len, self.n_local_kv, self.a.head_dim)
        return KVCache.empty(self.a.n_layers, 1, shape, self.dtype, self.device)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: int = 0, trace: list | None = None,
                positions: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        tokens = tokens.to(self.device)
        s = tokens.shape[1]
        h = self.tok_embeddings(tokens)
        if trace is not None:
            trace.append(("embedding", h))
        if positions is None:
            positions = torch.arange(start_pos, start_pos + s, device=self.device)
        elif cache is not None:
            raise ValueError("explicit positions are for cache-less passes")
        rot = rope_rotations(self.a, positions.to(self.device))
        causal = torch.triu(torch.full((s, s), float("-inf"), device=self.device), 1)
        mask = (causal if cache is None else cache.mask(s, start_pos)).type_as(h)
        for i, layer in enumerate(self.layers):
            att = layer.attention(layer.attention_norm(h), rot, mask, None if cache is None else (cache, i), start_pos)
            h = h + att
            ff = layer.feed_forward(layer.ffn_norm(h))
            h = h + ff
            if trace is not None:
                trace += [(f"layer {i} attention", att), (f"layer {i} feed-forward", ff)]
        return self.output(self.norm(h)).float()

    generate_greedy = Transformer.generate_greedy  # the same loop over this class's forward and cache


def _split_dim(key: str, embedding_dim: int) -> int | None:
    if key.startswith("tok_embeddings."):
        return embedding_dim
    name = key.removesuffix(".weight")
    if name.startswith("layers."):
        name = name.split(".", 2)[2]
    return _SPLIT_DIM.get(name)


def _piece(key: str, t: torch.Tensor, dim: int | None, k: int, j: int, head_dim: int) -> torch.Tensor:
    """Piece j of k of one shard's tensor: contiguous on its split dim, whole heads only. Kv heads
    fewer than the pieces are replicated, each piece keeping the one its query heads use (as Meta
    replicated them across the shards of MP16)."""
    if dim is None or k == 1:
        return t
    if key.endswith(("attention.wk.weight", "attention.wv.weight")):
        heads = t.shape[0] // head_dim
        if heads % k and k % heads:
            raise ValueError(f"{key}: {heads} kv head(s) per shard cannot be shared by {k} ranks")
        if k % heads == 0:
            h = j * heads // k
            return t[h * head_dim:(h + 1) * head_dim]
    elif key.endswith(("attention.wq.weight", "attention.wo.weight")) and (t.shape[dim] // head_dim) % k:
        raise ValueError(f"{key}: {t.shape[dim] // head_dim} heads per shard cannot be split over {k} ranks")
    if t.shape[dim] % k:
        raise ValueError(f"{key}: {t.shape[dim]} rows per shard cannot be split over {k} ranks")
    return t.chunk(k, dim)[j]


def load_shard_group(meta_dir: str | Path, rank: int, world: int, embedding_dim: int,
                     head_dim: int) -> dict[str, torch.Tensor]:
    """Rank `rank` of `world`'s slice of every tensor (fairscale's rank r of N): with S shards and N
    dividing S, its S/N consecutive shards joined on the split dims; with S dividing N, piece
    r mod (N/S) of shard r // (N/S). Replicated tensors (norms) come from the first shard read."""
    paths = find_shards(Path(meta_dir))
    if len(paths) % world and world % len(paths):
        raise ValueError(f"{len(paths)} shard files cannot be split over {world} ranks "
                         "(the rank count must divide the shard count or be a multiple of it)")
    g, k = max(1, len(paths) // world), max(1, world // len(paths))
    first = rank // k * g
    group = []
    for p in paths[first:first + g]:  # a damaged file: a FormatError (OSError) of one line naming it
        group.append(load_state_dict(p))
    sd = {}
    for key, t in group[0].items():
        dim = _split_dim(key, embedding_dim)
        t = t if g == 1 or dim is None else torch.cat([s[key] for s in group], dim=dim)
        sd[key] = _piece(key, t, dim, k, rank % k, head_dim)
    sd.pop("rope.freqs", None)
    if "output.weight" not in sd:  # tied checkpoints may omit it: the output is the (vocab-parallel) embedding
        sd["output.weight"] = sd["tok_embeddings.weight"]
    return sd


def build_rank_model(meta_dir: str | Path, args: ModelArgs, rank: int, world: int, *, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32) -> FairscaleTransformer:
    """This rank's part of Meta's model; fairscale's model parallel groups must be initialised."""
    first = load_state_dict(find_shards(Path(meta_dir))[0])
    n_shards = len(find_shards(Path(meta_dir)))
    # ParallelEmbedding (Llama 1/2) splits the hidden dim; VocabParallelEmbedding (Llama 3) the vocab.
    # One shard cut for several ranks: either gives the same function; the vocab split is used.
    embedding_dim = 1 if n_shards > 1 and first["tok_embeddings.weight"].shape[1] != args.dim else 0
    sd = load_shard_group(meta_dir, rank, world, embedding_dim, args.head_dim)
    n_local_kv = sd["layers.0.attention.wk.weight"].shape[0] // args.head_dim
    model = FairscaleTransformer(args, world, embedding_dim == 0, n_local_kv)
    model.load_state_dict(sd, strict=True)  # copies into this rank's parameters, one tensor at a time
    del sd
    return model.to(device=device, dtype=dtype).eval()


def reference_args(meta_dir: str | Path, rope_scaling: RopeScalingArgs | None, vocab_size: int | None = None) -> ModelArgs:
    meta_dir = Path(meta_dir)
    params = json.loads((meta_dir / "params.json").read_text())
    if vocab_size is None and int(params.get("vocab_size", -1)) == -1:
        # Embedding split on the hidden dim (Llama 1/2): every shard has all vocab rows.
        first = load_state_dict(find_shards(meta_dir)[0])
        vocab_size = first["tok_embeddings.weight"].shape[0]
    return ModelArgs.from_params(params, vocab_size=vocab_size, rope_scaling=rope_scaling)


def init_model_parallel(world: int, timeout: timedelta | None = None) -> None:
    """fairscale's groups, with `timeout` on their collectives: fairscale creates them without one,
    which torch turns into 30 minutes, however short the default group's timeout is."""
    import torch.distributed as dist
    from fairscale.nn.model_parallel.initialize import initialize_model_parallel

    new_group = dist.new_group
    if timeout is not None:
        dist.new_group = lambda *a, **kw: new_group(*a, **{"timeout": timeout, **kw})
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # fairscale prints its group sizes
            initialize_model_parallel(world)
    finally:
        dist.new_group = new_group


def _worker(rank: int, world: int, store: str, meta_dir: str, args: ModelArgs, tokens: list[int], out_path: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    # A file store: no port to pick, so no race with other processes for one.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        init_model_parallel(world)
        logits = build_rank_model(meta_dir, args, rank, world)(torch.tensor([tokens]))
        if rank == 0:
            torch.save(logits, out_path)
        # Leave together: a rank tearing gloo down while its peer is still finishing its last
        # collective can abort the peer (seen once under heavy load as a SIGABRT).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def fairscale_logits(meta_dir: str | Path, tokens: list[int], *, rope_scaling: RopeScalingArgs | None,
                     vocab_size: int | None = None, world: int | None = None) -> torch.Tensor:
    """Logits of Meta's model over its unmerged shards, one gloo process per shard group (fp32, CPU)."""
    import torch.multiprocessing as mp

    args = reference_args(meta_dir, rope_scaling, vocab_size)
    world = world or len(find_shards(Path(meta_dir)))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "logits.pt")
        mp.spawn(_worker, args=(world, os.path.join(tmp, "store"), str(meta_dir), args, tokens, out),
                 nprocs=world, join=True)
        return torch.load(out, weights_only=True)[0]
