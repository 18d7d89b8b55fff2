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
