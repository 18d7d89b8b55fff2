"""Bounded-memory parity for real weights: every check of the full verify, one decoder layer at a time.

The full checks (parity.py) hold both models in memory, twice the model in fp32: fine for small
checkpoints, impossible for a 70B on a 24 GiB machine. Here each side is read once, layer by layer,
and every check's token sequence (a "stream") goes through the layer while it is resident:

- near: the prompt at positions 0.. (fp32): logits, next-token KL, top-1, and each layer's hidden
  state (the first divergent layer is named);
- near in bf16: the same layer's weights rounded to bf16 on both sides (bf16 check, judged against
  the fp32 reference and Meta's own bf16 error);
- kv: the same prompt prefilled (8 tokens) then decoded one token per step through per-layer KV
  caches (Meta's cache for the reference, transformers' DynamicCache for HF): a fixed continuation,
  so every step's input is known and the steps run layer by layer too;
- far@P: 8 tokens at 0..7 and 4 at P.. (P = 12000; 32768 and 131056 on scaled models);
- greedy: the reference's own greedy continuation of the chat prompt, then HF teacher-forced on it
  in its one streamed pass, compared argmax by argmax. Greedy decoding needs every layer for each
  new token, so the reference's continuation costs `greedy_tokens - 1` extra passes over the Meta
  weights (one token each, through the greedy stream's per-layer caches): the only check that reads
  a model more than once; the report states it.

Memory: weights are read with explicit reads (never memory-mapped: mapped pages stay in RSS after
use), one layer of one side resident at a time as stored (bf16 for real downloads) while the next
is read in a thread; every product widens the weight to the stream's dtype a few rows at a time
into one reused buffer (widened_linear, reference_model/model.py _Converted.linear), so no fp32 copy
of a layer exists. Embedding rows are gathered for the prompt's tokens only, the output matrix is
read once per side for every stream at once, in the same pieces. Peak above a bare
torch+transformers process: two layers as stored, the reference's logits of every stream
(benchmarks/RESULTS.md has the measurements).

Time: each side's files are read once (the Meta shards stay in the page cache for greedy's extra
passes when they fit), reads overlap the products of the layer before.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from llama_parity.reference_model.model import RopeScalingArgs, Transformer, load_meta_checkpoint

from .parity import (FP32_REL_BOUND, KV_CATCHES, Check, Prompts, rel_diff, bf16_checks, compare_fp32,
                     distribution_checks, far_check, far_positions, greedy_check, kv_detail, kv_steps,
                     model_prompts)

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
# Streamed, each new token after the first is one more pass over the Meta weights: fewer than full.
STREAMED_GREEDY_TOKENS = 8
PIECE_BYTES = 4 << 20  # fp32 bytes of weight rows widened per product (fits the CPU's caches)


def return_freed_memory() -> None:
    """Make glibc serve every allocation of 1 MB or more with its own mapping, returned to the system
    when freed. By default the threshold grows to 32 MB after the first large free, and the weight
    chunks below that are carved from the heap, which small tensors kept alive (logits, hidden
    states) then pin: measured on the 1B shape, +580 MB of RSS after one pass over the output matrix."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (glibc); elsewhere there is no such call
    except (OSError, AttributeError):
        pass


