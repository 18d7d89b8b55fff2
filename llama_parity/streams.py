"""The token streams of the streamed verify and their layer-by-layer passes through each side.

A stream is one check's tokens (near, kv, far@P, greedy, near bf16). Each side's pass reads every
layer once (the next one in a reader thread, `prefetched`) and runs every stream through it while it
is resident: the reference (reference_model/model.py, Meta's math over unmerged shards) first, then
the HF side (llama_parity/hf_layers.py, transformers' own modules), which also compares its hidden
state after each layer with the reference's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llama_parity.reference_model.model import Transformer

from .hf_layers import StreamingHF
from .parity import Prompts, kv_steps, rel_diff


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
def _ref_begin(refs: dict, s: Stream) -> list:
    """Per step (h, rot, mask, start) for the reference; a cached stream gets its own KV cache."""
    ref = refs[s.dtype]
    s.cache = ref.new_cache(1, len(s.tokens) + s.room) if s.cached or s.room else None
    out = []
    for j, (a, b) in enumerate(s.steps):
        toks = torch.tensor([s.tokens[a:b]])
        h, rot, mask = ref.begin(toks, a, None if s.cache is not None else s.step_positions(j), s.cache)
        out.append([h, rot, mask, a])
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
                for st in state[s.name]:
                    st[0] = refs[dtype].layer(i, st[0], st[1], st[3], st[2], cache=s.cache)
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
    steps = range(n_new - 1)
    for _ in (progress(steps, "greedy passes over the Meta weights", len(steps), "token") if progress else steps):
        out.append(int(ref.forward(torch.tensor([[out[-1]]]), pos, cache=stream.cache)[0, -1].argmax()))
        pos += 1
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
