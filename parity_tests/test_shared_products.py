"""Passes through one layer run together (llama_parity/shared_products.py): the streamed verify's
way of computing each weight's product once for every stream. What a bug here would do: a pass
given another pass's rows (a stream judged on another stream's numbers), kv steps attending before
the earlier steps wrote the cache (decode through the cache silently wrong), a failing pass hanging
the verify."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from llama_parity.reference_model.model import ModelArgs, Transformer
from llama_parity.shared_products import Aborted, order_writes, product, run_together


def _tiny_reference(seed: int = 0, shards: int = 1) -> Transformer:
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=32)
    g = torch.Generator().manual_seed(seed)
    f = args.ffn_hidden_dim
    sd = {"tok_embeddings.weight": torch.randn(97, 64, generator=g), "norm.weight": torch.rand(64, generator=g) + 0.5,
          "output.weight": torch.randn(97, 64, generator=g)}
    kv = args.n_kv_heads * args.head_dim
    for i in range(2):
        p = f"layers.{i}."
        sd |= {p + "attention.wq.weight": torch.randn(64, 64, generator=g) / 8,
               p + "attention.wk.weight": torch.randn(kv, 64, generator=g) / 8,
               p + "attention.wv.weight": torch.randn(kv, 64, generator=g) / 8,
               p + "attention.wo.weight": torch.randn(64, 64, generator=g) / 8,
               p + "feed_forward.w1.weight": torch.randn(f, 64, generator=g) / 8,
               p + "feed_forward.w3.weight": torch.randn(f, 64, generator=g) / 8,
               p + "feed_forward.w2.weight": torch.randn(64, f, generator=g) / 8,
               p + "attention_norm.weight": torch.rand(64, generator=g) + 0.5,
               p + "ffn_norm.weight": torch.rand(64, generator=g) + 0.5}
    return Transformer(args, [sd], embedding_dim=0, dtype=torch.float64)


class _Linear:
    """A linear layer that asks for its product the way the streamed verify's layers do."""

    def __init__(self, w):
        self.w, self.calls = w, 0

    def __call__(self, x):
        def compute(x):
            self.calls += 1
            return x @ self.w.T
        return product(id(self), x, compute)


def test_each_pass_gets_its_own_rows_from_one_product():
    """Bug class: rows handed to the wrong pass, or the product computed once per pass (no sharing)."""
    a, b = _Linear(torch.randn(5, 3, dtype=torch.float64)), _Linear(torch.randn(2, 5, dtype=torch.float64))
    xs = [torch.randn(1, n, 3, dtype=torch.float64) for n in (1, 4, 2, 7)]
    outs = run_together([(lambda x=x: b(torch.tanh(a(x))), None, 0) for x in xs])
    for x, out in zip(xs, outs):
        torch.testing.assert_close(out, torch.tanh(x @ a.w.T) @ b.w.T, rtol=1e-12, atol=1e-12)
    assert (a.calls, b.calls) == (1, 1)


@pytest.mark.parametrize("reverse", [False, True])
def test_kv_steps_run_together_equal_one_after_another(reverse):
    """Bug class: decode steps through a shared KV cache attending before the earlier steps wrote it
    (submitted in reverse, the threads would write in the wrong order without the turns), or a
    batched product that changes what a step computes. Reference layer, float64: exact order."""
    ref = _tiny_reference()
    tokens = torch.tensor([[5, 17, 3, 88, 41, 9, 60, 2, 33, 71]])
    steps = [(0, 4), (4, 5), (5, 6), (6, 10)]

    def begin(cache):
        return [ref.begin(tokens[:, a:b], a, cache=cache) for a, b in steps]

    def alone():
        cache = ref.new_cache(1, 10)
        hs = [list(x) for x in begin(cache)]
        for i in range(ref.args.n_layers):
            for (a, _b), st in zip(steps, hs):
                st[0] = ref.layer(i, st[0], st[1], a, st[2], cache=cache)
        return [st[0] for st in hs]

    def together():
        cache = ref.new_cache(1, 10)
        order_writes(cache, "write", lambda layer, part, *_a: (layer, part))
        hs = [list(x) for x in begin(cache)]
        for i in range(ref.args.n_layers):
            calls = [(lambda st=st, a=a: ref.layer(i, st[0], st[1], a, st[2], cache=cache), cache, j)
                     for j, ((a, _b), st) in enumerate(zip(steps, hs))]
            order = list(reversed(range(len(calls)))) if reverse else list(range(len(calls)))
            outs = run_together([calls[j] for j in order])
            for j, out in zip(order, outs):
                hs[j][0] = out
        return [st[0] for st in hs]

    for x, y in zip(alone(), together()):
        torch.testing.assert_close(y, x, rtol=1e-12, atol=1e-12)


