"""Synthetic Meta checkpoints of REAL shapes, written one tensor at a time.

`torch.save` needs the whole state dict in memory, which for the 8B shape (16 GB) defeats the
point of a memory benchmark. A `.pth` file is an uncompressed zip: `data.pkl` (a pickle naming,
for each key, a storage record, its offset, shape and stride), then one `data/N` record of raw
bytes per storage. We write the same layout with `zipfile` (records 64-byte aligned like
torch.save), stream each tensor's random bf16 bytes in blocks, and check the result with
`torch.load(mmap=True)`.

Shapes, shard dims and params.json come from llama_parity/releases (real values); the data is
random, which is all a conversion benchmark needs. Tensors are cut for model parallelism the way
Meta's shards are (column-parallel on dim 0, wo/w2 on dim 1, Llama 3 embedding on dim 0, norms
replicated), computed here independently of converter/.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import pickle
import shutil
import zipfile
import zlib
from pathlib import Path

import torch

from llama_parity import releases as variants

_ALIGN = 64
_STORAGE_TYPES = {torch.bfloat16: "BFloat16Storage", torch.float16: "HalfStorage", torch.float32: "FloatStorage"}


def full_shapes(spec: variants.VariantSpec) -> list[tuple[str, tuple[int, ...], int | None]]:
    """(meta key, unsharded shape, model-parallel split dim or None) in Meta's key order."""
    p = dict(spec.params)
    dim, n_heads = int(p["dim"]), int(p["n_heads"])
    n_kv = int(p.get("n_kv_heads") or n_heads)
    hd, ffn, vocab = dim // n_heads, variants.implied_arch(p).hidden, spec.vocab_size
    emb_dim = variants.FAMILY_FACTS[spec.family].embedding_shard_dim
    out = [("tok_embeddings.weight", (vocab, dim), emb_dim)]
    for i in range(int(p["n_layers"])):
        pre = f"layers.{i}."
        out += [(pre + "attention.wq.weight", (n_heads * hd, dim), 0),
                (pre + "attention.wk.weight", (n_kv * hd, dim), 0),
                (pre + "attention.wv.weight", (n_kv * hd, dim), 0),
                (pre + "attention.wo.weight", (dim, n_heads * hd), 1),
                (pre + "feed_forward.w1.weight", (ffn, dim), 0),
                (pre + "feed_forward.w2.weight", (dim, ffn), 1),
                (pre + "feed_forward.w3.weight", (ffn, dim), 0),
                (pre + "attention_norm.weight", (dim,), None),
                (pre + "ffn_norm.weight", (dim,), None)]
    out.append(("norm.weight", (dim,), None))
    # Meta's files carry output.weight even for the tied 3.2 models (a copy of the embedding; the
    # converter checks they are equal and writes one), so the file is larger than the HF model.
    out.append(("output.weight", (vocab, dim), 0))
    return out


class _Storage:
    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _Tensor:
    def __init__(self, storage: _Storage, shape: tuple[int, ...]):
        self.storage, self.shape = storage, shape


class _Pickler(pickle.Pickler):
    """Emits the same pickle torch.save does for a dict of contiguous CPU tensors."""

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", getattr(torch, _STORAGE_TYPES[obj.dtype]), obj.key, "cpu", obj.numel)
        return None

    def reducer_override(self, obj):
        if isinstance(obj, _Tensor):
            stride, acc = [], 1
            for d in reversed(obj.shape):
                stride.insert(0, acc)
                acc *= d
            return (torch._utils._rebuild_tensor_v2,
                    (obj.storage, 0, tuple(obj.shape), tuple(stride), False, collections.OrderedDict()))
        return NotImplemented


def _aligned_info(zf: zipfile.ZipFile, name: str, size: int) -> zipfile.ZipInfo:
    """A ZipInfo whose local-header padding puts the record's data on a 64-byte boundary."""
    zi = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    zi.compress_type = zipfile.ZIP_STORED
    zi.file_size = size
    offset = zf.fp.tell()
    zip64 = size * 1.05 > zipfile.ZIP64_LIMIT  # zipfile then adds a 20-byte zip64 extra field
    base = offset + 30 + len(name.encode()) + (20 if zip64 else 0)
    pad = -(base + 4) % _ALIGN  # our padding is itself an extra field with a 4-byte header
    zi.extra = b"\xfe\xca" + pad.to_bytes(2, "little") + b"\0" * pad
    return zi