class SafetensorsReader:
    """The HF folder's tensors, read with pread from the offsets in each file's header (safe_open
    memory-maps the file, and mapped pages stay in RSS). Pages read are dropped from the page cache:
    nothing here reads them twice, and the Meta shards (read again by greedy decoding) should stay."""

    def __init__(self, hf_dir: Path):
        self.dir = Path(hf_dir)
        index = self.dir / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
            else sorted(p.name for p in self.dir.glob("*.safetensors"))
        if not files:
            raise OSError(f"no .safetensors files in {self.dir}")
        self.entries: dict[str, tuple[int, int, torch.dtype, tuple[int, ...]]] = {}
        self.fds: list[int] = []
        for name in files:
            self._index(self.dir / name)

    def _index(self, path: Path) -> None:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= min(size - 8, 1 << 28):
                raise OSError(f"{path}: header length {n} does not fit the file (corrupt or truncated safetensors)")
            header = json.loads(f.read(n))
        fd = os.open(path, os.O_RDONLY)
        self.fds.append(fd)
        for key, info in header.items():
            if key == "__metadata__":
                continue
            dtype, shape = _ST_DTYPES.get(info.get("dtype")), tuple(info.get("shape", ()))
            begin, end = info.get("data_offsets", (0, -1))
            numel = 1
            for d in shape:
                numel *= d
            if dtype is None or end - begin != numel * dtype.itemsize or 8 + n + end > size:
                raise OSError(f"{path}: tensor {key} has a bad dtype, shape or offsets (corrupt or truncated file)")
            self.entries[key] = (fd, 8 + n + begin, dtype, shape)

    def __del__(self):
        for fd in getattr(self, "fds", []):
            os.close(fd)
        self.fds = []

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def keys(self):
        return self.entries.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key][3]

    def read(self, key: str) -> torch.Tensor:
        shape = self.entries[key][3]
        return self.rows(key, 0, shape[0]) if shape else self.rows(key, 0, 1).reshape(())

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        fd, offset, dtype, shape = self.entries[key]
        out = torch.empty((stop - start, *shape[1:]), dtype=dtype)
        row = out[0].numel() * dtype.itemsize if out.numel() else 0
        buf = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        at, done = offset + start * row, 0
        while done < len(buf):
            got = os.preadv(fd, [buf[done:]], at + done)
            if got <= 0:
                raise OSError(f"{self.dir}: {key} ends early (truncated safetensors file)")
            done += got
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, at, len(buf), os.POSIX_FADV_DONTNEED)
        return out


