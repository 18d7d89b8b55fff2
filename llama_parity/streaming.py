"""Bounded-memory parity for real weights: every check of the full verify, one decoder layer at a time.

This module runs it and judges the result; the parts have their own modules: reading the files
(llama_parity/formats: pread, never a memory map), the HF layer adapter (llama_parity/hf_layers.py),
the token streams and each side's layer-by-layer pass (llama_parity/streams.py), memory sizing and
the allocator policy (llama_parity/memory.py).

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
into one reused buffer (hf_layers.widened_linear, reference_model/model.py _Converted.linear), so no fp32 copy
of a layer exists. Embedding rows are gathered for the prompt's tokens only, the output matrix is
read once per side for every stream at once, in the same pieces. Peak above a bare
torch+transformers process: two layers as stored, the reference's logits of every stream
(benchmarks/RESULTS.md has the measurements).

Time: each side's files are read once (the Meta shards stay in the page cache for greedy's extra
passes when they fit), reads overlap the products of the layer before, and go into buffers reused
from layer to layer (memory.ReadBuffers: a fresh buffer's page faults cost more than the copy).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tqdm import tqdm

from llama_parity.reference_model.model import RopeScalingArgs, Transformer, load_meta_checkpoint

from .hf_layers import PIECE_BYTES, StreamingHF
from .parity import (FP32_REL_BOUND, KV_CATCHES, Check, Prompts, bf16_checks, compare_fp32, distribution_checks,
                     far_check, far_positions, greedy_check, kv_detail, layers_check, model_prompts)
from .streams import Relay, build_streams, reference_greedy, run_hf, run_reference

# Streamed, each new token after the first is one more pass over the Meta weights: fewer than full.
STREAMED_GREEDY_TOKENS = 8


def _progress(desc_prefix: str, quiet: bool = False):
    quiet = quiet or not sys.stderr.isatty()
    return lambda it, desc, total=None, unit="layer": _counted(
        iter(it), tqdm(desc=f"{desc_prefix}{desc}", unit=unit, total=total, disable=quiet))


def _counted(it, bar):
    """The items of `it`, each counted on `bar` once the caller is done with it, none held after it is
    handed over: tqdm's own iterator keeps the last item until the next one has arrived, so a layer
    read ahead (streams.prefetched) found the one before it still in use, and a third layer's buffer
    was allocated (8B: peak RSS 1.6 -> 2.0 GB)."""
    try:
        while True:
            try:
                yield next(it)  # yielded straight from the stack: no name holds it while the caller works
            except StopIteration:
                return
            bar.update(1)
    finally:
        bar.close()


@torch.inference_mode()
def streaming_model_checks(meta_dir: Path, hf_dir: Path, *, rope_scaling: RopeScalingArgs | None,
                           device: str = "cpu", prompt: list[int] | None = None, bf16: bool = True,
                           greedy_tokens: int = STREAMED_GREEDY_TOKENS, round_to: torch.dtype | None = None,
                           quick: bool = False, piece_bytes: int = PIECE_BYTES,
                           relay: Relay | None = None, round_vectors: bool = True) -> list[Check]:
    """Every model check of the full verify, streamed; see the module docstring for what each costs.
    `round_to`: the HF weights' dtype when the conversion changed it (the reference then computes with
    Meta's weights rounded to it; its norms too unless `round_vectors` is False); `quick`: fp32
    logits and far positions only; `piece_bytes`: fp32
    bytes of weight rows widened per product on both sides (tests make it tiny to cross piece edges);
    `relay`: this process's layers when several share the model (distributed.py); only the one that
    judges returns checks.

    Run from the CLI, the process first calls memory.return_freed_memory (a process-wide allocator
    policy: without it, RSS grows by the weight pieces glibc keeps in its heap)."""
    ref32 = load_meta_checkpoint(meta_dir, rope_scaling=rope_scaling, device=device, dtype=torch.float32, lazy=True,
                                 round_to=round_to, piece_bytes=piece_bytes, round_vectors=round_vectors)
    ref16 = Transformer(ref32.args, [sd.raw for sd in ref32.w], embedding_dim=ref32.embedding_dim, device=device,
                        dtype=torch.bfloat16, lazy=True, piece_bytes=piece_bytes)
    hf = StreamingHF(Path(hf_dir), device, piece_bytes)
    layout, fatal = hf.layout_check()
    if fatal:
        return [layout]  # the layers cannot be built (a missing lm_head alone is judged by the logits)
    prompts = model_prompts(meta_dir, min(hf.config.vocab_size, ref32.args.vocab_size))
    if prompt:
        prompts = Prompts(prompt, prompt[:8], "given ids")
    far, bf16 = far_positions(rope_scaling), bf16 and not quick
    relay = relay or Relay(ref32.args.n_layers)
    progress = _progress("verifying ", quiet=not relay.judges)
    ref_streams = build_streams(prompts, far, bf16, greedy_room=greedy_tokens, quick=quick)
    r, ref_hidden = run_reference(ref32, ref16, ref_streams, progress, relay)
    cont = []
    if not quick:
        greedy = next(s for s in ref_streams if s.name == "greedy")
        cont = reference_greedy(ref32, greedy, r.pop("greedy", None), greedy_tokens, progress, relay)
    del ref32, ref16, ref_streams
    hf_prompts = Prompts(prompts.main, prompts.greedy + cont[:-1], prompts.source)
    h, diffs = run_hf(hf, build_streams(hf_prompts, far, bf16, quick=quick, greedy_from=len(prompts.greedy) - 1),
                      ref_hidden, progress, relay)
    if not relay.judges:
        return []
    if not h:  # named as the full check that catches it there
        return [layout, layers_check(diffs), Check(
            "logits (fp32)", "tie_word_embeddings lost on a tied model (random lm_head)", 1.0, FP32_REL_BOUND, False,
            "no lm_head.weight and tie_word_embeddings is false: transformers would initialise lm_head randomly")]
    return [layout, layers_check(diffs)] + _judge(r, h, prompts, far, cont, greedy_tokens)


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
