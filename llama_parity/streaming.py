"""Bounded-memory parity for real weights: both models run one decoder layer at a time.

The full checks (parity.py) hold both models in memory, twice the model in fp32: fine for tiny
and small checkpoints, impossible for a 70B on a 24 GiB machine. Here transformers' own
`LlamaDecoderLayer` is built for one layer at a time (on the meta device, then given that layer's
tensors from the safetensors files), and the reference reads the Meta shards lazily (each weight
converted when its layer runs). Peak memory: about one layer of each side in fp32 plus activations,
the embedding rows the prompt uses, and an 8192-row chunk of the output matrix.

Checks: per-layer hidden states (the first divergent layer is named), logits, and far positions
(8 tokens at 0..7 then 4 at 12000..12003 in one causal pass). KV-cache decoding and greedy
generation need every layer per token and are left to the full checks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from llama_parity.reference_model.model import RopeScalingArgs, load_meta_checkpoint

from .parity import FAR_START, FP32_REL_BOUND, Check, _rel_diff, fixed_prompt


class StreamingHF:
    """transformers' Llama layers, instantiated and loaded one layer at a time."""

    def __init__(self, hf_dir: Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        from safetensors import safe_open
        from transformers import AutoConfig
        from transformers.models.llama import modeling_llama

        from llama_parity.converter.safetensors_writer import read_index

        self.m = modeling_llama
        self.config = AutoConfig.from_pretrained(str(hf_dir))
        self.config._attn_implementation = "eager"
        self.dtype, self.device = dtype, device
        self.weight_map = read_index(hf_dir)
        self.files = {f: safe_open(str(hf_dir / f), "pt") for f in set(self.weight_map.values())}
        self.rotary = modeling_llama.LlamaRotaryEmbedding(self.config).to(device)

    def _get(self, name: str) -> torch.Tensor:
        return self.files[self.weight_map[name]].get_tensor(name).to(device=self.device, dtype=self.dtype)

    def _rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.files[self.weight_map[name]].get_slice(name)[start:stop].to(device=self.device, dtype=self.dtype)

    def embed(self, tokens: list[int]) -> torch.Tensor:
        rows = [self._rows("model.embed_tokens.weight", t, t + 1) for t in tokens]
        return torch.cat(rows)[None]

    def layer(self, i: int):
        with torch.device("meta"):
            layer = self.m.LlamaDecoderLayer(self.config, i)
        prefix = f"model.layers.{i}."
        sd = {k[len(prefix):]: self._get(k) for k in self.weight_map if k.startswith(prefix)}
        layer.load_state_dict(sd, assign=True, strict=True)
        return layer.eval()

    def run_layer(self, layer, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        n = h.shape[1]
        mask = torch.full((n, n), torch.finfo(h.dtype).min, device=self.device).triu(1)[None, None]
        pos = positions[None].to(self.device)
        cos_sin = self.rotary(h, pos)
        out = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
        return out[0] if isinstance(out, tuple) else out

    def logits(self, h: torch.Tensor, rows: int = 8192) -> torch.Tensor:
        norm = self.m.LlamaRMSNorm(self.config.hidden_size, eps=self.config.rms_norm_eps).to(self.device)
        norm.weight.data = self._get("model.norm.weight")
        hn = norm(h)
        name = "lm_head.weight" if "lm_head.weight" in self.weight_map else "model.embed_tokens.weight"
        if name != "lm_head.weight" and not self.config.tie_word_embeddings:
            return None  # transformers would initialise lm_head randomly
        vocab = self.config.vocab_size
        return torch.cat([torch.nn.functional.linear(hn, self._rows(name, a, min(a + rows, vocab)))
                          for a in range(0, vocab, rows)], dim=-1).float()


@torch.inference_mode()
def streaming_model_checks(meta_dir: Path, hf_dir: Path, *, rope_scaling: RopeScalingArgs | None,
                           device: str = "cpu", prompt: list[int] | None = None) -> list[Check]:
    ref = load_meta_checkpoint(meta_dir, rope_scaling=rope_scaling, device=device, dtype=torch.float32, lazy=True)
    hf = StreamingHF(Path(hf_dir), torch.float32, device)
    tokens = prompt or fixed_prompt(min(hf.config.vocab_size, ref.args.vocab_size))
    far_tokens = tokens[:12]
    far_pos = torch.cat([torch.arange(8), torch.arange(FAR_START, FAR_START + 4)])
    runs = {"near": (tokens, torch.arange(len(tokens))), "far": (far_tokens, far_pos)}

    # Reference: its own forward, weights converted layer by layer, per-layer outputs traced.
    ref_hidden, ref_logits = {}, {}
    for name, (toks, pos) in runs.items():
        trace: list = []
        ref_logits[name] = ref.forward(torch.tensor([toks]), trace=trace, positions=pos)[0]
        # residual stream after each layer = embedding + sum of attention and feed-forward outputs
        h, per_layer = None, []
        for stage, t in trace:
            h = t if h is None else h + t
            if stage.endswith("feed-forward"):
                per_layer.append(h[0].float().cpu())
        ref_hidden[name] = per_layer
    del ref

    # HF: one decoder layer in memory at a time, applied to both runs.
    hs = {name: hf.embed(toks) for name, (toks, _pos) in runs.items()}
    layer_diffs = []
    for i in tqdm(range(hf.config.num_hidden_layers), desc="verifying layers", unit="layer",
                  disable=not sys.stderr.isatty()):
        layer = hf.layer(i)
        for name, (_toks, pos) in runs.items():
            hs[name] = hf.run_layer(layer, hs[name], pos)
        del layer
        layer_diffs.append(_rel_diff(ref_hidden["near"][i], hs["near"][0]))
    checks = []
    worst = max(range(len(layer_diffs)), key=lambda i: layer_diffs[i])
    first_bad = next((i for i, d in enumerate(layer_diffs) if d > FP32_REL_BOUND), None)
    checks.append(Check("hidden states per layer (streamed)", "a fault inside one layer (permutation, merge, norm)",
                        layer_diffs[worst], FP32_REL_BOUND, first_bad is None,
                        "all layers agree" if first_bad is None else f"first divergent layer: {first_bad}"))
    near, far = hf.logits(hs["near"]), hf.logits(hs["far"])
    if near is None:
        checks.append(Check("lm_head", "tie_word_embeddings lost on a tied model (random lm_head)", 1.0, 0.0, False,
                            "no lm_head.weight and tie_word_embeddings is false"))
        return checks
    d = _rel_diff(ref_logits["near"], near[0])
    checks.append(Check("logits (fp32, streamed)", "weights permuted/merged wrongly, wrong norm eps, FFN size or theta",
                        d, FP32_REL_BOUND, d <= FP32_REL_BOUND, f"{len(tokens)} tokens at 0..{len(tokens) - 1}"))
    d = _rel_diff(ref_logits["far"][8:], far[0, 8:])
    checks.append(Check("far positions (streamed)", "missing or wrong RoPE scaling, wrong rope_theta",
                        d, FP32_REL_BOUND, d <= FP32_REL_BOUND, f"8 tokens at 0..7, 4 at {FAR_START}.."))
    return checks


def model_bytes_fp32(hf_dir: Path) -> int:
    cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    d, layers, v = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    kv = cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    hd = cfg.get("head_dim") or d // cfg["num_attention_heads"]
    per_layer = 2 * d * d + 2 * d * kv * hd + 3 * d * cfg["intermediate_size"]
    return 4 * (layers * per_layer + 2 * v * d)