def write_meta_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype,
                     fill, block_bytes: int = 64 << 20) -> None:
    """Write a torch.save-compatible file of `tensors`; `fill(key, flat_bf16_block)` makes the data."""
    archive = path.stem
    storages = []
    sd = {}
    for i, (key, shape) in enumerate(tensors):
        numel = 1
        for d in shape:
            numel *= d
        st = _Storage(str(i), dtype, numel)
        storages.append((key, st))
        sd[key] = _Tensor(st, shape)
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(sd)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        small = [("data.pkl", buf.getvalue()), ("byteorder", b"little")]
        for name, data in small:
            zf.writestr(_aligned_info(zf, f"{archive}/{name}", len(data)), data)
        itemsize = dtype.itemsize
        block_elems = max(1, block_bytes // itemsize)
        for key, st in storages:
            nbytes = st.numel * itemsize
            with zf.open(_aligned_info(zf, f"{archive}/data/{st.key}", nbytes), "w", force_zip64=nbytes > 2**31) as fh:
                done = 0
                while done < st.numel:
                    n = min(block_elems, st.numel - done)
                    block = fill(key, n).to(dtype)
                    fh.write(memoryview(block.view(torch.uint8).numpy()))
                    done += n
        zf.writestr(_aligned_info(zf, f"{archive}/version", 2), b"3\n")


def make_checkpoint(variant_id: str, out: Path, num_shards: int = 1, dtype: torch.dtype = torch.bfloat16,
                    tokenizer: Path | None = None, seed: int = 0, n_layers: int | None = None) -> Path:
    """Write consolidated.NN.pth + params.json (+ tokenizer.model) for the real shape of variant_id
    (`n_layers`: the real layer shapes and vocabulary, fewer layers, e.g. to measure a 70B per layer)."""
    spec = variants.get(variant_id)
    if n_layers is not None:
        import dataclasses

        spec = dataclasses.replace(spec, params=dict(spec.params, n_layers=n_layers))
    out.mkdir(parents=True, exist_ok=True)
    gens: dict[str, torch.Generator] = {}

    def fill(key: str, n: int) -> torch.Tensor:
        # One random stream per (shard, tensor); a tied output replays the embedding's stream, so
        # its bytes are identical, as in Meta's 3.2 files. Values only need plausible bytes.
        if key not in gens:
            src = "tok_embeddings.weight" if (key == "output.weight" and spec.tie_word_embeddings) else key
            gens[key] = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(f"{shard}:{src}".encode()))
        return torch.randn(n, generator=gens[key]) * 0.02

    shapes = full_shapes(spec)
    for shard in range(num_shards):
        gens.clear()
        part_shapes = []
        for key, shape, split in shapes:
            shape = list(shape)
            if split is not None:
                if shape[split] % num_shards:
                    raise ValueError(f"{key}: dim {split} of {shape} does not split into {num_shards}")
                shape[split] //= num_shards
            part_shapes.append((key, tuple(shape)))
        write_meta_shard(out / f"consolidated.{shard:02d}.pth", part_shapes, dtype, fill)
    params = dict(spec.params)
    (out / "params.json").write_text(json.dumps(params))
    if tokenizer is not None:
        shutil.copyfile(tokenizer, out / "tokenizer.model")
    return out


def check_loadable(folder: Path) -> None:
    """torch.load(mmap=True) must read what we wrote, with the shapes we meant."""
    for p in sorted(folder.glob("consolidated.*.pth")):
        sd = torch.load(p, map_location="cpu", mmap=True, weights_only=True)
        for k, t in sd.items():
            if not t.is_contiguous():
                raise AssertionError(f"{p}:{k} not contiguous")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variant")
    ap.add_argument("out", type=Path)
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--no-tokenizer", action="store_true")
    a = ap.parse_args(argv)
    tok = None
    if not a.no_tokenizer:
        from llama_parity.fixtures.tokenizers import real_llama3_tokenizer

        tok = real_llama3_tokenizer()
    make_checkpoint(a.variant, a.out, a.shards, tokenizer=tok)
    check_loadable(a.out)


if __name__ == "__main__":
    main()