def test_writes_wait_their_turn():
    """Bug class: a later step's cache write overtaking an earlier one's (the turn ignored)."""
    written = []

    class Cache:
        def write(self, layer, part):
            written.append(threading.current_thread().name)
            return layer

    cache, lin = Cache(), _Linear(torch.eye(2))
    order_writes(cache, "write", lambda layer, part: (layer, part))

    def step(j):
        def run():
            lin(torch.ones(1, 1, 2))
            time.sleep(0.01 * (3 - j))  # the later steps arrive first
            threading.current_thread().name = f"step {j}"
            return cache.write(0, 0)
        return run

    run_together([(step(j), cache, j) for j in (3, 2, 1, 0)])
    assert written == ["step 0", "step 1", "step 2", "step 3"]


def test_a_failing_pass_fails_the_group_without_hanging():
    """Bug class: one pass raising while the others wait at the next product forever (a hung verify)."""
    lin = _Linear(torch.eye(2))

    def bad():
        raise ValueError("shape mismatch in pass 2")

    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="pass 2"):
        run_together([(lambda: lin(torch.ones(1, 1, 2)), None, 0), (bad, None, 0), (lambda: lin(torch.ones(1, 2, 2)), None, 0)])
    assert time.perf_counter() - t0 < 10
    assert issubclass(Aborted, RuntimeError)


@pytest.mark.parametrize("stored", ["bfloat16", "float32"])
def test_bf16_products_round_like_bf16_kernels(stored, native_bf16):
    """Bug class: the bf16 stream's products (computed in fp32 on CPUs without bf16 units, torch's
    bf16 kernels on the others, streamed verify) not being bf16 products: weights stored in fp32 used
    unrounded, or the result left in fp32 precision. Each output must equal torch's own bf16 kernel
    to within one bf16 rounding, on both sides (reference piecewise product and the HF layer's), and
    the weights must be the bf16-rounded ones."""
    import torch.nn.functional as F

    from llama_parity.hf_layers import widened_linear

    g = torch.Generator().manual_seed(1)
    w = torch.randn(40, 32, generator=g).to(getattr(torch, stored))
    x = torch.randn(1, 6, 32, generator=g).to(torch.bfloat16)
    kernel = F.linear(x, w.to(torch.bfloat16)).float()
    ulp = kernel.abs() * 2 ** -7 + 1e-30
    hf = widened_linear(x, w, {}, piece_bytes=4 * 32 * 3)
    assert hf.dtype == torch.bfloat16 and bool(((hf.float() - kernel).abs() <= ulp).all())
    unrounded = F.linear(x.float(), w.float())  # weights not rounded: off by far more than the kernel
    if stored == "float32":
        assert not torch.equal(hf.float(), unrounded.to(torch.bfloat16).float())

    from llama_parity.reference_model import model

    class Raw:
        def shape(self, key):
            return tuple(w.shape)

    conv = model._Converted(Raw(), torch.device("cpu"), torch.bfloat16, None, piece_bytes=4 * 32 * 3)
    conv.held = {"w": w}
    ref = conv.linear(x, "w")
    assert ref.dtype == torch.bfloat16 and bool(((ref.float() - kernel).abs() <= ulp).all())
    torch.testing.assert_close(ref, hf, rtol=0, atol=0)
    if native_bf16 and stored == "bfloat16":  # the kernel itself, on the weight as stored
        assert torch.equal(hf.float(), kernel) and torch.equal(ref.float(), kernel)


class _MixedLinear:
    """A weight that fp32 passes and bf16 passes share: `mixed` computes both in one product."""

    def __init__(self, w, can_mix: bool = True):
        self.w, self.can_mix, self.calls, self.mixed_calls = w, can_mix, [], 0

    def __call__(self, x):
        def compute(x):
            self.calls.append(x.dtype)
            return (x.float() @ self.w.float().T).to(x.dtype)

        def mixed(xs):
            if not self.can_mix:
                return None
            self.mixed_calls += 1
            out = torch.cat([x.float() for x in xs], dim=-2) @ self.w.float().T
            return [o.to(x.dtype) for o, x in zip(out.split([x.shape[-2] for x in xs], dim=-2), xs)]
        return product(id(self), x, compute, mixed)


