"""Streaming conversion writes exactly the expected bytes: bf16 in, bf16 out, bit for bit.

Bug classes caught: a float round trip or dtype change of bf16 weights; chunk-boundary errors in
the row-chunked reader/writer (rows dropped, duplicated or shifted at a chunk edge, a permutation
applied across heads that straddle chunks); a shard merged on the wrong dim or in the wrong order;
kv replicas de-duplicated to the wrong copy; tensors written under the wrong name or into the
wrong output file when the output is split.

The expected tensors are computed here from the raw shards with torch.load and explicit index
arithmetic, independently of converter/transforms.py and converter/plan.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from llama_parity.converter import executor as executor_mod
from llama_parity.converter.convert import ConvertOptions, convert_meta_to_hf
from llama_parity import releases as variants
from llama_parity.fixtures.factory import make_tiny_checkpoint

# (variant, shards): single file, Llama 3 vocab-parallel embedding (dim 0), Llama 2 hidden-parallel
# embedding (dim 1), and more shards than kv heads (kv heads stored twice).
CASES = [
    ("llama3.2-1b", 1),
    ("llama3.1-8b", 1),
    ("llama3-70b", 8),
    ("llama2-70b", 8),
    ("llama3.1-405b-mp16", 16),
]

_LAYER_MAP = {
    "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
}


def _hf_name(meta_key: str) -> str | None:
    if meta_key == "rope.freqs":
        return None
    fixed = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    if meta_key in fixed:
        return fixed[meta_key]
    _, i, rest = meta_key.split(".", 2)
    return f"model.layers.{i}.{_LAYER_MAP[rest.removesuffix('.weight')]}.weight"


def _rotary_rows(n_heads: int, head_dim: int) -> torch.Tensor:
    """Source row for each HF row: within a head, Meta's even rows first, then its odd rows."""
    idx = []
    for h in range(n_heads):
        idx += [h * head_dim + 2 * j for j in range(head_dim // 2)]
        idx += [h * head_dim + 2 * j + 1 for j in range(head_dim // 2)]
    return torch.tensor(idx)


def expected_tensors(folder, spec) -> dict[str, torch.Tensor]:
    params = json.loads((folder / "params.json").read_text())
    shards = [torch.load(p, map_location="cpu", weights_only=True) for p in sorted(folder.glob("consolidated.*.pth"))]
    n_heads = params["n_heads"]
    head_dim = params["dim"] // n_heads
    llama3 = variants.FAMILY_FACTS[spec.family].tokenizer == "tiktoken"
    out = {}
    for key in shards[0]:
        name = _hf_name(key)
        if name is None or (key == "output.weight" and spec.tie_word_embeddings):
            continue  # rope.freqs is a buffer; a tied model's output copy is not written (HF ties it)
        leaf = key.split(".")[-2]
        if key == "tok_embeddings.weight":
            dim = 0 if llama3 else 1
        elif key == "output.weight" or leaf in ("wq", "wk", "wv", "w1", "w3"):
            dim = 0
        elif leaf in ("wo", "w2"):
            dim = 1
        else:
            dim = None
        t = shards[0][key] if dim is None or len(shards) == 1 else torch.cat([s[key] for s in shards], dim)
        if leaf in ("wk", "wv"):
            # Stored kv heads [h0, h0, h1, h1, ...] when there are more shards than kv heads: keep the first.
            stored = t.shape[0] // head_dim
            real = spec.hf_num_kv_heads if (len(shards) > 1 and spec.hf_num_kv_heads) else stored
            rep = stored // real
            keep = torch.tensor([h * rep * head_dim + r for h in range(real) for r in range(head_dim)])
            t = t.index_select(0, keep)
        if leaf == "wq":
            t = t.index_select(0, _rotary_rows(n_heads, head_dim))
        if leaf == "wk":
            t = t.index_select(0, _rotary_rows(t.shape[0] // head_dim, head_dim))
        out[name] = t
    return out


def _read_output(hf_dir) -> dict[str, torch.Tensor]:
    files = sorted(hf_dir.glob("*.safetensors"))
    index = hf_dir / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"] if index.exists() else None
    out = {}
    for f in files:
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                assert k not in out, f"{k} written twice"
                if weight_map is not None:
                    assert weight_map[k] == f.name, f"index puts {k} in {weight_map[k]}, found in {f.name}"
                out[k] = fh.get_tensor(k)
    return out


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    """(variant, shards) -> a tiny bf16 Meta checkpoint, built once per module: building one
    learns a tiny tokenizer, which costs more than the conversion under test."""
    built = {}

    def get(variant_id: str, shards: int):
        if (variant_id, shards) not in built:
            root = tmp_path_factory.mktemp(f"{variant_id}-mp{shards}")
            built[variant_id, shards] = make_tiny_checkpoint(variants.get(variant_id), root, num_shards=shards,
                                                             dtype=torch.bfloat16)
        return built[variant_id, shards]

    return get


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


@pytest.mark.parametrize("variant_id,shards", CASES, ids=[f"{v}-mp{n}" for v, n in CASES])
@pytest.mark.parametrize("chunk", ["default", "tiny"])
def test_streamed_output_is_bit_identical(tmp_path, monkeypatch, bf16_checkpoint, variant_id, shards, chunk):
    spec = variants.get(variant_id)
    folder = bf16_checkpoint(variant_id, shards)
    opts = ConvertOptions(write_tokenizer=False)
    if chunk == "tiny":
        # Chunks of a few rows (not a multiple of anything natural) and several output files:
        # every tensor crosses chunk boundaries, every file boundary is exercised.
        monkeypatch.setattr(executor_mod, "CHUNK_BYTES", 3000)
        opts.max_shard_bytes = 20_000
    hf = tmp_path / "hf"
    convert_meta_to_hf(folder, hf, opts)
    got = _read_output(hf)
    want = expected_tensors(folder, spec)
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        g = got[name]
        assert w.dtype == torch.bfloat16 and g.dtype == torch.bfloat16, f"{name}: {g.dtype}, input {w.dtype}"
        assert tuple(g.shape) == tuple(w.shape), f"{name}: {tuple(g.shape)} != {tuple(w.shape)}"
        assert torch.equal(_bits(g), _bits(w)), f"{name}: bytes differ from the expected transform"
    if chunk == "tiny":
        assert len(list(hf.glob("*.safetensors"))) > 1


def test_requested_dtype_converts_once(tmp_path, bf16_checkpoint):
    """--dtype float32 from bf16 widens exactly (bf16 -> fp32 is lossless), no other rounding."""
    spec = variants.get("llama3.2-1b")
    folder = bf16_checkpoint("llama3.2-1b", 1)
    convert_meta_to_hf(folder, tmp_path / "hf", ConvertOptions(write_tokenizer=False, dtype=torch.float32))
    got = _read_output(tmp_path / "hf")
    for name, w in expected_tensors(folder, spec).items():
        assert got[name].dtype == torch.float32
        assert torch.equal(got[name], w.float()), name


def test_mmap_fallback_gives_the_same_bytes(tmp_path, monkeypatch, bf16_checkpoint):
    """Files the zip reader does not understand go through torch's memory map: same output.

    Bug class: the fallback path (compressed records, legacy or foreign .pth layouts) rotting
    unnoticed because every fixture takes the fast path. Here the shards are really foreign: each
    matrix saved as a column-major view (same values, strided storage), which the record index refuses.
    """
    import shutil

    spec = variants.get("llama2-70b")
    folder = bf16_checkpoint("llama2-70b", 8)
    foreign = tmp_path / "download" / folder.name
    shutil.copytree(folder, foreign)
    for tok in folder.parent.glob("tokenizer.model"):  # Llama 2 ships it one folder up
        shutil.copy(tok, foreign.parent)
    for p in sorted(foreign.glob("consolidated.*.pth")):
        sd = torch.load(p, weights_only=True)
        torch.save({k: v.t().contiguous().t() if v.dim() == 2 else v for k, v in sd.items()}, p)
    monkeypatch.setattr(executor_mod, "CHUNK_BYTES", 3000)
    report = convert_meta_to_hf(foreign, tmp_path / "hf", ConvertOptions(write_tokenizer=False))
    got = _read_output(tmp_path / "hf")
    for name, w in expected_tensors(folder, spec).items():
        assert torch.equal(_bits(got[name]), _bits(w)), name
    # ... and the user is told the fast path was left (memory then grows with the mapped tensors)
    assert any("memory map instead of direct reads" in w for w in report.warnings), report.warnings
