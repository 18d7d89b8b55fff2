"""Meta -> HF -> Meta is bit-exact: same shards, same tensors, same params.

Catches: an inverse transform that is not the inverse (q/k rows, kv replication), shards cut on
the wrong dim or in the wrong order, a tied model losing output.weight, params.json that would
build a different model (FFN rounding, kv heads, theta, scaling).
"""

from __future__ import annotations

import json
import zipfile

import pytest
import torch

from llama_parity.converter.hf_to_meta import convert_hf_to_meta
from llama_parity.releases import architecture_variants
from llama_parity.reference_model.model import ModelArgs, RopeScalingArgs


@pytest.mark.parametrize("variant_id", [v.id for v in architecture_variants()])
def test_meta_hf_meta_round_trip(tiny, tmp_path, variant_id):
    """Bug class: HF -> Meta conversion that does not undo Meta -> HF exactly."""
    src = tiny.meta(variant_id)
    back = tmp_path / src.name
    rep = convert_hf_to_meta(tiny.hf(variant_id), back, num_shards=len(list(src.glob("consolidated.*.pth"))))
    originals = sorted(src.glob("consolidated.*.pth"))
    assert [p.name for p in originals] == sorted(p.name for p in back.glob("consolidated.*.pth"))
    for p in originals:
        a = torch.load(p, weights_only=True)
        b = torch.load(back / p.name, weights_only=True)
        with zipfile.ZipFile(back / p.name) as z:  # written tensor by tensor: every record's CRC is right
            assert z.testzip() is None, p.name
        assert a.keys() == b.keys(), p.name
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{p.name}: {k}"
    pa, pb = json.loads((src / "params.json").read_text()), json.loads((back / "params.json").read_text())
    scaling = RopeScalingArgs(1.0) if pa.get("use_scaled_rope") else None
    n = 1000
    ma = ModelArgs.from_params(pa, vocab_size=n, rope_scaling=scaling)
    mb = ModelArgs.from_params(pb, vocab_size=n, rope_scaling=scaling)
    same = lambda m: (m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.ffn_hidden_dim, m.norm_eps, m.rope_theta,
                      m.use_scaled_rope, m.vocab_size if pa.get("vocab_size", -1) != -1 else -1)
    assert same(ma) == same(mb), rep.notes


@pytest.mark.parametrize("mmap,old_torch", [(False, False), (True, False), (True, True)])
def test_tensor_by_tensor_pth_is_what_torch_save_writes(tmp_path, monkeypatch, mmap, old_torch):
    """Bug class: the one-tensor-at-a-time .pth writer (HF -> Meta) mapping a tensor's bytes to
    another tensor's record, leaving a record unfilled, or writing a zip torch.load (memory-mapped
    or not) or a zip checker refuses: every dtype, a 0-d and an empty tensor, records crossing the
    writer's chunk size; on a torch without skip_data (before 2.5) the same file, built in memory."""
    from llama_parity.converter import pth_writer

    if old_torch:
        monkeypatch.delattr(torch.serialization, "skip_data")

    g = torch.Generator().manual_seed(0)
    want = {"w.bf16": torch.randn(300, 7, generator=g).to(torch.bfloat16), "n.f32": torch.randn(11, generator=g),
            "f16": torch.randn(5, 3, generator=g).half(), "scalar": torch.tensor(3.5), "empty": torch.empty(0, 4),
            "i64": torch.arange(9)}
    monkeypatch.setattr(pth_writer, "CHUNK", 100)  # bytes: most records take several writes
    path = tmp_path / "consolidated.00.pth"
    pth_writer.save_one_at_a_time(path, {k: (tuple(v.shape), v.dtype) for k, v in want.items()}, lambda k: want[k])
    got = torch.load(path, weights_only=True, mmap=mmap)
    assert list(got) == list(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v), k
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None
    with pytest.raises(ValueError, match="planned"):
        pth_writer.save_one_at_a_time(tmp_path / "x.pth", {"a": ((2,), torch.float32)}, lambda k: torch.zeros(3))
