"""The token streams of the streamed verify and their layer-by-layer passes through each side.

A stream is one check's tokens (near, kv, far@P, greedy, near bf16). Each side's pass reads every
layer once (the next one in a reader thread, `prefetched`) and runs every stream through it while it
is resident: the reference (reference_model/model.py, Meta's math over unmerged shards) first, then
the HF side (llama_parity/hf_layers.py, transformers' own modules), which also compares its hidden
state after each layer with the reference's. A `Relay` says which layers this process runs: all of
them here, one range per rank in distributed.py (the same passes, hidden states handed on).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch

from llama_parity.reference_model.model import Transformer

from .hf_layers import StreamingHF
from .parity import Prompts, kv_steps, rel_diff
from .shared_products import order_writes, run_together


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
    if s.cache is not None:  # steps run together write a layer's slots in their order
        order_writes(s.cache, "write", lambda layer, part, *_a, **_k: (layer, part))
    out = []
    for j, (a, b) in enumerate(s.steps):
        toks = torch.tensor([s.tokens[a:b]])
        h, rot, mask = ref.begin(toks, a, None if s.cache is not None else s.step_positions(j), s.cache)
        out.append([h, rot, mask, a])
    return out


def run_reference(ref32: Transformer, ref16: Transformer, streams: list[Stream], progress,
                  relay: "Relay | None" = None) -> tuple[dict, list]:
    """All streams through the reference layers (relay.layers: every one here), each layer read once;
    returns logits per stream (where relay.judges) and the near stream's hidden state after each layer."""
    relay = relay or Relay(ref32.args.n_layers)
    refs = {torch.float32: ref32, torch.bfloat16: ref16}
    ref16.share_products(ref32)
    state = {s.name: _ref_begin(refs, s) for s in streams}
    hidden = []
    relay.before([st[0] for s in streams for st in state[s.name]])
    for i, tensors in progress(prefetched(ref32.read_layer, relay.layers), "reference layers", len(relay.layers)):
        ref32.hold_layer(i, tensors=tensors)
        ref16.hold_layer(i, source=ref32)
        # every step of every stream through the layer at once: each weight's product computed once
        # for all of them, fp32 and bf16 alike (shared_products.py)
        steps = [(s, j, st) for s in streams for j, st in enumerate(state[s.name])]
        outs = run_together([(partial(refs[s.dtype].layer, i, st[0], st[1], st[3], st[2], cache=s.cache), s.cache, j)
                             for s, j, st in steps])
        for (_s, _j, st), h in zip(steps, outs):
            st[0] = h
        ref32.release_layer()
        ref16.release_layer()
        del tensors
        hidden.append(state["near"][0][0][0].to("cpu", torch.float32, copy=True))  # after(): received in place
    relay.after([st[0] for s in streams for st in state[s.name]])
    logits = {}
    # one pass over the output matrix for every stream of both dtypes (where the verdict is made)
    groups = {dtype: [s for s in streams if s.dtype == dtype] for dtype in refs} if relay.judges else {}
    groups = {dtype: g for dtype, g in groups.items() if g}
    hs = {dtype: [torch.cat([st[0] for st in state[s.name]], dim=1)[:, s.logits_from:] for s in g]
          for dtype, g in groups.items()}
    outs = run_together([(partial(refs[dtype].head, torch.cat(hs[dtype], dim=1)), None, 0) for dtype in groups])
    for dtype, out in zip(groups, outs):
        logits.update(zip((s.name for s in groups[dtype]), out[0].split([h.shape[1] for h in hs[dtype]])))
    return logits, hidden


@torch.inference_mode()
def reference_greedy(ref: Transformer, stream: Stream, first_logits: torch.Tensor | None, n_new: int,
                     progress=None, relay: "Relay | None" = None) -> list[int]:
    """Continue the greedy stream (its caches hold the prompt at every layer): one pass per token
    (on a 70B whose shards exceed the page cache, minutes each: `progress` shows them). Each pass
    goes through relay.layers; the process that judges picks the token and tells the others."""
    relay = relay or Relay(ref.args.n_layers)
    out, pos = [relay.decide(lambda: int(first_logits[-1].argmax()))], len(stream.tokens)
    steps = range(n_new - 1)
    ref.map_reads(True)  # the output matrix too: from the page cache, as the layers
    try:
        _greedy_passes(ref, stream, out, pos, relay, progress(steps, "greedy passes over the Meta weights", len(steps),
                                                              "token") if progress else steps)
    finally:
        ref.map_reads(False)
    return out


