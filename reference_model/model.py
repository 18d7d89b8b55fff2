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
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F


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


class Transformer:
    """Meta's Transformer over unmerged shards. `shards[s]` is shard s's state dict."""

    def __init__(self, args: ModelArgs, shards: list[dict[str, torch.Tensor]], *,
                 embedding_dim: int, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 lazy: bool = False, round_to: torch.dtype | None = None):
        self.args = args
        self.mp = len(shards)
        self.embedding_dim = embedding_dim
        if args.n_heads % self.mp or args.n_kv_heads % self.mp:
            raise ValueError(f"{self.mp} shards cannot split {args.n_heads} heads / {args.n_kv_heads} kv heads")
        self.n_local_heads = args.n_heads // self.mp
        self.n_local_kv_heads = args.n_kv_heads // self.mp
        self.device = torch.device(device)
        conv = (lambda t: t.to(device=self.device, dtype=dtype)) if dtype else (lambda t: t.to(self.device))
        if round_to is not None:  # weights as a faithful conversion to `round_to` leaves them
            conv = (lambda c: lambda t: c(t.to(round_to)))(conv)
        self._conv = conv
        self.lazy = lazy
        if lazy:
            # Bounded memory for real weights: `shards` are ShardReaders; each tensor is read from the
            # file with explicit reads when a layer uses it (or held for one layer, `hold_layer`),
            # converted, then dropped; the embedding is read by row, the output matrix in vocab chunks.
            self.w = [_Converted(sd, conv) for sd in shards]
        else:
            self.w = [{k: conv(v) for k, v in sd.items() if k != "rope.freqs"} for sd in shards]
        first = shards[0].dtype("tok_embeddings.weight") if lazy else shards[0]["tok_embeddings.weight"].dtype
        self._dtype = dtype or first
        self.cache_k: list[list[torch.Tensor]] | None = None
        self.cache_v: list[list[torch.Tensor]] | None = None
        self.cache_valid: torch.Tensor | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    # --- KV cache -------------------------------------------------------------------------
    def reset_cache(self, max_batch: int, max_seq_len: int) -> None:
        a = self.args
        shape = (max_batch, max_seq_len, self.n_local_kv_heads, a.head_dim)
        mk = lambda: torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.cache_k = [[mk() for _ in range(self.mp)] for _ in range(a.n_layers)]
        self.cache_v = [[mk() for _ in range(self.mp)] for _ in range(a.n_layers)]
        # Meta's cache is always filled contiguously from 0. We also let a caller jump ahead
        # (prefill at 0, then decode at position 12000) to test far relative distances; slots never
        # written are masked out instead of being attended as zeros.
        self.cache_valid = torch.zeros(max_seq_len, dtype=torch.bool, device=self.device)

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

    def _attention(self, layer: int, x: torch.Tensor, rot: torch.Tensor, start_pos: int,
                   mask: torch.Tensor | None) -> torch.Tensor:
        a, bsz, seqlen = self.args, x.shape[0], x.shape[1]
        pre = f"layers.{layer}."
        out = None
        for s, sd in enumerate(self.w):
            h = rms_norm(x, sd[pre + "attention_norm.weight"], a.norm_eps)
            xq = F.linear(h, sd[pre + "attention.wq.weight"]).view(bsz, seqlen, self.n_local_heads, a.head_dim)
            xk = F.linear(h, sd[pre + "attention.wk.weight"]).view(bsz, seqlen, self.n_local_kv_heads, a.head_dim)
            xv = F.linear(h, sd[pre + "attention.wv.weight"]).view(bsz, seqlen, self.n_local_kv_heads, a.head_dim)
            xq, xk = apply_rotary(xq, rot), apply_rotary(xk, rot)
            if self.cache_k is not None:
                ck, cv = self.cache_k[layer][s], self.cache_v[layer][s]
                ck[:bsz, start_pos:start_pos + seqlen] = xk
                cv[:bsz, start_pos:start_pos + seqlen] = xv
                keys, values = ck[:bsz, :start_pos + seqlen], cv[:bsz, :start_pos + seqlen]
            else:
                keys, values = xk, xv
            rep = self.n_local_heads // self.n_local_kv_heads
            keys, values = repeat_kv(keys, rep), repeat_kv(values, rep)
            q, k, v = xq.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
            scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(a.head_dim)
            if mask is not None:
                scores = scores + mask
            probs = F.softmax(scores.float(), dim=-1).type_as(q)
            o = torch.matmul(probs, v).transpose(1, 2).reshape(bsz, seqlen, -1)
            part = F.linear(o, sd[pre + "attention.wo.weight"])  # row-parallel: partial sum
            out = part if out is None else out + part
        return out

    def _feed_forward(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        pre = f"layers.{layer}."
        out = None
        for sd in self.w:
            h = rms_norm(x, sd[pre + "ffn_norm.weight"], self.args.norm_eps)
            g = F.silu(F.linear(h, sd[pre + "feed_forward.w1.weight"])) * F.linear(h, sd[pre + "feed_forward.w3.weight"])
            part = F.linear(g, sd[pre + "feed_forward.w2.weight"])
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

    def _output_chunked(self, h: torch.Tensor, rows: int = 4096) -> torch.Tensor:
        outs = []
        for sd in self.w:
            hn = rms_norm(h, sd["norm.weight"], self.args.norm_eps)
            # tied: the (vocab-parallel) embedding shards are the output
            key = "output.weight" if "output.weight" in sd.raw else "tok_embeddings.weight"
            n = sd.raw.shape(key)[0]
            outs += [F.linear(hn, self._convert(sd.raw.rows(key, a, min(a + rows, n)))) for a in range(0, n, rows)]
        return torch.cat(outs, dim=-1).float()

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: int = 0, trace: list | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (fp32) for `tokens` placed at positions start_pos.. ; uses the KV cache if reset.

        `trace`, when given, receives (stage, tensor) for the embedding and every attention and
        feed-forward output: what `llama-parity diagnose` compares stage by stage.
        `positions` (no cache) places the tokens at arbitrary positions, e.g. 0..7 then 12000..:
        the long relative distances of a far-position check in one causal pass."""
        h, rot, mask = self.begin(tokens, start_pos, positions)
        if trace is not None:
            trace.append(("embedding", h))
        for layer in range(self.args.n_layers):
            h = self.layer(layer, h, rot, start_pos, mask, trace)
        return self._output(h)

    def begin(self, tokens: torch.Tensor, start_pos: int = 0, positions: torch.Tensor | None = None):
        """Embedding, rotations and mask of one forward step (marks the cache slots it will fill)."""
        tokens = tokens.to(self.device)
        seqlen = tokens.shape[1]
        h = self._embed(tokens)
        if positions is None:
            positions = torch.arange(start_pos, start_pos + seqlen, device=self.device)
        elif self.cache_k is not None:
            raise ValueError("explicit positions are for cache-less passes")
        rot = rope_rotations(self.args, positions.to(self.device))
        if self.cache_k is not None:
            self.cache_valid[start_pos:start_pos + seqlen] = True
            total = start_pos + seqlen
            # causal among the new tokens, all earlier written slots visible, unwritten slots hidden
            mask = torch.zeros(seqlen, total, device=self.device)
            mask[:, :start_pos][:, ~self.cache_valid[:start_pos]] = float("-inf")
            mask[:, start_pos:] = torch.triu(torch.full((seqlen, seqlen), float("-inf"), device=self.device), 1)
        else:
            mask = torch.triu(torch.full((seqlen, seqlen), float("-inf"), device=self.device), 1)
        return h, rot, mask.type_as(h)

    def layer(self, layer: int, h: torch.Tensor, rot: torch.Tensor, start_pos: int, mask: torch.Tensor,
              trace: list | None = None) -> torch.Tensor:
        """One decoder layer (attention then feed-forward, each added to the residual stream)."""
        a = self._attention(layer, h, rot, start_pos, mask)
        h = h + a
        f = self._feed_forward(layer, h)
        if trace is not None:
            trace += [(f"layer {layer} attention", a), (f"layer {layer} feed-forward", f)]
        return h + f

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and output projection: fp32 logits."""
        return self._output(h)

    # --- bounded memory (lazy) ---------------------------------------------------------------
    def hold_layer(self, layer: int, source: "Transformer | None" = None) -> None:
        """Keep layer `layer`'s weights converted until `release_layer`, so that several passes
        through it read the file once. With `source` (another dtype's view of the same files),
        its held tensors are converted one by one and taken over: one layer resident, not two."""
        pre = f"layers.{layer}."
        for s, sd in enumerate(self.w):
            if source is not None:
                src = source.w[s].held
                for k in list(src):
                    sd.held[k] = sd.conv(src.pop(k))
            else:
                sd.held = {k: sd.conv(sd.raw.read(k)) for k in sd.raw.keys() if k.startswith(pre)}

    def release_layer(self) -> None:
        for sd in self.w:
            sd.held = {}

    @torch.inference_mode()
    def generate_greedy(self, prompt: list[int], max_new_tokens: int, stop_ids: tuple[int, ...] = ()) -> list[int]:
        """Greedy decoding with the KV cache, as Meta's `generate` does at temperature 0."""
        self.reset_cache(1, len(prompt) + max_new_tokens)
        logits = self.forward(torch.tensor([prompt]), 0)
        out, pos = [], len(prompt)
        for _ in range(max_new_tokens):
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            if nxt in stop_ids:
                break
            logits = self.forward(torch.tensor([[nxt]]), pos)
            pos += 1
        return out


class _Converted:
    """A shard read on demand: each tensor read and converted (dtype, device) on access, unless held."""

    def __init__(self, raw: "ShardReader", conv):
        self.raw, self.conv = raw, conv
        self.held: dict[str, torch.Tensor] = {}

    def __getitem__(self, key: str) -> torch.Tensor:
        t = self.held.get(key)
        return t if t is not None else self.conv(self.raw.read(key))

    def get(self, key: str, default=None):
        return self[key] if key in self.raw else default


class ShardReader:
    """One consolidated.NN.pth read with explicit reads (pread), never through a memory map.

    Pages of a memory-mapped file stay in the process's RSS after use: what `top`, schedulers and
    cgroup limits count, so a streamed 8B verify looked like 19.6 GB. torch.load(mmap=True) is used
    only to learn each tensor's dtype, shape and storage (no page of data is touched); the byte
    offset of each storage in the file comes from the zip directory (torch.save writes an
    uncompressed zip: one `data/N` record per storage), matched to the mapped storages' addresses.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tensors = torch.load(self.path, map_location="cpu", mmap=True, weights_only=True)
        self.offsets = _tensor_file_offsets(self.path, self.tensors)
        self.fd = os.open(self.path, os.O_RDONLY)

    def __del__(self):
        fd, self.fd = getattr(self, "fd", None), None
        if fd is not None:
            os.close(fd)

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def keys(self):
        return self.tensors.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].dtype

    def read(self, key: str) -> torch.Tensor:
        t = self.tensors[key]
        return self.rows(key, 0, t.shape[0]) if t.dim() else t.clone()

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop (along dim 0) as a new tensor in the file's dtype."""
        t = self.tensors[key]
        if not t.is_contiguous():  # not written by torch.save of a plain state dict; copy via the map
            return t[start:stop].clone()
        out = torch.empty((stop - start, *t.shape[1:]), dtype=t.dtype)
        row = out[0].numel() * t.element_size() if out.numel() else 0
        _pread_into(self.fd, out, self.offsets[key] + start * row, self.path)
        return out


def _zip_data_offsets(path: Path) -> list[int]:
    """File offsets of the first byte of each stored record's data."""
    offsets = []
    with open(path, "rb") as f, zipfile.ZipFile(f) as z:
        for info in z.infolist():
            f.seek(info.header_offset)
            local = f.read(30)  # local file header: name and extra-field lengths at bytes 26..29
            n, extra = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
            offsets.append(info.header_offset + 30 + n + extra)
    return offsets


def _tensor_file_offsets(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """Byte offset in `path` of each tensor's first element. torch maps the whole file at one base
    address, so (storage address - base) is the storage record's offset: find the base that maps
    every storage onto a record, and refuse the file if none does."""
    records = set(_zip_data_offsets(path))
    ptrs = {k: t.untyped_storage().data_ptr() for k, t in tensors.items() if t.untyped_storage().nbytes()}
    if not ptrs:
        return {k: 0 for k in tensors}
    lowest = min(ptrs.values())
    for first in sorted(records):
        base = lowest - first
        if all(p - base in records for p in ptrs.values()):
            return {k: ptrs.get(k, base) - base + t.storage_offset() * t.element_size() for k, t in tensors.items()}
    raise ValueError(f"{path}: tensor storages do not match the file's records (not a torch.save zip?)")


def _pread_into(fd: int, out: torch.Tensor, offset: int, path: Path) -> None:
    buf = memoryview(out.reshape(-1).view(torch.uint8).numpy())
    done = 0
    while done < len(buf):
        if hasattr(os, "preadv"):
            n = os.preadv(fd, [buf[done:]], offset + done)
        else:  # pragma: no cover - platforms without preadv
            chunk = os.pread(fd, len(buf) - done, offset + done)
            n = len(chunk)
            buf[done:done + n] = chunk
        if n <= 0:
            raise OSError(f"{path}: unexpected end of file at byte {offset + done} (truncated shard?)")
        done += n


def find_shards(meta_dir: Path) -> list[Path]:
    paths = sorted(meta_dir.glob("consolidated.*.pth"), key=lambda p: int(p.name.split(".")[1]))
    if not paths:
        raise FileNotFoundError(f"no consolidated.*.pth in {meta_dir}")
    return paths


def load_meta_checkpoint(meta_dir: str | Path, *, rope_scaling: RopeScalingArgs | None,
                         tokenizer_n_words: int | None = None, embedding_dim: int | None = None,
                         device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                         lazy: bool = False, round_to: torch.dtype | None = None) -> Transformer:
    """Build the reference from a Meta directory, shards kept apart.

    `embedding_dim` (how tok_embeddings is split) is inferred from the shard shapes when not given:
    with more than one shard, a split along the hidden dim leaves shard width dim/mp.
    """
    meta_dir = Path(meta_dir)
    params = json.loads((meta_dir / "params.json").read_text())
    if lazy:
        shards = [ShardReader(p) for p in find_shards(meta_dir)]
    else:
        shards = [torch.load(p, map_location="cpu", mmap=True, weights_only=True) for p in find_shards(meta_dir)]
    if int(params.get("vocab_size", -1)) == -1 and tokenizer_n_words is None:
        # As Meta's build(): the vocab comes from the tokenizer (Llama 2 ships it one folder up).
        from .tokenizer import load_meta_tokenizer

        from llama_parity.fixtures.variants import find_tokenizer

        tok = find_tokenizer(meta_dir)
        if tok is None:
            raise FileNotFoundError(f"params.json says vocab_size -1 and no tokenizer.model is in {meta_dir} or its parent")
        tokenizer_n_words = load_meta_tokenizer(tok).n_words
    args = ModelArgs.from_params(params, vocab_size=tokenizer_n_words, rope_scaling=rope_scaling)
    if embedding_dim is None:
        width = shards[0].shape("tok_embeddings.weight")[1] if lazy else shards[0]["tok_embeddings.weight"].shape[1]
        embedding_dim = 1 if (len(shards) > 1 and width != args.dim) else 0
    return Transformer(args, shards, embedding_dim=embedding_dim, device=device, dtype=dtype, lazy=lazy,
                       round_to=round_to)