class StreamingHF:
    """transformers' own Llama modules (LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding), built for
    one layer at a time and given that layer's tensors from the safetensors files."""

    def __init__(self, hf_dir: Path, device: str = "cpu"):
        from transformers import AutoConfig
        from transformers.models.llama import modeling_llama

        self.m = modeling_llama
        self.config = AutoConfig.from_pretrained(str(hf_dir))
        self.config._attn_implementation = "eager"
        self.device = torch.device(device)
        self.files = SafetensorsReader(Path(hf_dir))
        self.rotary = modeling_llama.LlamaRotaryEmbedding(self.config).to(self.device)
        params = inspect.signature(modeling_llama.LlamaDecoderLayer.forward).parameters
        self.cache_kw = next(k for k in ("cache", "past_key_values", "past_key_value") if k in params)
        self.buffers: dict = {}  # widened_linear's reused buffers, one per compute dtype

    def layout_check(self) -> tuple[Check, bool]:
        """What from_pretrained would do with these files, without loading them: every tensor
        transformers' LlamaForCausalLM expects is present with its shape (a missing one would be
        initialised randomly, a misshaped one refused); extra tensors are ignored, as there."""
        from transformers import LlamaForCausalLM

        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in LlamaForCausalLM(self.config).state_dict().items()}
        if self.config.tie_word_embeddings and "lm_head.weight" not in self.files:
            expected.pop("lm_head.weight", None)
        missing = sorted(k for k in expected if k not in self.files)
        misshaped = sorted(f"{k} {self.files.shape(k)} (expected {expected[k]})" for k in expected
                           if k in self.files and self.files.shape(k) != expected[k])
        extra = sorted(k for k in self.files.keys() if k not in expected)
        bad = len(missing) + len(misshaped)
        detail = "; ".join(x for x in (
            f"missing: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else "") if missing else "",
            f"wrong shape: {', '.join(misshaped[:5])}" if misshaped else "",
            f"ignored (not used by LlamaForCausalLM): {', '.join(extra[:5])}" if extra else "") if x)
        fatal = bool(misshaped) or any(k != "lm_head.weight" for k in missing)  # layers that cannot be built
        return Check("weights: names and shapes", "tensors missing, misnamed or of another model's shape",
                     float(bad), 0.0, bad == 0, detail or f"all {len(expected)} tensors present with their shapes"), fatal

    def _get(self, name: str, dtype=torch.float32) -> torch.Tensor:
        return self.files.read(name).to(device=self.device, dtype=dtype)

    def embed(self, tokens: list[int], dtype: torch.dtype) -> torch.Tensor:
        rows = [self.files.rows("model.embed_tokens.weight", t, t + 1) for t in tokens]
        return torch.cat(rows).to(device=self.device, dtype=dtype)[None]

    def read_layer(self, i: int) -> dict[str, torch.Tensor]:
        """Layer i's tensors as stored, named as in the layer (may run in a reader thread). A missing
        one fails as a strict load would; extra ones (old transformers' rotary_emb.inv_freq buffers)
        are ignored, as from_pretrained ignores them."""
        with torch.device("meta"):
            names = list(self.m.LlamaDecoderLayer(self.config, i).state_dict())
        return {k: self.files.read(f"model.layers.{i}.{k}").to(self.device) for k in names}

    def layer(self, i: int, tensors: dict[str, torch.Tensor]):
        """Layer i built from `tensors`: its linear layers keep the file's dtype and widen it per
        product (WidenedLinear); the norms are fp32 (`.to(torch.bfloat16)` gives the bf16 model's)."""
        with torch.device("meta"):
            layer = self.m.LlamaDecoderLayer(self.config, i)
        layer.load_state_dict(tensors, assign=True, strict=True)
        for name, mod in list(layer.named_modules()):
            if isinstance(mod, torch.nn.Linear):
                parent, _, attr = name.rpartition(".")
                setattr(layer.get_submodule(parent) if parent else layer, attr,
                        WidenedLinear(mod.weight.data, None if mod.bias is None else mod.bias.data, self.buffers))
        return layer.float().eval()

    def run(self, layer, h: torch.Tensor, positions: torch.Tensor, start: int, cache) -> torch.Tensor:
        """One layer on one step: `start` earlier tokens are in `cache` (None: a cache-less causal pass)."""
        n = h.shape[1]
        mask = torch.zeros(n, start + n, dtype=h.dtype, device=self.device)
        mask[:, start:] = torch.full((n, n), torch.finfo(h.dtype).min, dtype=h.dtype, device=self.device).triu(1)
        pos = positions[None].to(self.device)
        kw = {self.cache_kw: cache, "use_cache": True} if cache is not None else {}
        out = layer(h, attention_mask=mask[None, None], position_ids=pos, position_embeddings=self.rotary(h, pos),
                    cache_position=pos[0], **kw)
        return out[0] if isinstance(out, tuple) else out

    def output_name(self) -> str | None:
        if "lm_head.weight" in self.files:
            return "lm_head.weight"
        return "model.embed_tokens.weight" if self.config.tie_word_embeddings else None  # else: random lm_head

    def logits(self, hs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Final norm and output projection of each hidden state in its own dtype (fp32 logits),
        the output matrix read once, a piece at a time, for all of them."""
        norms = {}
        for dtype in {h.dtype for h in hs}:
            norm = self.m.LlamaRMSNorm(self.config.hidden_size, eps=self.config.rms_norm_eps)
            norm.weight.data = self._get("model.norm.weight", dtype)
            norms[dtype] = norm.to(self.device)
        hn = [norms[h.dtype](h) for h in hs]
        name, vocab = self.output_name(), self.config.vocab_size
        step = max(1, PIECE_BYTES // (self.config.hidden_size * 4))
        outs = [[] for _ in hs]
        for a in range(0, vocab, step):
            piece = self.files.rows(name, a, min(a + step, vocab)).to(self.device)
            for x, out in zip(hn, outs):
                out.append(widened_linear(x, piece, self.buffers).float())
        return [torch.cat(out, dim=-1) for out in outs]


def widened_linear(x: torch.Tensor, w: torch.Tensor, buffers: dict) -> torch.Tensor:
    """x @ w^T with w widened (or narrowed) to x's dtype a few rows at a time into one reused buffer:
    a whole fp32 copy of each weight, freshly allocated, costs more than the product itself (page
    faults and memory traffic; the reference does the same, reference_model/model.py _Converted)."""
    if w.dtype == x.dtype:
        return torch.nn.functional.linear(x, w)
    step = max(1, PIECE_BYTES // (w.shape[1] * 4))
    key = (x.dtype, x.device)
    if key not in buffers or buffers[key].numel() < step * w.shape[1]:
        buffers[key] = torch.empty(step * w.shape[1], dtype=x.dtype, device=x.device)
    outs = []
    for a in range(0, w.shape[0], step):
        piece = w[a:a + step]
        buf = buffers[key][:piece.numel()].view(piece.shape).copy_(piece)
        outs.append(torch.nn.functional.linear(x, buf))
    return torch.cat(outs, dim=-1)


class WidenedLinear(torch.nn.Module):
    """transformers' nn.Linear replaced by the same product over the weight as stored (see
    widened_linear); a plain attribute, so `layer.to(torch.bfloat16)` converts only the norms."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, buffers: dict):
        super().__init__()
        self.w, self.b, self.buffers = weight, bias, buffers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = widened_linear(x, self.w, self.buffers)
        return out if self.b is None else out + self.b.to(out.dtype)


