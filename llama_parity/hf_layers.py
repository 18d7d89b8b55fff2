"""transformers' own Llama modules, one decoder layer at a time, fed from the safetensors files: the HF
side of the streamed verify (llama_parity/streaming.py runs them).

A layer's linear weights stay in the file's dtype (bf16 for real downloads) and are widened to the
compute dtype a few rows at a time for each product (WidenedLinear), so no fp32 copy of a layer exists.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from .formats.safetensors import SafetensorsReader
from .memory import ReadBuffers
from .parity import Check
from . import shared_products
from .shared_products import piece_rows, product

# fp32 bytes of weight rows widened per product into one reused buffer. 16 MB (1024 rows of a 4096-wide
# weight): on a 2-core Xeon (AVX-512) 4 MB pieces ran the 208-token products at 129-153 GFLOP/s against
# 197-240 for 16 MB, and one-token products 2.5x slower (each piece is a few ops, each waking the
# threads); on the 2-core EPYC 128 rows or more already ran at its full rate.
PIECE_BYTES = 16 << 20


def widened_linear(x: torch.Tensor, w: torch.Tensor, buffers: dict, piece_bytes: int = PIECE_BYTES) -> torch.Tensor:
    """x @ w^T with w widened (or narrowed) to x's dtype a few rows at a time into one reused buffer:
    a whole fp32 copy of each weight, freshly allocated, costs more than the product itself (page
    faults and memory traffic; the reference does the same, reference_model/model.py _Converted)."""
    if x.dtype == torch.bfloat16 and not shared_products.native_bf16(x):
        # A bf16 product as bf16 matrix units compute it (bf16 values, fp32 sums, the result rounded to
        # bf16), in fp32: CPUs without bf16 units run torch's bf16 kernels at half the fp32 rate.
        return _widened(x.float(), w, buffers, piece_bytes, through=torch.bfloat16).to(torch.bfloat16)
    if w.dtype == x.dtype:
        return torch.nn.functional.linear(x, w)
    return _widened(x, w, buffers, piece_bytes)


def _widened(x: torch.Tensor, w: torch.Tensor, buffers: dict, piece_bytes: int,
             through: torch.dtype | None = None) -> torch.Tensor:
    """x @ w^T, w (rounded to `through` first, when given) widened to x's dtype piece by piece."""
    step = piece_rows(w.shape[1], piece_bytes)
    key = (x.dtype, x.device)
    if key not in buffers or buffers[key].numel() < step * w.shape[1]:
        buffers[key] = torch.empty(step * w.shape[1], dtype=x.dtype, device=x.device)
    outs = []
    for a in range(0, w.shape[0], step):
        piece = w[a:a + step] if through is None else w[a:a + step].to(through)
        buf = buffers[key][:piece.numel()].view(piece.shape).copy_(piece)
        outs.append(torch.nn.functional.linear(x, buf))
    return torch.cat(outs, dim=-1)


class WidenedLinear(torch.nn.Module):
    """transformers' nn.Linear replaced by the same product over the weight as stored (see
    widened_linear); a plain attribute, so `layer.to(torch.bfloat16)` converts only the norms."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, buffers: dict,
                 piece_bytes: int = PIECE_BYTES, key=None):
        super().__init__()
        self.w, self.b, self.buffers, self.piece_bytes = weight, bias, buffers, piece_bytes
        self.key = id(self) if key is None else key  # the fp32 and bf16 builds of a layer share it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # shared with the other passes through this layer run together (shared_products.py)
        out = product(self.key, x, lambda x: widened_linear(x, self.w, self.buffers, self.piece_bytes), self._mixed)
        return out if self.b is None else out + self.b.to(out.dtype)

    def _mixed(self, xs: list[torch.Tensor]) -> list[torch.Tensor] | None:
        return mixed_widened(xs, self.w, self.buffers, self.piece_bytes)


def mixed_widened(xs: list[torch.Tensor], w: torch.Tensor, buffers: dict,
                  piece_bytes: int = PIECE_BYTES) -> list[torch.Tensor] | None:
    """Each x @ w^T in x's dtype, fp32 and bf16 inputs (the latter's products are fp32 sums of bf16
    values, widened_linear) through one widening and one product, when w is stored bf16 (else None)."""
    if w.dtype != torch.bfloat16 or w.device.type != "cpu" or shared_products.NATIVE_BF16:
        return None  # (with bf16 units the bf16 stream's product is a bf16 kernel's: its own)
    out = _widened(torch.cat([x.float() for x in xs], dim=-2), w, buffers, piece_bytes)
    return [o.to(x.dtype) for o, x in zip(out.split([x.shape[-2] for x in xs], dim=-2), xs)]


class StreamingHF:
    """transformers' own Llama modules (LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding), built for
    one layer at a time and given that layer's tensors from the safetensors files."""

    def __init__(self, hf_dir: Path, device: str = "cpu", piece_bytes: int = PIECE_BYTES):
        from transformers import AutoConfig
        from transformers.models.llama import modeling_llama

        self.m = modeling_llama
        self.config = AutoConfig.from_pretrained(str(hf_dir))
        self.config._attn_implementation = "eager"
        self.device = torch.device(device)
        # Pages read are dropped from the page cache: nothing here reads them twice, and the Meta
        # shards (read again by greedy decoding) should stay.
        self.files = SafetensorsReader(Path(hf_dir))
        self.rotary = modeling_llama.LlamaRotaryEmbedding(self.config).to(self.device)
        params = inspect.signature(modeling_llama.LlamaDecoderLayer.forward).parameters
        self.cache_kw = next(k for k in ("cache", "past_key_values", "past_key_value") if k in params)
        self.buffers: dict = {}  # widened_linear's reused buffers, one per compute dtype
        self._read_buffers = ReadBuffers()
        self.piece_bytes = piece_bytes

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
        full = {k: f"model.layers.{i}.{k}" for k in names}
        # into reused buffers, as the reference's read_layer (memory.ReadBuffers says why)
        bufs = self._read_buffers.tensors([(k, self.files.shape(n), self.files.dtype(n)) for k, n in full.items()])
        return {k: self.files.read(n, out=bufs[k]).to(self.device) for k, n in full.items()}

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
                        WidenedLinear(mod.weight.data, None if mod.bias is None else mod.bias.data, self.buffers,
                                      self.piece_bytes, key=("hf", i, name)))
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
        # one product per piece and dtype for every hidden state of that dtype (rows are independent)
        dtypes = sorted({h.dtype for h in hs}, key=str)
        hn = {dt: torch.cat([norms[dt](h) for h in hs if h.dtype == dt], dim=-2) for dt in dtypes}
        name, vocab = self.output_name(), self.config.vocab_size
        step = max(1, self.piece_bytes // (self.config.hidden_size * 4))
        outs = {dt: [] for dt in dtypes}
        from .streams import prefetched  # the next piece read while this one multiplies

        xs = [hn[dt] for dt in dtypes]
        for _a, piece in prefetched(lambda a: self.files.rows(name, a, min(a + step, vocab)).to(self.device),
                                    list(range(0, vocab, step))):
            both = mixed_widened(xs, piece, self.buffers, self.piece_bytes) if len(xs) > 1 else None
            for dt, out in zip(dtypes, both or [widened_linear(x, piece, self.buffers, self.piece_bytes) for x in xs]):
                outs[dt].append(out.float())
        rows = {dt: iter(torch.cat(outs[dt], dim=-1).split([h.shape[-2] for h in hs if h.dtype == dt], dim=-2))
                for dt in dtypes}
        return [next(rows[h.dtype]) for h in hs]
