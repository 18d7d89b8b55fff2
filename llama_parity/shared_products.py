"""Several passes through one decoder layer that share each weight's matrix product.

The streamed verify runs a dozen token sequences through every layer while it is resident (the
streams of streams.py: near, far@P, the kv-cache steps, greedy). Run one after another, each pass
widens every bf16 weight to fp32 again, a few rows at a time, and multiplies it by a handful of
tokens: on an 8B, fifteen widenings of the layer per side, each as slow as reading it from memory,
and single-token products far below the matmul rate.

`run_together(calls)` runs each pass (an unchanged call of the layer: Meta's math in
reference_model/model.py, transformers' own LlamaDecoderLayer) in its own thread. The linear layers
ask `product(key, x, compute)`: when every pass has asked for the same weight, one thread computes
it once for all of their rows (one widening, one larger product) and each pass gets its own rows
back. A linear layer treats rows independently, so each pass computes what it would alone; only
attention mixes tokens, and it still runs per pass. Passes that share a KV cache (the kv stream's
steps) write it in their order (`in_turn`), so step j attends exactly to steps 0..j.

The bf16 stream's products are bf16 products: bf16 values, fp32 sums, the result rounded to bf16.
On a CPU with bf16 dot-product units (`native_bf16()`) they are torch's own bf16 kernels on the
weight as stored, 2-3x the fp32 rate. Elsewhere torch runs those kernels at half the fp32 rate, so
the same sums are computed in fp32 (hf_layers.py, reference_model/model.py) and the bf16 stream
joins the fp32 ones: a weight stored in bf16 is widened once and multiplied once for every stream
of both dtypes (`mixed`), each pass's rows then rounded to its own dtype.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import torch

_current = threading.local()  # .group: the Together this thread's pass belongs to; .turns: {id(cache): j}


def _has_bf16_units() -> bool:
    cpu = getattr(torch, "cpu", None)
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):  # what oneDNN's bf16 kernels use
        try:
            if getattr(cpu, name)():
                return True
        except (AttributeError, RuntimeError):
            pass
    return False


# Whether bf16 products use torch's bf16 kernels on CPU (read at each product: tests set it). On the
# 2-core EPYC (AVX512-BF16) a 50-token product of the 1B's FFN weight ran at 304 GFLOP/s in bf16
# against 84 in fp32; both sides of a verify use the same kernels, so their bf16 results still meet.
NATIVE_BF16 = _has_bf16_units()


def native_bf16(x: torch.Tensor) -> bool:
    """x's products in bf16 run as torch's own bf16 kernels (GPUs; CPUs with bf16 units)."""
    return x.dtype == torch.bfloat16 and (x.device.type != "cpu" or NATIVE_BF16)


class Aborted(RuntimeError):
    """Another pass of the group failed: this one stops too (the first error is raised)."""


@dataclass
class _Pending:
    xs: list = field(default_factory=list)
    computes: list = field(default_factory=list)  # each pass's own compute, for its dtype
    out: list | None = None


class Together:
    """The rendezvous of `n` passes through one layer."""

    def __init__(self, n: int):
        self.n = n
        self.cond = threading.Condition()
        self.pending: dict = {}
        self.turns: dict = {}  # (id(cache), key) -> how many passes have written that slot group
        self.failed = False

    def _wait(self, ready) -> None:
        self.cond.wait_for(lambda: self.failed or ready())
        if self.failed:
            raise Aborted("another pass through this layer failed")

    def product(self, key, x: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor],
                mixed: Callable[[list], list | None] | None = None) -> torch.Tensor:
        with self.cond:
            p = self.pending.setdefault(key, _Pending())
            i = len(p.xs)
            p.xs.append(x)
            p.computes.append(compute)
            if len(p.xs) < self.n:
                self._wait(lambda: p.out is not None)
                return p.out[i]
            del self.pending[key]  # the last pass to arrive computes
        out = (mixed and mixed(p.xs)) if len({t.dtype for t in p.xs}) > 1 else None
        if out is None:  # one product per dtype, each with its passes' own compute
            out = [None] * len(p.xs)
            for dtype in {t.dtype for t in p.xs}:
                idx = [k for k, t in enumerate(p.xs) if t.dtype == dtype]
                parts = p.computes[idx[0]](torch.cat([p.xs[k] for k in idx], dim=-2))
                for k, part in zip(idx, parts.split([p.xs[k].shape[-2] for k in idx], dim=-2)):
                    out[k] = part
        with self.cond:
            p.out = out
            self.cond.notify_all()
        return out[i]

    def in_turn(self, cache, key, turn: int, write: Callable):
        """Call `write` (a cache write) once the passes before `turn` on this cache wrote `key`."""
        slot = (id(cache), key)
        with self.cond:
            self._wait(lambda: self.turns.get(slot, 0) == turn)
        try:
            return write()
        finally:
            with self.cond:
                self.turns[slot] = turn + 1
                self.cond.notify_all()

    def abort(self) -> None:
        with self.cond:
            self.failed = True
            self.cond.notify_all()


# A piece's rows are counted as if its inputs were at most this wide: a 4 MB fp32 piece of a 4096-wide
# weight is 256 rows, but of the 14336-wide down projection only 73, and a product with that few
# output columns ran at 60 GFLOP/s against 80 for 128 rows or more (CPU time, 208 tokens, a 2-core
# EPYC). Wide weights get pieces of the same row count instead, a few times the bytes.
PIECE_WIDTH = 4096


def piece_rows(n_in: int, piece_bytes: int) -> int:
    """Rows of an `n_in`-wide weight widened per product (both sides use it: it only splits rows)."""
    return max(1, piece_bytes // (min(n_in, PIECE_WIDTH) * 4))


def product(key, x: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor],
            mixed: Callable[[list], list | None] | None = None) -> torch.Tensor:
    """compute(x), shared with the other passes of this thread's group when there is one: the passes
    of one dtype share one compute(rows of all of them). Passes of several dtypes (the fp32 streams
    and the bf16 one) share one product through `mixed(xs)` (each x's own product, in order) when
    it can (it returns None when it cannot: then one product per dtype)."""
    group = getattr(_current, "group", None)
    return compute(x) if group is None else group.product(key, x, compute, mixed)


def in_turn(cache, key, write: Callable):
    """write() now, or, in a group, after the earlier passes on `cache` wrote `key` (a layer, a part)."""
    group = getattr(_current, "group", None)
    turn = None if group is None else getattr(_current, "turns", {}).get(id(cache))
    return write() if turn is None else group.in_turn(cache, key, turn, write)


def order_writes(cache, method: str, key_of: Callable) -> None:
    """Make `cache.method` (its write) wait its turn when called from a group's pass: key_of(*args)
    names what one write fills (a layer, a shard's part); passes write it in their turn's order."""
    write = getattr(cache, method)

    def ordered(*a, **kw):
        return in_turn(cache, key_of(*a, **kw), lambda: write(*a, **kw))
    setattr(cache, method, ordered)


def run_together(calls: list[tuple[Callable[[], object], object, int]]) -> list:
    """Run `calls` [(fn, cache or None, turn on that cache)] as one group, each in its own thread;
    their results in order. Each call is one pass of the same layer (so each asks for the same
    products in the same order); calls on one cache are its steps, turn 0, 1, ..."""
    if len(calls) <= 1:
        return [fn() for fn, _cache, _turn in calls]
    group = Together(len(calls))

    def run(fn, cache, turn):
        _current.group = group
        _current.turns = {} if cache is None else {id(cache): turn}
        try:
            with torch.inference_mode():
                return fn()
        except BaseException:
            group.abort()
            raise
        finally:
            _current.group = None
            _current.turns = {}

    pool = ThreadPoolExecutor(len(calls), thread_name_prefix="llama-parity-pass")  # one thread per pass: all must wait together
    try:
        futures = [pool.submit(run, *c) for c in calls]
        results, first = [], None
        for f in futures:
            try:
                results.append(f.result())
            except Aborted:
                results.append(None)
            except Exception as e:  # the pass that failed first; the others were Aborted
                first = first or e
                results.append(None)
        if first is not None:
            raise first
        return results
    except BaseException:  # a signal in this thread: the passes stop at their next product
        group.abort()
        raise
    finally:
        pool.shutdown()