@dataclass
class Stream:
    """One check's tokens: steps run in order through each layer (several steps share a KV cache)."""

    name: str
    tokens: list[int]
    positions: list[int]
    steps: list[tuple[int, int]]  # token index ranges; more than one: decoded through a cache
    dtype: torch.dtype = torch.float32
    room: int = 0  # extra cache slots (the reference's greedy continuation)
    logits_from: int = 0  # only positions from here on are judged: only their logits are computed
    h: list = field(default_factory=list)  # per step hidden state
    cache: object = None

    @property
    def cached(self) -> bool:
        return len(self.steps) > 1

    def step_positions(self, j: int) -> torch.Tensor:
        a, b = self.steps[j]
        return torch.tensor(self.positions[a:b])


def build_streams(prompts: Prompts, far: list[int], bf16: bool, greedy_room: int = 0, quick: bool = False,
                  greedy_from: int | None = None, split: int = 8) -> list[Stream]:
    main = prompts.main
    streams = [Stream("near", main, list(range(len(main))), [(0, len(main))])]
    chunk = main[split:split + 4]
    streams += [Stream(f"far@{p}", main[:split] + chunk, list(range(split)) + list(range(p, p + len(chunk))),
                       [(0, split + len(chunk))], logits_from=split) for p in far]
    if quick:
        return streams
    streams.append(Stream("kv", main, list(range(len(main))), kv_steps(len(main), split)))
    g = prompts.greedy
    streams.append(Stream("greedy", g, list(range(len(g))), [(0, len(g))], room=greedy_room,
                          logits_from=len(g) - 1 if greedy_from is None else greedy_from))
    if bf16:
        streams.append(Stream("near bf16", main, list(range(len(main))), [(0, len(main))], torch.bfloat16))
    return streams


# --- the reference side ------------------------------------------------------------------------------
def _ref_set_cache(ref: Transformer, cache) -> None:
    ref.cache_k, ref.cache_v, ref.cache_valid = cache if cache is not None else (None, None, None)


def _ref_begin(refs: dict, s: Stream) -> list:
    """Per step (h, rot, mask, start) for the reference; a cached stream gets its own KV cache."""
    ref = refs[s.dtype]
    if s.cached or s.room:
        ref.reset_cache(1, len(s.tokens) + s.room)
        s.cache = (ref.cache_k, ref.cache_v, ref.cache_valid)
    _ref_set_cache(ref, s.cache)
    out = []
    for j, (a, b) in enumerate(s.steps):
        toks = torch.tensor([s.tokens[a:b]])
        h, rot, mask = ref.begin(toks, a, None if s.cache is not None else s.step_positions(j))
        out.append([h, rot, mask, a])
    _ref_set_cache(ref, None)
    return out


def run_reference(ref32: Transformer, ref16: Transformer, streams: list[Stream], progress) -> tuple[dict, list]:
    """All streams through every reference layer, each layer read once; returns logits per stream and
    the near stream's hidden state after each layer."""
    refs = {torch.float32: ref32, torch.bfloat16: ref16}
    state = {s.name: _ref_begin(refs, s) for s in streams}
    hidden = []
    n = ref32.args.n_layers
    for i, tensors in progress(prefetched(ref32.read_layer, n), "reference layers", n):
        ref32.hold_layer(i, tensors=tensors)
        for dtype in (torch.float32, torch.bfloat16):
            if dtype == torch.bfloat16:
                ref16.hold_layer(i, source=ref32)
            for s in (s for s in streams if s.dtype == dtype):
                _ref_set_cache(refs[dtype], s.cache)
                for st in state[s.name]:
                    st[0] = refs[dtype].layer(i, st[0], st[1], st[3], st[2])
                _ref_set_cache(refs[dtype], None)
        ref32.release_layer()
        ref16.release_layer()
        del tensors
        hidden.append(state["near"][0][0][0].float().cpu())
    logits = {}
    for dtype, ref in refs.items():  # one pass over the output matrix per dtype, every stream at once
        group = [s for s in streams if s.dtype == dtype]
        hs = [torch.cat([st[0] for st in state[s.name]], dim=1)[:, s.logits_from:] for s in group]
        if group:
            parts = ref.head(torch.cat(hs, dim=1))[0].split([h.shape[1] for h in hs])
            logits.update({s.name: part for s, part in zip(group, parts)})
    return logits, hidden