@pytest.mark.parametrize("can_mix", [True, False])
def test_fp32_and_bf16_passes_share_one_product_each_in_its_dtype(can_mix):
    """Bug class: the bf16 stream given fp32 rows (or the fp32 streams rounded to bf16) when both
    dtypes' passes share a weight's product, rows handed to the wrong pass, the weight widened once
    per dtype although one product serves both, or a group that cannot mix left waiting. Small
    integers: every product exact in both dtypes, so any mix-up shows."""
    g = torch.Generator().manual_seed(3)
    lin = _MixedLinear(torch.randint(-3, 4, (6, 4), generator=g).to(torch.bfloat16), can_mix)
    xs = [torch.randint(-3, 4, (1, n, 4), generator=g).to(dt)
          for n, dt in ((3, torch.float32), (1, torch.bfloat16), (2, torch.float32), (4, torch.bfloat16))]
    outs = run_together([(lambda x=x: lin(x), None, 0) for x in xs])
    for x, out in zip(xs, outs):
        assert out.dtype == x.dtype
        assert torch.equal(out, (x.float() @ lin.w.float().T).to(x.dtype))
    if can_mix:
        assert (lin.mixed_calls, lin.calls) == (1, [])
    else:  # one product per dtype, each by a pass of that dtype
        assert sorted(map(str, lin.calls)) == ["torch.bfloat16", "torch.float32"]


def test_the_streams_bf16_products_through_the_shared_widening_equal_their_own(native_bf16):
    """Bug class: the reference's shared product (_Converted._mixed: the fp32 streams and the bf16
    one through one widening of a bf16-stored weight; with bf16 kernels, one product per dtype)
    computing another product than each side's own path: the bf16 stream's must stay fp32 sums of
    bf16 values rounded to bf16, the fp32 streams' the fp32 product, whatever rows ride along."""
    ref = _tiny_reference()
    ref16_sd = {k: v.to(torch.bfloat16) for k, v in ref.w[0].items()}
    from llama_parity.reference_model.model import _Converted

    class _Held:  # a shard reader over tensors in memory
        def __init__(self, sd):
            self.sd = sd

        def dtype(self, k):
            return self.sd[k].dtype

        def shape(self, k):
            return tuple(self.sd[k].shape)

    raw = _Held(ref16_sd)
    c32 = _Converted(raw, torch.device("cpu"), torch.float32, None)
    c16 = _Converted(raw, torch.device("cpu"), torch.bfloat16, None)
    key = "layers.0.feed_forward.w1.weight"
    c32.held = c16.held = {key: ref16_sd[key]}
    c16.shares = c32
    g = torch.Generator().manual_seed(1)
    x32, x16 = torch.randn(1, 5, 64, generator=g), torch.randn(1, 3, 64, generator=g).to(torch.bfloat16)
    alone = [c32._linear(x32, key), c16._linear(x16, key)]
    together = run_together([(lambda: c32.linear(x32, key), None, 0), (lambda: c16.linear(x16, key), None, 0)])
    torch.testing.assert_close(together[0], alone[0], rtol=1e-6, atol=1e-6)
    assert together[1].dtype == torch.bfloat16
    # one bf16 rounding apart at most (the fp32 sums may be ordered differently in a larger product)
    torch.testing.assert_close(together[1].float(), alone[1].float(), rtol=2 ** -7, atol=1e-6)


def test_wide_weights_are_widened_in_pieces_of_as_many_rows_as_the_rest():
    """Bug class: the 14336-wide down projection widened 73 rows at a time (a product with that few
    output columns ran at 3/4 of the rate of 128 rows or more), or tiny test pieces no longer
    crossing row edges (the piece tests would then prove nothing)."""
    from llama_parity.shared_products import piece_rows

    assert piece_rows(14336, 4 << 20) == piece_rows(4096, 4 << 20) == 256
    assert piece_rows(128, 4 * 4 * 128) == 4 and piece_rows(384, 4 * 4 * 128) == 1
