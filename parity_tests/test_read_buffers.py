"""memory.ReadBuffers: the streamed verify's layer reads reuse their buffers, never one still in use."""

import torch

from llama_parity.memory import ReadBuffers

SPECS = [("w", (3, 5), torch.bfloat16), ("norm", (5,), torch.float32), ("scalar", (), torch.float32)]


def test_a_buffer_still_viewed_is_never_handed_out_again():
    """Bug class: a reused buffer overwritten while a layer still reads from it (the next layer's
    weights silently replacing this one's mid-pass): any live view, however derived, keeps it taken."""
    pool = ReadBuffers(keep=2)
    first = pool.tensors(SPECS)
    first["w"].fill_(1)
    kept = first["scalar"].view(1)[0:1]  # a view of a view, the rest dropped
    del first
    for _ in range(4):  # whatever is taken meanwhile never lands on the kept bytes
        other = pool.tensors(SPECS)
        for t in other.values():
            t.fill_(7)
        del other
    assert kept.data_ptr() not in {t.data_ptr() for t in pool.tensors(SPECS).values()}


def test_released_buffers_are_reused_and_at_most_keep_are_kept():
    """Bug class: the page faults of a fresh buffer per layer (no reuse), or a pool that grows with
    every layer read (memory bound lost)."""
    pool = ReadBuffers(keep=2)
    a = pool.tensors(SPECS)
    where = a["w"].data_ptr()
    b = pool.tensors(SPECS)  # a still in use: another buffer
    assert b["w"].data_ptr() != where
    c = pool.tensors(SPECS)  # both in use: a fresh one, not kept
    assert len(pool._bufs) == 2
    del a
    assert pool.tensors(SPECS)["w"].data_ptr() == where
    del b, c


def test_carved_tensors_have_their_shapes_dtypes_and_do_not_overlap():
    """Bug class: two tensors of one layer sharing bytes (a read of one overwrites the other)."""
    out = ReadBuffers().tensors(SPECS)
    assert [(tuple(t.shape), t.dtype) for t in out.values()] == [(s, d) for _n, s, d in SPECS]
    spans = sorted((t.data_ptr(), t.data_ptr() + t.nbytes) for t in out.values())
    assert all(end <= start for (_s, end), (start, _e) in zip(spans, spans[1:]))
    assert all(t.data_ptr() % 64 == 0 for t in out.values())


def test_layer_progress_holds_no_layer_after_handing_it_over(monkeypatch):
    """Bug class: an iterator between `prefetched` and a layer loop (tqdm's own, enumerate's reused result
    tuple) keeping the last layer alive while the next is read ahead, so that no read buffer is free and a
    third layer's buffer is allocated (8B: peak RSS 1.6 -> 2.0 GB). The source, asked for each next layer,
    checks that the one before is gone."""
    import io
    import sys
    import weakref

    from llama_parity.streaming import _progress

    monkeypatch.setattr(sys, "stderr", type("Terminal", (io.StringIO,), {"isatty": lambda self: True})())

    class Layer:
        pass

    handed: list = []

    def source():
        for _ in range(4):
            assert all(r() is None for r in handed), "a layer handed over is still referenced"
            layer = Layer()
            handed.append(weakref.ref(layer))
            yield layer
            del layer

    for layer in _progress("")(source(), "layers", 4):  # a bar shown, as on a terminal
        del layer
    assert len(handed) == 4


def test_streamed_layer_loops_let_go_of_each_layer_before_the_next_read(tiny, monkeypatch):
    """Bug class: a layer loop of the streamed verify holding a layer past its turn (the HF loop's
    enumerate() kept each layer in its reused result tuple; tqdm's iterator does the same on a terminal),
    so the read ahead finds no free buffer and a third layer is resident (8B: peak RSS 1.6 -> 2.0 GB).
    Deterministic: each layer is read when the loop asks for it, one buffer kept per pool, so a layer
    still referenced at that moment shows as a freshly allocated buffer."""
    from llama_parity import memory, parity, streams
    from llama_parity.streaming import streaming_model_checks

    fresh, take = [], memory.ReadBuffers.take

    def one_kept(self, nbytes):
        self.keep = 1
        out = take(self, nbytes)
        if not any(out.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() for b, _ in self._bufs):
            fresh.append(nbytes)
        return out

    def read_when_asked(read, layers):
        for i in (range(layers) if isinstance(layers, int) else layers):
            tensors = read(i)
            yield i, tensors
            del tensors

    monkeypatch.setattr(memory.ReadBuffers, "take", one_kept)
    monkeypatch.setattr(streams, "prefetched", read_when_asked)
    meta, hf = tiny.meta("llama3.2-1b"), tiny.hf("llama3.2-1b")
    checks = streaming_model_checks(meta, hf, rope_scaling=parity.expected_rope_scaling(meta))
    assert checks and all(c.ok for c in checks), [c.name for c in checks if not c.ok]
    assert not fresh, f"{len(fresh)} layer reads found the previous layer still in use"