@torch.inference_mode()
def reference_greedy(ref: Transformer, stream: Stream, first_logits: torch.Tensor, n_new: int,
                     progress=None) -> list[int]:
    """Continue the greedy stream (its caches hold the prompt at every layer): one pass per token
    (on a 70B whose shards exceed the page cache, minutes each: `progress` shows them)."""
    out, pos = [int(first_logits[-1].argmax())], len(stream.tokens)
    _ref_set_cache(ref, stream.cache)
    steps = range(n_new - 1)
    for _ in (progress(steps, "greedy passes over the Meta weights", len(steps), "token") if progress else steps):
        out.append(int(ref.forward(torch.tensor([[out[-1]]]), pos)[0, -1].argmax()))
        pos += 1
    _ref_set_cache(ref, None)
    return out


# --- the HF side ------------------------------------------------------------------------------------
def run_hf(hf: StreamingHF, streams: list[Stream], ref_hidden: list, progress) -> tuple[dict, list[float]]:
    from transformers import DynamicCache

    for s in streams:
        s.cache = DynamicCache() if s.cached else None
        s.h = [hf.embed(s.tokens[a:b], s.dtype) for a, b in s.steps]
    diffs = []
    n = hf.config.num_hidden_layers
    for i, tensors in progress(prefetched(hf.read_layer, n), "HF layers", n):
        layer = hf.layer(i, tensors)
        del tensors
        for dtype in (torch.float32, torch.bfloat16):
            if dtype == torch.bfloat16:
                layer = layer.to(torch.bfloat16)
            for s in (s for s in streams if s.dtype == dtype):
                for j, (a, _b) in enumerate(s.steps):
                    s.h[j] = hf.run(layer, s.h[j], s.step_positions(j), a if s.cached else 0, s.cache)
        del layer
        near = next(s for s in streams if s.name == "near")
        diffs.append(rel_diff(ref_hidden[i], near.h[0][0]))
    if hf.output_name() is None:
        return {}, diffs
    logits = hf.logits([torch.cat(s.h, dim=1)[:, s.logits_from:] for s in streams])
    return {s.name: x[0] for s, x in zip(streams, logits)}, diffs


