"""A minimal port of Meta's original Llama `model.py`: the judge the converted HF model is compared to.

The math follows Meta's code: RMSNorm in fp32, complex-number RoPE on interleaved pairs (with
Llama 3.1 frequency scaling, whose factor is an argument here, never hard-coded), grouped-query
attention with repeated kv heads, SwiGLU with Meta's hidden-size rounding, a KV cache addressed by
`start_pos`.

Model parallelism is computed the way fairscale's layers do it, in one process: every weight stays
in the shard it came from. Column-parallel layers (wq/wk/wv/w1/w3/output) produce their slice of
the output features and slices are concatenated; row-parallel layers (wo/w2) take their slice of
the input features and partial results are summed (fairscale's all-reduce); each shard attends with
its own local heads and uses its own copy of the replicated norms. So this module never merges
shards, and it never imports `converter/`: a merging bug in the converter cannot hide here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from llama_parity.formats.pth import PthReader, load_state_dict
from llama_parity.memory import ReadBuffers
from llama_parity import shared_products
from llama_parity.shared_products import piece_rows, product


# fp32 bytes of weight rows widened per product when reading lazily (see _Converted; 16 MB: 4 MB pieces ran
# the products up to 1.9x slower on an AVX-512 Xeon, measured in llama_parity/hf_layers.py's PIECE_BYTES)
PIECE_BYTES = 16 << 20
# One-row products (greedy decoding's passes) stream the weight through memory once: a piece small
# enough to stay in the CPU's cache between its widening and its product ran a pass 12-17% faster
# (2-core EPYC: 1B shape 0.345 s against 0.414 s, 8B shape 2.15-2.30 s against 2.46-2.61 s).
ONE_ROW_PIECE_BYTES = 8 << 20


@dataclass(frozen=True)
class RopeScalingArgs:
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    use_scaled_rope: bool = False
    rope_scaling: RopeScalingArgs | None = None

    @classmethod
    def from_params(cls, params: dict, *, vocab_size: int | None = None,
                    rope_scaling: RopeScalingArgs | None = None) -> "ModelArgs":
        """Read Meta's params.json keys. `vocab_size: -1` means "take it from the tokenizer"."""
        vs = int(params.get("vocab_size", -1))
        if vs == -1:
            if vocab_size is None:
                raise ValueError("params.json says vocab_size -1; pass the tokenizer's n_words")
            vs = vocab_size
        use_scaled = bool(params.get("use_scaled_rope", False))
        if use_scaled and rope_scaling is None:
            raise ValueError("use_scaled_rope is set: the scaling factor must come from the variant")
        return cls(
            dim=int(params["dim"]), n_layers=int(params["n_layers"]), n_heads=int(params["n_heads"]),
            n_kv_heads=int(params.get("n_kv_heads") or params["n_heads"]), vocab_size=vs,
            multiple_of=int(params.get("multiple_of", 256)),
            ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
            norm_eps=float(params.get("norm_eps", 1e-5)),
            rope_theta=float(params.get("rope_theta", 10000.0)),
            use_scaled_rope=use_scaled, rope_scaling=rope_scaling if use_scaled else None,
        )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """Per-pair rotation frequencies, with Llama 3.1 scaling when the checkpoint uses it."""
    d = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2)[: d // 2].float() / d))
    if args.rope_scaling is None:
        return freqs
    s = args.rope_scaling
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / freqs
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    scaled = torch.where(wavelen > low_wavelen, freqs / s.factor, freqs)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    band = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(band, (1 - smooth) * scaled / s.factor + smooth * scaled, scaled)


def rope_rotations(args: ModelArgs, positions: torch.Tensor) -> torch.Tensor:
    """complex64 (len(positions), head_dim/2): e^{i * pos * freq}."""
    angles = torch.outer(positions.float(), rope_frequencies(args))
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Meta's layout: consecutive pairs (x0, x1), (x2, x3), ... of each head are complex numbers."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    out = torch.view_as_real(xc * rot[None, :, None, :]).flatten(3)
    return out.type_as(x)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(bs, seq, n_kv, hd) -> (bs, seq, n_kv * n_rep, hd): kv head j serves query heads j*n_rep.."""
    if n_rep == 1:
        return x
    bs, slen, n_kv, hd = x.shape
    return x[:, :, :, None, :].expand(bs, slen, n_kv, n_rep, hd).reshape(bs, slen, n_kv * n_rep, hd)


@dataclass
class KVCache:
    """One decoding's keys and values (`k[layer][part]`, shape batch x positions x kv heads x head_dim)
    and which positions hold them. Given explicitly to each pass that uses it (`forward`, `begin`,
    `layer`); a pass without one is cache-less. Meta's cache is always filled contiguously from 0;
    a caller may also jump ahead (prefill at 0, then decode at position 12000) to test far relative
    distances: slots never written are masked out instead of being attended as zeros."""

    k: list[list[torch.Tensor]]
    v: list[list[torch.Tensor]]
    valid: torch.Tensor

    @classmethod
    def empty(cls, n_layers: int, parts: int, shape: tuple[int, ...], dtype: torch.dtype,
              device: torch.device) -> "KVCache":
        mk = lambda: [torch.zeros(shape, dtype=dtype, device=device) for _ in range(parts)]
        return cls([mk() for _ in range(n_layers)], [mk() for _ in range(n_layers)],
                   torch.zeros(shape[1], dtype=torch.bool, device=device))

    def mask(self, seqlen: int, start_pos: int) -> torch.Tensor:
        """Marks the slots this step fills; causal among the new tokens, earlier written slots visible."""
        self.valid[start_pos:start_pos + seqlen] = True
        device = self.valid.device
        mask = torch.zeros(seqlen, start_pos + seqlen, device=device)
        mask[:, :start_pos][:, ~self.valid[:start_pos]] = float("-inf")
        mask[:, start_pos:] = torch.triu(torch.full((seqlen, seqlen), float("-inf"), device=device), 1)
        return mask

    def write(self, layer: int, part: int, start_pos: int, k: torch.Tensor, v: torch.Tensor):
        """Store this step's keys and values; returns every position's so far."""
        ck, cv, b, end = self.k[layer][part], self.v[layer][part], k.shape[0], start_pos + k.shape[1]
        ck[:b, start_pos:end], cv[:b, start_pos:end] = k, v
        return ck[:b, :end], cv[:b, :end]


class Transformer:
    """Meta's Transformer over unmerged shards. `shards[s]` is shard s's state dict."""

    def __init__(self, args: ModelArgs, shards: list[dict[str, torch.Tensor]], *,
                 embedding_dim: int, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 lazy: bool = False, round_to: torch.dtype | None = None, piece_bytes: int = PIECE_BYTES,
                 round_vectors: bool = True):
        self.args = args
        self.mp = len(shards)
        self.embedding_dim = embedding_dim
        if args.n_heads % self.mp or args.n_kv_heads % self.mp:
            raise ValueError(f"{self.mp} shards cannot split {args.n_heads} heads / {args.n_kv_heads} kv heads")
        self.n_local_heads = args.n_heads // self.mp
        self.n_local_kv_heads = args.n_kv_heads // self.mp
        self.device = torch.device(device)
        self._read_buffers = ReadBuffers()
        first = shards[0].dtype("tok_embeddings.weight") if lazy else shards[0]["tok_embeddings.weight"].dtype
        self._dtype = dtype or first
        self.lazy = lazy
        if lazy:
            # Bounded memory for real weights: `shards` are ShardReaders; each tensor is read from the
            # file with explicit reads when a layer uses it (or held for one layer, `hold_layer`), in
            # the file's dtype; matrix products widen it chunk by chunk (_Converted.linear). The
            # embedding is read by row, the output matrix in vocab chunks.
            self.w = [_Converted(sd, self.device, self._dtype, round_to, piece_bytes, round_vectors) for sd in shards]
            self._conv = self.w[0].convert
        else:
            self._conv = _converter(self.device, dtype, round_to, round_vectors)
            self.w = [{k: self._conv(v) for k, v in sd.items() if k != "rope.freqs"} for sd in shards]

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def new_cache(self, max_batch: int, max_seq_len: int) -> KVCache:
        """An empty KV cache for one decoding, in this model's dtype (one part per shard)."""
        shape = (max_batch, max_seq_len, self.n_local_kv_heads, self.args.head_dim)
        return KVCache.empty(self.args.n_layers, self.mp, shape, self.dtype, self.device)

    # --- layers ---------------------------------------------------------------------------
    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.lazy:
            return self._embed_lazy(tokens)
        return self._embed_parts(tokens, [sd["tok_embeddings.weight"] for sd in self.w])

    def _embed_lazy(self, tokens: torch.Tensor) -> torch.Tensor:
        """Read only the rows the tokens use, from every shard, and combine them as _embed_parts does."""
        key, uniq = "tok_embeddings.weight", torch.unique(tokens.cpu())
        parts, start = [], 0
        for sd in self.w:
            rows = sd.raw.shape(key)[0]
            wanted = uniq if self.embedding_dim == 1 else (uniq - start).clamp(0, rows - 1)
            table = torch.cat([sd.raw.rows(key, t, t + 1) for t in wanted.tolist()])
            if self.embedding_dim == 0:  # VocabParallelEmbedding: rows outside this shard's slice are zeros
                table = table * ((uniq >= start) & (uniq < start + rows))[:, None].to(table.dtype)
                start += rows
            parts.append(table)
        table = torch.cat(parts, -1) if self.embedding_dim == 1 else sum(parts)
        return self._convert(F.embedding(torch.searchsorted(uniq, tokens.cpu()), table))

    def _convert(self, t: torch.Tensor) -> torch.Tensor:
        return self._conv(t).to(self.dtype)

    def _embed_parts(self, tokens: torch.Tensor, parts: list[torch.Tensor]) -> torch.Tensor:
        if self.embedding_dim == 1:  # ParallelEmbedding: each shard holds a slice of the hidden dim
            return torch.cat([F.embedding(tokens, p) for p in parts], dim=-1)
        out, start = None, 0  # VocabParallelEmbedding: each shard holds a slice of the vocab
        for p in parts:
            local = tokens - start
            inside = (local >= 0) & (local < p.shape[0])
            e = F.embedding(local.clamp(0, p.shape[0] - 1), p) * inside[..., None]
            out = e if out is None else out + e
            start += p.shape[0]
        return out

    def _linear(self, sd, key: str, x: torch.Tensor) -> torch.Tensor:
        """x @ W^T with the shard's weight `key` (lazy: widened from the file's dtype chunk by chunk)."""
        return sd.linear(x, key) if self.lazy else F.linear(x, sd[key])

    def _attention(self, layer: int, x: torch.Tensor, rot: torch.Tensor, start_pos: int,
                   mask: torch.Tensor | None, cache: KVCache | None) -> torch.Tensor:
        a, bsz, seqlen = self.args, x.shape[0], x.shape[1]
        pre = f"layers.{layer}."
        out = None
        for s, sd in enumerate(self.w):
            h = rms_norm(x, sd[pre + "attention_norm.weight"], a.norm_eps)
            xq = self._linear(sd, pre + "attention.wq.weight", h).view(bsz, seqlen, self.n_local_heads, a.head_dim)
            xk = self._linear(sd, pre + "attention.wk.weight", h).view(bsz, seqlen, self.n_local_kv_heads, a.head_dim)
            xv = self._linear(sd, pre + "attention.wv.weight", h).view(bsz, seqlen, self.n_local_kv_heads, a.head_dim)
            xq, xk = apply_rotary(xq, rot), apply_rotary(xk, rot)
            keys, values = (xk, xv) if cache is None else cache.write(layer, s, start_pos, xk, xv)
            rep = self.n_local_heads // self.n_local_kv_heads
            keys, values = repeat_kv(keys, rep), repeat_kv(values, rep)
            q, k, v = xq.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
            scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(a.head_dim)
            if mask is not None:
                scores = scores + mask
            probs = F.softmax(scores.float(), dim=-1).type_as(q)
            o = torch.matmul(probs, v).transpose(1, 2).reshape(bsz, seqlen, -1)
            part = self._linear(sd, pre + "attention.wo.weight", o)  # row-parallel: partial sum
            out = part if out is None else out + part
        return out

    def _feed_forward(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        pre = f"layers.{layer}."
        out = None
        for sd in self.w:
            h = rms_norm(x, sd[pre + "ffn_norm.weight"], self.args.norm_eps)
            gate = F.silu(self._linear(sd, pre + "feed_forward.w1.weight", h))
            g = gate * self._linear(sd, pre + "feed_forward.w3.weight", h)
            part = self._linear(sd, pre + "feed_forward.w2.weight", g)
            out = part if out is None else out + part
        return out

    def _output(self, h: torch.Tensor) -> torch.Tensor:
        if self.lazy:
            return self._output_chunked(h)
        outs = []
        for sd in self.w:
            hn = rms_norm(h, sd["norm.weight"], self.args.norm_eps)
            # Tied checkpoints (Llama 3.2) may omit output.weight: the embedding is the output.
            w = sd.get("output.weight")
            if w is None:
                w = torch.cat([p["tok_embeddings.weight"] for p in self.w], dim=self.embedding_dim)
                return F.linear(hn, w).float()
            outs.append(F.linear(hn, w))
        return torch.cat(outs, dim=-1).float()

    def _output_chunked(self, h: torch.Tensor) -> torch.Tensor:
        outs = []
        for sd in self.w:
            hn = rms_norm(h, sd["norm.weight"], self.args.norm_eps)
            # tied: the (vocab-parallel) embedding shards are the output
            key = "output.weight" if "output.weight" in sd.raw else "tok_embeddings.weight"
            outs.append(sd.linear(hn, key))
        return torch.cat(outs, dim=-1).float()

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: int = 0, trace: list | None = None,
                positions: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """Logits (fp32) for `tokens` placed at positions start_pos.., through `cache` when given.

        `trace`, when given, receives (stage, tensor) for the embedding and every attention and
        feed-forward output: what `llama-parity diagnose` compares stage by stage.
        `positions` (no cache) places the tokens at arbitrary positions, e.g. 0..7 then 12000..:
        the long relative distances of a far-position check in one causal pass."""
        h, rot, mask = self.begin(tokens, start_pos, positions, cache)
        if trace is not None:
            trace.append(("embedding", h))
        for layer in range(self.args.n_layers):
            h = self.layer(layer, h, rot, start_pos, mask, trace, cache)
        return self._output(h)

    def begin(self, tokens: torch.Tensor, start_pos: int = 0, positions: torch.Tensor | None = None,
              cache: KVCache | None = None):
        """Embedding, rotations and mask of one forward step (marks the cache slots it will fill)."""
        tokens = tokens.to(self.device)
        seqlen = tokens.shape[1]
        h = self._embed(tokens)
        if positions is None:
            positions = torch.arange(start_pos, start_pos + seqlen, device=self.device)
        elif cache is not None:
            raise ValueError("explicit positions are for cache-less passes")
        rot = rope_rotations(self.args, positions.to(self.device))
        if cache is not None:
            mask = cache.mask(seqlen, start_pos)
        else:
            mask = torch.triu(torch.full((seqlen, seqlen), float("-inf"), device=self.device), 1)
        return h, rot, mask.type_as(h)

    def layer(self, layer: int, h: torch.Tensor, rot: torch.Tensor, start_pos: int, mask: torch.Tensor,
              trace: list | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """One decoder layer (attention then feed-forward, each added to the residual stream)."""
        a = self._attention(layer, h, rot, start_pos, mask, cache)
        h = h + a
        f = self._feed_forward(layer, h)
        if trace is not None:
            trace += [(f"layer {layer} attention", a), (f"layer {layer} feed-forward", f)]
        return h + f

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and output projection: fp32 logits."""
        return self._output(h)

    # --- bounded memory (lazy) ---------------------------------------------------------------
    def _layer_keys(self, layer: int) -> list[tuple[int, str]]:
        pre = f"layers.{layer}."
        return [(s, k) for s, sd in enumerate(self.w) for k in sd.raw.keys() if k.startswith(pre)]

    def read_layer(self, layer: int) -> list[dict[str, torch.Tensor]]:
        """Layer `layer`'s tensors of every shard as stored (may run in a reader thread)."""
        keys = self._layer_keys(layer)
        # into reused buffers: a fresh buffer per layer pays a page fault per 4 KB (ReadBuffers says why)
        bufs = self._read_buffers.tensors([((s, k), self.w[s].raw.shape(k), self.w[s].raw.dtype(k)) for s, k in keys])
        out = [{} for _ in self.w]
        for s, k in keys:
            out[s][k] = self.w[s].raw.read(k, out=bufs[s, k]).to(self.device)
        return out

    def map_layer(self, layer: int) -> list[dict[str, torch.Tensor]]:
        """Layer `layer`'s tensors of every shard as views of the files' pages (PthReader.mapped), for
        passes that read every layer again from the page cache (greedy decoding): no copy. The read
        buffers are let go first, so that the mapped layers take their place in memory."""
        self._read_buffers = ReadBuffers()
        out = [{} for _ in self.w]
        for s, k in self._layer_keys(layer):
            out[s][k] = self.w[s].raw.mapped(k).to(self.device)
        return out

    def hold_layer(self, layer: int, source: "Transformer | None" = None,
                   tensors: list[dict[str, torch.Tensor]] | None = None) -> None:
        """Keep layer `layer`'s weights (in the file's dtype) until `release_layer`, so that several
        passes through it read the file once (`tensors`: already read by `read_layer`). With
        `source` (another dtype's view of the same files), its held tensors are shared: one layer
        resident, whatever the compute dtypes."""
        tensors = [sd.held for sd in source.w] if source is not None else tensors or self.read_layer(layer)
        for sd, held in zip(self.w, tensors):
            sd.held = held

    def share_products(self, fp32: "Transformer") -> None:
        """Run together with `fp32` (the same shards in fp32, this one bf16), each weight's product is
        computed once for both (_Converted._mixed)."""
        for mine, theirs in zip(self.w, fp32.w):
            mine.shares = theirs

    def map_reads(self, on: bool) -> None:
        """Weights not held (the output matrix) read as views of the files' pages instead of copied
        (PthReader.mapped): for passes over shards in the page cache, greedy decoding's. On the 1B
        shape a one-token output projection took 0.065 s mapped against 0.118 s read."""
        for sd in self.w:
            if isinstance(sd, _Converted):  # (a model held in memory reads nothing)
                sd.map_reads = on

    def release_layer(self) -> None:
        for sd in self.w:
            sd.held = {}

    @torch.inference_mode()
    def generate_greedy(self, prompt: list[int], max_new_tokens: int, stop_ids: tuple[int, ...] = ()) -> list[int]:
        """Greedy decoding with the KV cache, as Meta's `generate` does at temperature 0."""
        cache = self.new_cache(1, len(prompt) + max_new_tokens)
        logits = self.forward(torch.tensor([prompt]), 0, cache=cache)
        out, pos = [], len(prompt)
        for _ in range(max_new_tokens):
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            if nxt in stop_ids:
                break
            logits = self.forward(torch.tensor([[nxt]]), pos, cache=cache)
            pos += 1
        return out


def _converter(device: torch.device, dtype: torch.dtype | None, round_to: torch.dtype | None,
               round_vectors: bool = True):
    """The tensor conversion of a reference: to `device` and `dtype`, first rounded to `round_to`
    when the HF weights were converted to that dtype (what a faithful dtype change leaves). Vectors
    (norms) are rounded only with `round_vectors`: a conversion may keep them in the checkpoint's
    float32, exactly, beside rounded matrices."""
    def conv(t: torch.Tensor) -> torch.Tensor:
        rounded = round_to is not None and (round_vectors or t.dim() >= 2)
        t = t.to(device).to(round_to) if rounded else t.to(device)
        return t if dtype is None else t.to(dtype)
    return conv


class _Converted:
    """A shard read on demand: each tensor read and converted (dtype, device) on access, unless held.

    Matrix products (`linear`) never convert a whole weight: a layer stays in the file's dtype
    (bf16: half the memory of fp32) and is widened a few rows at a time into one reused buffer, so
    the fp32 copy never leaves the CPU cache. On this 2-core machine a bf16 4096x14336 weight
    times one token took 87 ms widened whole (a fresh 235 MB tensor, page faults) against 9 ms in
    4 MB pieces (16 MB now, PIECE_BYTES, in a buffer reused across pieces and layers); widening is
    exact, and each output feature is the same dot product either way."""

    def __init__(self, raw: "ShardReader", device: torch.device, dtype: torch.dtype, round_to: torch.dtype | None,
                 piece_bytes: int = PIECE_BYTES, round_vectors: bool = True):
        self.raw, self.device, self.dtype, self.round_to = raw, device, dtype, round_to
        self.piece_bytes = piece_bytes
        self.convert = _converter(device, dtype, round_to, round_vectors)
        self.held: dict[str, torch.Tensor] = {}
        self._bufs: dict[str, torch.Tensor] = {}
        self.shares: _Converted | None = None  # the fp32 view of the same shard whose products this one joins
        self.map_reads = False  # weights not held are mapped (PthReader.mapped) rather than copied

    def __getitem__(self, key: str) -> torch.Tensor:
        t = self.held.get(key)
        return self.convert(t if t is not None else self.raw.read(key))

    def get(self, key: str, default=None):
        return self[key] if key in self.raw else default

    def linear(self, x: torch.Tensor, key: str) -> torch.Tensor:
        """x @ W^T for weight `key`: the held tensor, else read from the file a piece at a time. Passes
        through one layer run together (llama_parity/shared_products.py) share one product."""
        owner = self.shares or self
        return product((id(owner), key), x, lambda x: self._linear(x, key), lambda xs: owner._mixed(xs, key))

    def _mixed(self, xs: list[torch.Tensor], key: str) -> list[torch.Tensor] | None:
        """fp32 passes and bf16 ones (whose products are fp32 sums of bf16 values, see _linear) through
        one widening of the weight and one product, when both widen it to the same values: stored
        bf16 and not rounded to another dtype (else None: one product per dtype)."""
        if self.dtype != torch.float32 or self.raw.dtype(key) != torch.bfloat16 \
                or self.round_to not in (None, torch.bfloat16, torch.float32) or self.device.type != "cpu" \
                or shared_products.NATIVE_BF16:  # with bf16 units the bf16 stream's product is a bf16 kernel's
            return None
        out = self._wide(torch.cat([x.float() for x in xs], dim=-2), key, torch.float32)
        return [o.to(x.dtype) for o, x in zip(out.split([x.shape[-2] for x in xs], dim=-2), xs)]

    def _linear(self, x: torch.Tensor, key: str) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and not shared_products.native_bf16(x):
            # A bf16 product as bf16 matrix units compute it (bf16 values, fp32 sums, the result rounded
            # to bf16), in fp32: CPUs without bf16 units run torch's bf16 kernels at half the fp32 rate.
            return self._wide(x.float(), key, torch.float32, through=torch.bfloat16).to(torch.bfloat16)
        return self._wide(x, key, self.dtype)

    def _wide(self, x: torch.Tensor, key: str, dtype: torch.dtype, through: torch.dtype | None = None) -> torch.Tensor:
        w = self.held.get(key)
        if w is not None and w.dtype == dtype and self.round_to in (None, dtype) and through in (None, dtype):
            return F.linear(x, w)
        n_out, n_in = w.shape if w is not None else self.raw.shape(key)
        one_row = x.numel() == x.shape[-1]
        step = piece_rows(n_in, min(self.piece_bytes, ONE_ROW_PIECE_BYTES) if one_row else self.piece_bytes)
        outs = []
        for a in range(0, n_out, step):
            b = min(a + step, n_out)
            if w is not None:
                piece = w[a:b]
            elif self.map_reads:  # from the page cache, no copy (greedy decoding's output matrix)
                piece = self.raw.mapped(key, a, b).to(self.device)
            else:
                read = self._buffer("read", b - a, n_in, self.raw.dtype(key), torch.device("cpu"))
                piece = self.raw.rows(key, a, b, out=read).to(self.device)
            if self.round_to is not None:
                piece = piece.to(self.round_to)
            if through is not None:
                piece = piece.to(through)
            if piece.dtype != dtype:
                piece = self._buffer("wide", b - a, n_in, dtype, self.device).copy_(piece)
            outs.append(F.linear(x, piece))
        return torch.cat(outs, dim=-1)

    def _buffer(self, name: str, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A reused buffer: a fresh multi-MB tensor per piece would cost its page faults every time."""
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < rows * cols or buf.dtype != dtype or buf.device != device:
            buf = self._bufs[name] = torch.empty(max(rows * cols, self.piece_bytes // 4), dtype=dtype, device=device)
        return buf[:rows * cols].view(rows, cols)


# A consolidated.NN.pth read with explicit reads (pread), or one layer's tensors mapped while they are in
# use (map_layer), never through a map of the whole file: pages of a mapped file stay in the process's
# RSS while mapped (what `top`, schedulers and cgroup limits count; a streamed 8B verify with the whole
# shard mapped looked like 19.6 GB). The pages stay in the page cache: greedy decoding reads them again.
ShardReader = PthReader


def find_shards(meta_dir: Path) -> list[Path]:
    paths = sorted(meta_dir.glob("consolidated.*.pth"), key=lambda p: int(p.name.split(".")[1]))
    if not paths:
        raise FileNotFoundError(f"no consolidated.*.pth in {meta_dir}")
    return paths


def load_meta_checkpoint(meta_dir: str | Path, *, rope_scaling: RopeScalingArgs | None,
                         tokenizer_n_words: int | None = None, embedding_dim: int | None = None,
                         device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                         lazy: bool = False, round_to: torch.dtype | None = None,
                         piece_bytes: int = PIECE_BYTES, round_vectors: bool = True) -> Transformer:
    """Build the reference from a Meta directory, shards kept apart.

    `embedding_dim` (how tok_embeddings is split) is inferred from the shard shapes when not given:
    with more than one shard, a split along the hidden dim leaves shard width dim/mp.
    """
    meta_dir = Path(meta_dir)
    params = json.loads((meta_dir / "params.json").read_text())
    if lazy:
        shards = [ShardReader(p) for p in find_shards(meta_dir)]
    else:
        shards = [load_state_dict(p) for p in find_shards(meta_dir)]
    if int(params.get("vocab_size", -1)) == -1 and tokenizer_n_words is None:
        # As Meta's build(): the vocab comes from the tokenizer (Llama 2 ships it one folder up).
        from .tokenizer import load_meta_tokenizer

        from llama_parity.releases import find_tokenizer

        tok = find_tokenizer(meta_dir)
        if tok is None:
            raise FileNotFoundError(f"params.json says vocab_size -1 and no tokenizer.model is in {meta_dir} or its parent")
        tokenizer_n_words = load_meta_tokenizer(tok).n_words
    args = ModelArgs.from_params(params, vocab_size=tokenizer_n_words, rope_scaling=rope_scaling)
    if embedding_dim is None:
        width = shards[0].shape("tok_embeddings.weight")[1] if lazy else shards[0]["tok_embeddings.weight"].shape[1]
        embedding_dim = 1 if (len(shards) > 1 and width != args.dim) else 0
    return Transformer(args, shards, embedding_dim=embedding_dim, device=device, dtype=dtype, lazy=lazy,
                       round_to=round_to, piece_bytes=piece_bytes, round_vectors=round_vectors)
