"""Where a streamed verify's time goes: `verify --memory streaming --no-tokenizer` run in this process
with timers wrapped around its phases, and the floor each phase could reach on this machine.

    python -m benchmarks.verify_profile --case 8b [--work /work/bench-8b]   # prints a markdown table

The checkpoint is verify_bench's (built there if missing). The page cache is evicted first, as in
verify_bench. Timers (wall seconds in the main thread, which does all the arithmetic; the reader
thread's reads overlap it and are shown as "waiting for reads"):

- start-up: importing torch, transformers and the CLI; the verify's metadata checks; the byte check
  (exact_bytes.py) as its own note reports it;
- per side, per stream kind (recognised by the step's token count and dtype: near 50 fp32, near
  bf16, far 12, kv prefill 8, kv single 1, kv chunk, greedy prompt): the decoder-layer calls;
- the reference's greedy passes; the output projections (head, logits);
- the main thread's waits for the reader thread.

The floor column prices each phase at this machine's rates measured here: matmul FLOP/s at the
phase's token count (fp32, bf16) and, for reads, the cold `dd` rate of both models.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import collections  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

T0 = time.perf_counter()
import torch  # noqa: E402

from benchmarks.run import evict, machine  # noqa: E402
from benchmarks.verify_bench import CASES, build, matmul_rate  # noqa: E402

TIMES: dict[str, float] = collections.defaultdict(float)
CALLS: dict[str, int] = collections.defaultdict(int)
TOKENS: dict[str, dict] = {}  # phase -> {dtype: tokens}
IN_GREEDY = False


def _timed(key_of, f):
    def wrapper(*a, **kw):
        key = key_of(*a, **kw)
        t = time.perf_counter()
        try:
            return f(*a, **kw)
        finally:
            TIMES[key] += time.perf_counter() - t
            CALLS[key] += 1
    return wrapper


def _group_key(calls) -> str:
    """A group of passes run together through one layer (streams.run_together): which side, dtype."""
    fn = calls[0][0]
    owner = type(getattr(fn.func, "__self__", None)).__name__
    if owner == "StreamingHF":
        side = "HF"
    elif len(fn.args) > 1 and isinstance(fn.args[0], int):
        side = "reference"
    else:  # the reference's output projections of both dtypes
        return "reference: output projections (fp32 + bf16, run together)"
    dtypes = {c[0].args[1].dtype for c in calls}
    tokens = {d: sum(c[0].args[1].shape[1] for c in calls if c[0].args[1].dtype == d) for d in dtypes}
    kind = " + ".join(n for d, n in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")) if d in dtypes)
    key = f"{side}: {kind} streams ({len(calls)} passes, {sum(tokens.values())} tokens)"
    TOKENS[key] = tokens
    return key


def install() -> None:
    from llama_parity import exact_bytes, streams
    from llama_parity.hf_layers import StreamingHF
    from llama_parity.reference_model.model import Transformer

    streams.run_together = _timed(lambda calls: _group_key(calls) if calls else "empty", streams.run_together)
    real_layer = Transformer.layer

    def layer(self, i, h, *a, **kw):  # only the greedy passes call it from the main thread
        if not IN_GREEDY:
            return real_layer(self, i, h, *a, **kw)
        key = "reference: greedy passes (1 token each)"
        TOKENS[key] = {torch.float32: 1}
        return _timed(lambda *a, **k: key, real_layer)(self, i, h, *a, **kw)
    Transformer.layer = layer
    Transformer.head = _timed(lambda *a, **k: "reference: output projection" + (" (greedy)" if IN_GREEDY else ""),
                              Transformer.head)
    StreamingHF.logits = _timed(lambda *a, **k: "HF: output projection", StreamingHF.logits)
    StreamingHF.embed = _timed(lambda *a, **k: "HF: embedding rows", StreamingHF.embed)
    StreamingHF.layer = _timed(lambda *a, **k: "HF: building layers", StreamingHF.layer)
    exact_bytes.check_exact_bytes = _timed(lambda *a, **k: "byte check (every weight, both folders)",
                                           exact_bytes.check_exact_bytes)
    # the reader thread's own time per read (overlapping the main thread's: not part of the wall's sum)
    Transformer.read_layer = _timed(lambda *a, **k: "(reader thread) reading Meta layers" + (" for greedy" if IN_GREEDY else ""),
                                    Transformer.read_layer)
    Transformer.map_layer = _timed(lambda *a, **k: "(reader thread) mapping Meta layers for greedy",
                                   Transformer.map_layer)
    StreamingHF.read_layer = _timed(lambda *a, **k: "(reader thread) reading HF layers", StreamingHF.read_layer)
    real_greedy = streams.reference_greedy

    def greedy(*a, **kw):
        global IN_GREEDY
        IN_GREEDY = True
        try:
            return real_greedy(*a, **kw)
        finally:
            IN_GREEDY = False
    import llama_parity.streaming as streaming
    streaming.reference_greedy = greedy

    real_prefetched = streams.prefetched

    def prefetched(read, layers):
        it = real_prefetched(read, layers)
        owner = getattr(read, "__self__", None)  # a layer reader, or the HF output matrix's piece reader
        side = ("reference pass" if type(owner).__name__ == "Transformer" else "HF pass") if owner is not None \
            else "HF output matrix"
        key = f"waiting for reads ({'greedy passes' if IN_GREEDY else side})"
        while True:
            t = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            finally:
                TIMES[key] += time.perf_counter() - t
            yield item
    streams.prefetched = prefetched


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=CASES, default="1b")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--work", type=Path, default=Path("/work/bench-stream"))
    ap.add_argument("--no-evict", action="store_true")
    a = ap.parse_args(argv)
    meta, hf = build(a.work, a.case, a.layers)
    from llama_parity import cli

    TIMES["start-up (imports)"] = time.perf_counter() - T0
    install()
    files = [*meta.glob("consolidated.*.pth"), *hf.glob("*.safetensors")]
    if not a.no_evict:
        evict(files)
    t = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        rc = cli.main(["verify", "--meta-dir", str(meta), "--hf-dir", str(hf), "--memory", "streaming",
                       "--no-tokenizer"])
    wall = time.perf_counter() - t
    accounted = sum(v for k, v in TIMES.items() if k != "start-up (imports)" and not k.startswith("(reader"))
    cfg = json.loads((hf / "config.json").read_text())
    d, f, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * d // cfg["num_attention_heads"]
    layer_params = 2 * d * d + 2 * d * kv + 3 * d * f
    rates: dict[tuple[torch.dtype, int], float] = {}

    def rate(dtype, n):
        if (dtype, n) not in rates:
            rates[dtype, n] = matmul_rate(dtype, n, d, f)
        return rates[dtype, n]

    print(f"machine: {machine()}")
    print(f"case {a.case}{f' ({a.layers} layers)' if a.layers else ''}: verify exit {rc}, wall {wall:.1f} s "
          f"(+ {TIMES['start-up (imports)']:.1f} s imports); timed phases {accounted:.1f} s")
    print("| phase | calls | seconds | share | floor (products at this token count's rate) |")
    print("|---|---|---|---|---|")
    for k, v in sorted(TIMES.items(), key=lambda kv: -kv[1]):
        floor = ""
        if k in TOKENS:
            # each dtype's tokens at its own rate; a bf16 product at the faster of the bf16 kernels and
            # fp32 (verify uses the first on CPUs with bf16 units, the second elsewhere)
            seconds, said = 0.0, []
            for dtype, n in sorted(TOKENS[k].items(), key=lambda dn: str(dn[0])):
                best = max(rate(torch.float32, n), rate(torch.bfloat16, n) if dtype == torch.bfloat16 else 0.0)
                seconds += 2 * layer_params * n * CALLS[k] / best
                said.append(f"{'bf16' if dtype == torch.bfloat16 else 'fp32'} {best / 1e9:.0f} GFLOP/s at n={n}")
            floor = f"{seconds:.1f} s ({', '.join(said)})"
        print(f"| {k} | {CALLS.get(k, 1)} | {v:.1f} | {100 * v / (wall + TIMES['start-up (imports)']):.0f}% | {floor} |")
    print(f"| (not timed: metadata checks, report, the rest) | | {wall - accounted:.1f} | | |")


if __name__ == "__main__":
    main()