def prefetched(read, n: int):
    """(i, read(i)) for i in 0..n-1, layer i+1 read in a thread while the caller computes with layer i:
    reads (pread, mostly waiting on the disk) overlap the products. One extra layer is resident."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="llama-parity-reader") as pool:
        nxt = pool.submit(read, 0) if n else None
        for i in range(n):
            cur = nxt.result()
            nxt = pool.submit(read, i + 1) if i + 1 < n else None
            yield i, cur
            del cur


def _progress(desc_prefix: str):
    quiet = not sys.stderr.isatty()
    return lambda it, desc, total=None, unit="layer": tqdm(it, desc=f"{desc_prefix}{desc}", unit=unit, total=total,
                                                           disable=quiet)


@torch.inference_mode()
def streaming_model_checks(meta_dir: Path, hf_dir: Path, *, rope_scaling: RopeScalingArgs | None,
                           device: str = "cpu", prompt: list[int] | None = None, bf16: bool = True,
                           greedy_tokens: int = STREAMED_GREEDY_TOKENS, round_to: torch.dtype | None = None,
                           quick: bool = False) -> list[Check]:
    """Every model check of the full verify, streamed; see the module docstring for what each costs.
    `round_to`: the HF weights' dtype when the conversion changed it (the reference then computes with
    Meta's weights rounded to it); `quick`: fp32 logits and far positions only."""
    return_freed_memory()
    ref32 = load_meta_checkpoint(meta_dir, rope_scaling=rope_scaling, device=device, dtype=torch.float32, lazy=True,
                                 round_to=round_to)
    ref16 = Transformer(ref32.args, [sd.raw for sd in ref32.w], embedding_dim=ref32.embedding_dim, device=device,
                        dtype=torch.bfloat16, lazy=True)
    hf = StreamingHF(Path(hf_dir), device)
    layout, fatal = hf.layout_check()
    if fatal:
        return [layout]  # the layers cannot be built (a missing lm_head alone is judged by the logits)
    prompts = model_prompts(meta_dir, min(hf.config.vocab_size, ref32.args.vocab_size))
    if prompt:
        prompts = Prompts(prompt, prompt[:8], "given ids")
    far, bf16 = far_positions(rope_scaling), bf16 and not quick
    progress = _progress("verifying ")
    ref_streams = build_streams(prompts, far, bf16, greedy_room=greedy_tokens, quick=quick)
    r, ref_hidden = run_reference(ref32, ref16, ref_streams, progress)
    cont = []
    if not quick:
        greedy = next(s for s in ref_streams if s.name == "greedy")
        cont = reference_greedy(ref32, greedy, r.pop("greedy"), greedy_tokens, progress)
    del ref32, ref16, ref_streams
    hf_prompts = Prompts(prompts.main, prompts.greedy + cont[:-1], prompts.source)
    h, diffs = run_hf(hf, build_streams(hf_prompts, far, bf16, quick=quick, greedy_from=len(prompts.greedy) - 1),
                      ref_hidden, progress)
    if not h:  # named as the full check that catches it there
        return [layout, _layers_check(diffs), Check(
            "logits (fp32)", "tie_word_embeddings lost on a tied model (random lm_head)", 1.0, FP32_REL_BOUND, False,
            "no lm_head.weight and tie_word_embeddings is false: transformers would initialise lm_head randomly")]
    return [layout, _layers_check(diffs)] + _judge(r, h, prompts, far, cont, greedy_tokens)


def _judge(r: dict, h: dict, prompts: Prompts, far: list[int], cont: list[int], greedy_tokens: int) -> list[Check]:
    """The same criteria as the full checks, on the streams' logits."""
    n = len(prompts.main)
    checks = [compare_fp32("logits (fp32)", "weights permuted/merged wrongly, wrong norm eps, FFN size or theta",
                           r["near"], h["near"], f"{n} tokens at 0..{n - 1} ({prompts.source}), streamed")]
    checks += distribution_checks(r["near"], h["near"], prompts.source)
    if "kv" in r:
        checks.append(compare_fp32("kv-cache decode", KV_CATCHES, r["kv"], h["kv"], kv_detail(n) + ", streamed"))
    checks.append(far_check([(p, compare_fp32("far positions", "", r[f"far@{p}"], h[f"far@{p}"], f"at {p}",
                                                       positions=range(p, p + len(r[f"far@{p}"]))))
                             for p in far]))
    if "greedy" in h:
        hf_choice = h["greedy"].argmax(-1).tolist()
        checks.append(greedy_check(cont, hf_choice, f"(Meta's greedy decoding, streamed: {greedy_tokens - 1} extra "
                                                    "passes over the Meta weights; HF teacher-forced on it in one pass)"))
    if "near bf16" in r:
        checks += bf16_checks(r["near"], r["near bf16"], h["near bf16"], h["near"])
    return checks


def _layers_check(diffs: list[float]) -> Check:
    worst = max(range(len(diffs)), key=lambda i: diffs[i])
    first_bad = next((i for i, d in enumerate(diffs) if d > FP32_REL_BOUND), None)
    return Check("hidden states per layer", "a fault inside one layer (permutation, merge, norm)",
                 diffs[worst], FP32_REL_BOUND, first_bad is None,
                 "all layers agree" if first_bad is None else f"first divergent layer: {first_bad}",
                 series={"x_label": "layer", "x": list(range(len(diffs))), "y": list(diffs)})


def model_bytes_fp32(hf_dir: Path) -> int:
    cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    d, layers, v = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    kv = cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    hd = cfg.get("head_dim") or d // cfg["num_attention_heads"]
    per_layer = 2 * d * d + 2 * d * kv * hd + 3 * d * cfg["intermediate_size"]
    return 4 * (layers * per_layer + 2 * v * d)