def _greedy_passes(ref: Transformer, stream: Stream, out: list[int], pos: int, relay: "Relay", steps) -> None:
    for _ in steps:
        h, rot, mask = ref.begin(torch.tensor([[out[-1]]]), pos, cache=stream.cache)
        relay.before([h])
        # the next layer is mapped in a thread while this one computes: a one-token pass is as fast as
        # its reads (from the page cache when the shards fit, else from disk); mapped, not copied (8B:
        # 36 s of copying from the page cache for 7 passes, more than their products)
        for i, tensors in prefetched(ref.map_layer, relay.layers):
            ref.hold_layer(i, tensors=tensors)
            del tensors
            h = ref.layer(i, h, rot, pos, mask, cache=stream.cache)
            ref.release_layer()
        relay.after([h])
        out.append(relay.decide(lambda: int(ref.head(h)[0, -1].argmax())))
        pos += 1


# --- the HF side ------------------------------------------------------------------------------------
def run_hf(hf: StreamingHF, streams: list[Stream], ref_hidden: list, progress,
           relay: "Relay | None" = None) -> tuple[dict, list[float]]:
    """The HF side of run_reference: logits per stream (where relay.judges) and the near stream's
    difference to the reference after each layer (every layer's, gathered from all processes)."""
    from transformers import DynamicCache

    relay = relay or Relay(hf.config.num_hidden_layers)
    for s in streams:
        s.cache = DynamicCache() if s.cached else None
        if s.cache is not None:  # steps run together append to a layer's cache in their order
            order_writes(s.cache, "update", lambda _k, _v, layer_idx, *_a, **_kw: layer_idx)
        s.h = [hf.embed(s.tokens[a:b], s.dtype) for a, b in s.steps]
    diffs = []
    relay.before([h for s in streams for h in s.h])
    # no enumerate(): its reused result tuple would hold each layer's tensors until the next layer has
    # been read (one more layer resident; _counted in streaming.py says the same of tqdm). This
    # process's k-th layer is diffs' next entry.
    for i, tensors in progress(prefetched(hf.read_layer, relay.layers), "HF layers", len(relay.layers)):
        # the fp32 build of the layer and, for the bf16 stream, the bf16 one (its norms in bf16); their
        # linear layers share each product (WidenedLinear keys), every step of every stream at once
        layers = {torch.float32: hf.layer(i, tensors)}
        if any(s.dtype == torch.bfloat16 for s in streams):
            layers[torch.bfloat16] = hf.layer(i, tensors).to(torch.bfloat16)
        del tensors
        steps = [(s, j, a) for s in streams for j, (a, _b) in enumerate(s.steps)]
        outs = run_together([(partial(hf.run, layers[s.dtype], s.h[j], s.step_positions(j), a if s.cached else 0,
                                      s.cache), s.cache, j) for s, j, a in steps])
        for (s, j, _a), h in zip(steps, outs):
            s.h[j] = h
        del layers
        near = next(s for s in streams if s.name == "near")
        diffs.append(rel_diff(ref_hidden[len(diffs)], near.h[0][0]))
    relay.after([h for s in streams for h in s.h])
    diffs = relay.gather(diffs)
    if hf.output_name() is None or not relay.judges:
        return {}, diffs
    logits = hf.logits([torch.cat(s.h, dim=1)[:, s.logits_from:] for s in streams])
    return {s.name: x[0] for s, x in zip(streams, logits)}, diffs


def prefetched(read, layers):
    """(i, read(i)) for i in `layers` (a count: 0..n-1), the next layer read in a thread while the caller
    computes with layer i: reads (pread, mostly waiting on the disk) overlap the products. One extra
    layer is resident."""
    from concurrent.futures import ThreadPoolExecutor

    layers = list(range(layers) if isinstance(layers, int) else layers)
    with ThreadPoolExecutor(1, thread_name_prefix="llama-parity-reader") as pool:
        nxt = pool.submit(read, layers[0]) if layers else None
        for k, i in enumerate(layers):
            cur = nxt.result()
            nxt = pool.submit(read, layers[k + 1]) if k + 1 < len(layers) else None
            yield i, cur
            del cur


class Relay:
    """Which decoder layers this process runs and how hidden states reach the processes that run the
    others: here every layer, nothing to pass. distributed.py's ranks each run one contiguous range
    (RankRelay), so the same functions stream a model split across processes.

    before(ts)/after(ts): around this process's layers, the hidden states `ts` (in place) receive the
    earlier ranges' results / hand this range's to the later ones. decide(f): f() where the verdict
    is made, its value told to all. gather(xs): each range's per-layer values, in layer order."""

    judges = True

    def __init__(self, n_layers: int):
        self.layers = range(n_layers)

    def before(self, tensors: list) -> None:
        pass

    def after(self, tensors: list) -> None:
        pass

    def decide(self, f):
        return f()

    def gather(self, values: list) -> list:
        return values
