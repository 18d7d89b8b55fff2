"""The bad-input catalog: every way a careful release engineer found to feed the tool bad input.

Each case asserts, for the command that meets it: the exit code (2: bad input or environment;
1 stays reserved for "readable and they disagree"), one line on stderr naming the culprit (file,
key or flag), no traceback, and that the whole test folder (inputs, output parent, hidden
staging folders) is byte-for-byte what it was before: nothing left behind, inputs untouched.

Simulated vs real: the full disk and the read-only parent are real tmpfs mounts when the machine
allows `mount` (root here; tests run as root, so chmod would not stop a write), otherwise the
same OSErrors are injected and the test says so in its output. Signals are sent to real child
processes running the CLI (forked from the test process, see Forked), slowed by a test hook.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from llama_parity.cli import main

from .forked import Forked

SMALL = "llama3.2-1b"  # one shard, tokenizer beside it
PARENT_TOK = "llama2-7b"  # tokenizer.model one folder up, as Llama 2 downloads ship it
SHARDED = "llama2-13b"  # two shards


# ---------------------------------------------------------------- helpers

def snapshot(root: Path) -> dict[str, str]:
    """Every entry under root (hidden ones too): file hashes, link targets, folders."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def copy_meta(tiny, variant_id: str, dest: Path) -> Path:
    """A private copy of a tiny checkpoint, keeping where its tokenizer.model sits."""
    src = tiny.meta(variant_id)
    out = dest / src.name
    shutil.copytree(src, out)
    if (src.parent / "tokenizer.model").is_file():
        shutil.copy(src.parent / "tokenizer.model", dest / "tokenizer.model")
    return out


def copy_hf(tiny, variant_id: str, dest: Path) -> Path:
    out = dest / "hf"
    shutil.copytree(tiny.hf(variant_id), out)
    return out


def add_tensor(pth: Path, key: str, value: torch.Tensor) -> None:
    sd = torch.load(pth, weights_only=True)
    sd[key] = value
    torch.save(sd, pth)


class Evil:
    """Unpickled unsafely, this runs code: it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def make_evil(pth: Path, marker: Path) -> None:
    """A consolidated.NN.pth with every real tensor plus one object whose unpickling runs code."""
    sd = torch.load(pth, weights_only=True)
    sd["layers.0.attention.wq.weight_scale"] = Evil(marker)
    torch.save(sd, pth)


def truncate(p: Path, keep: float = 0.5) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: int(len(data) * keep)])


def set_header_len(p: Path, n: int) -> None:
    data = bytearray(p.read_bytes())
    data[:8] = struct.pack("<Q", n)
    p.write_bytes(bytes(data))


def edit_json(p: Path, **changes) -> None:
    d = json.loads(p.read_text())
    d.update(changes)
    p.write_text(json.dumps(d))


def add_hf_tensor(hf: Path, name: str, shape) -> None:
    from safetensors.torch import load_file, save_file

    f = hf / "model.safetensors"
    sd = load_file(str(f))
    sd[name] = torch.zeros(shape, dtype=next(iter(sd.values())).dtype)
    save_file(sd, str(f), metadata={"format": "pt"})


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """A real tmpfs mount at path, or None when this machine does not allow mounting."""
    path.mkdir(parents=True, exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                        capture_output=True).returncode == 0 if hasattr(os, "geteuid") and os.geteuid() == 0 else False
    try:
        yield path if ok else None
    finally:
        if ok:
            subprocess.run(["umount", "-l", str(path)], check=False)


# ---------------------------------------------------------------- the catalog

@dataclass
class Case:
    name: str
    setup: Callable  # (tiny, tmp_path) -> (argv, culprit): the input is built under tmp_path
    code: int = 2


def _convert(src, out, *extra):
    return ["convert", "--input-dir", src, "--output-dir", out, "--no-progress", *extra]


def _m(tiny, tmp, vid=SMALL):
    return copy_meta(tiny, vid, tmp / "in")


def c_overwrite_same(tiny, tmp):
    src = _m(tiny, tmp)
    return _convert(src, src, "--overwrite"), "is the input folder"


def c_overwrite_parent(tiny, tmp):
    src = _m(tiny, tmp)
    return _convert(src, src.parent, "--overwrite"), "contains the input folder"


def c_overwrite_grandparent(tiny, tmp):
    src = _m(tiny, tmp)
    return _convert(src, tmp, "--overwrite"), "contains the input folder"


def c_overwrite_tokenizer_folder(tiny, tmp):
    # Llama 2 layout: tokenizer.model one folder up; replacing that folder would delete it.
    src = _m(tiny, tmp, PARENT_TOK)
    return _convert(src, src.parent, "--overwrite"), str(src.parent)


def _move_and_link(path: Path, folder: Path, name: str) -> Path:
    """Move `path` to folder/name (created) and leave a symlink to it in its place."""
    folder.mkdir()
    path.rename(folder / name)
    path.symlink_to(folder / name)
    return folder


def c_overwrite_linked_tokenizer(tiny, tmp):
    # tokenizer.model is a symlink into a shared folder: that folder is an input too.
    src = _m(tiny, tmp)
    shared = _move_and_link(src / "tokenizer.model", tmp / "shared", "tokenizer.model")
    return _convert(src, shared, "--overwrite"), "tokenizer.model"


def c_overwrite_symlink_to_input(tiny, tmp):
    src = _m(tiny, tmp)
    link = tmp / "link"
    link.symlink_to(src)
    return _convert(src, link, "--overwrite"), "a link to"


def c_overwrite_linked_blobs(tiny, tmp):
    # The Hugging Face cache layout: the shard is a symlink to a blob stored elsewhere.
    src = _m(tiny, tmp)
    blobs = _move_and_link(src / "consolidated.00.pth", tmp / "blobs", "abc123")
    return _convert(src, blobs, "--overwrite"), "consolidated.00.pth"


def c_output_is_input_file(tiny, tmp):
    src = _m(tiny, tmp)
    return _convert(src, src / "params.json", "--overwrite"), "is not a directory"


def c_not_empty(tiny, tmp):
    src = _m(tiny, tmp)
    (tmp / "out" / "hf").mkdir(parents=True)
    (tmp / "out" / "hf" / "mine.txt").write_text("keep me")
    return _convert(src, tmp / "out" / "hf"), "--overwrite"


def c_parent_under_file(tiny, tmp):
    src = _m(tiny, tmp)
    (tmp / "afile").write_text("x")
    return _convert(src, tmp / "afile" / "sub" / "hf"), str(tmp / "afile")


def c_no_params(tiny, tmp):
    src = _m(tiny, tmp)
    (src / "params.json").unlink()
    return _convert(src, tmp / "out" / "hf"), "params.json"


def c_params_bad_json(tiny, tmp):
    src = _m(tiny, tmp)
    (src / "params.json").write_text('{"dim": 64,')
    return _convert(src, tmp / "out" / "hf"), str(src / "params.json")


def c_params_wrong_type(tiny, tmp):
    src = _m(tiny, tmp)
    edit_json(src / "params.json", n_layers="two")
    return _convert(src, tmp / "out" / "hf"), "n_layers"


def c_params_not_object(tiny, tmp):
    src = _m(tiny, tmp)
    (src / "params.json").write_text("[1, 2]")
    return _convert(src, tmp / "out" / "hf"), "params.json"


def c_params_wrong_dim(tiny, tmp):
    src = _m(tiny, tmp)
    p = json.loads((src / "params.json").read_text())
    edit_json(src / "params.json", dim=p["dim"] * 2)
    return _convert(src, tmp / "out" / "hf"), "shape"


def c_truncated_shard(tiny, tmp):
    src = _m(tiny, tmp)
    truncate(src / "consolidated.00.pth")
    return _convert(src, tmp / "out" / "hf"), "consolidated.00.pth"


def c_garbage_shard(tiny, tmp):
    src = _m(tiny, tmp)
    (src / "consolidated.00.pth").write_bytes(b"<html>403 Forbidden</html>")
    return _convert(src, tmp / "out" / "hf"), "consolidated.00.pth"


def c_missing_shard(tiny, tmp):
    src = _m(tiny, tmp, SHARDED)
    (src / "consolidated.00.pth").unlink()
    return _convert(src, tmp / "out" / "hf"), "consolidated.00.pth is missing"


def c_shard_count_mismatch(tiny, tmp):
    # A 2-shard release with its last shard missing looks like a complete 1-shard one: the
    # shapes do not add up to params.json's, and that is what must be said.
    src = _m(tiny, tmp, SHARDED)
    (src / "consolidated.01.pth").unlink()
    return _convert(src, tmp / "out" / "hf"), "shape"


def c_unknown_key(tiny, tmp):
    src = _m(tiny, tmp)
    add_tensor(src / "consolidated.00.pth", "layers.0.attention.wq.bias", torch.zeros(4))
    return _convert(src, tmp / "out" / "hf"), "layers.0.attention.wq.bias"


def c_unknown_key_other_shard(tiny, tmp):
    src = _m(tiny, tmp, SHARDED)
    add_tensor(src / "consolidated.01.pth", "layers.1.feed_forward.w2.bias", torch.zeros(4))
    return _convert(src, tmp / "out" / "hf"), "layers.1.feed_forward.w2.bias"


def c_extra_layer(tiny, tmp):
    src = _m(tiny, tmp)
    n = json.loads((src / "params.json").read_text())["n_layers"]
    sd = torch.load(src / "consolidated.00.pth", weights_only=True)
    for k in [k for k in sd if k.startswith("layers.0.")]:
        sd[k.replace("layers.0.", f"layers.{n}.")] = sd[k].clone()
    torch.save(sd, src / "consolidated.00.pth")
    return _convert(src, tmp / "out" / "hf"), f"layer {n} beyond params.json"


def c_unknown_key_dry_run(tiny, tmp):
    src = _m(tiny, tmp)
    add_tensor(src / "consolidated.00.pth", "layers.1.attention.wk.bias", torch.zeros(4))
    return ["inspect", "--input-dir", src], "layers.1.attention.wk.bias"


def c_md5_mismatch(tiny, tmp):
    src = _m(tiny, tmp)
    chk = src / "checklist.chk"
    chk.write_text("".join(("0" * 32 + " " + ln.split()[1] + "\n") if ln.split()[1] == "params.json" else ln + "\n"
                           for ln in chk.read_text().splitlines() if ln.strip()))
    return _convert(src, tmp / "out" / "hf", "--verify-md5"), "params.json"


def c_no_tokenizer(tiny, tmp):
    src = _m(tiny, tmp)
    (src / "tokenizer.model").unlink()
    return _convert(src, tmp / "out" / "hf"), "tokenizer.model not found"


def c_input_missing(tiny, tmp):
    return _convert(tmp / "nowhere", tmp / "out" / "hf"), str(tmp / "nowhere")


def c_hf_as_input(tiny, tmp):
    hf = copy_hf(tiny, SMALL, tmp / "in")
    return _convert(hf, tmp / "out" / "hf"), "Hugging Face directory"


def c_bad_dtype_flag(tiny, tmp):
    src = _m(tiny, tmp)
    return _convert(src, tmp / "out" / "hf", "--dtype", "int4"), "--dtype"


# verify / diagnose / to-meta: HF-side files

def _pair(tiny, tmp):
    return _m(tiny, tmp), copy_hf(tiny, SMALL, tmp / "in")


def _verify(meta, hf):
    return ["verify", "--meta-dir", meta, "--hf-dir", hf, "--no-bf16"]


def _to_meta(hf, out, *extra):
    return ["to-meta", "--hf-dir", hf, "--output-dir", out, *extra]


def c_verify_truncated_st(tiny, tmp):
    meta, hf = _pair(tiny, tmp)
    truncate(hf / "model.safetensors", 0.9)
    return _verify(meta, hf), "model.safetensors is truncated"


def c_diagnose_truncated_st(tiny, tmp):
    meta, hf = _pair(tiny, tmp)
    truncate(hf / "model.safetensors", 0.9)
    return ["diagnose", "--meta-dir", meta, "--hf-dir", hf], "model.safetensors is truncated"


def c_to_meta_truncated_st(tiny, tmp):
    hf = copy_hf(tiny, SMALL, tmp / "in")
    truncate(hf / "model.safetensors", 0.9)
    return _to_meta(hf, tmp / "out" / "meta"), "model.safetensors is truncated"


def c_verify_absurd_header(tiny, tmp):
    meta, hf = _pair(tiny, tmp)
    set_header_len(hf / "model.safetensors", 1 << 62)
    return _verify(meta, hf), "header length"


def c_to_meta_absurd_header(tiny, tmp):
    hf = copy_hf(tiny, SMALL, tmp / "in")
    set_header_len(hf / "model.safetensors", 1 << 40)
    return _to_meta(hf, tmp / "out" / "meta"), "model.safetensors"


def c_diagnose_corrupt_header(tiny, tmp):
    meta, hf = _pair(tiny, tmp)
    data = bytearray((hf / "model.safetensors").read_bytes())
    data[8:16] = b"\xff\xfe{oops "
    (hf / "model.safetensors").write_bytes(bytes(data))
    return ["diagnose", "--meta-dir", meta, "--hf-dir", hf], "corrupt safetensors header"


def c_verify_bad_config(tiny, tmp):
    meta, hf = _pair(tiny, tmp)
    (hf / "config.json").write_text('{"model_type": "llama",')
    return _verify(meta, hf), "config.json is not valid JSON"


def c_verify_bad_generation_config(tiny, tmp):
    meta, hf = _pair(tiny, tmp)
    (hf / "generation_config.json").write_text("{'bos_token_id': 1}")
    return _verify(meta, hf), "generation_config.json is not valid JSON"


def c_verify_bad_tokenizer_config(tiny, tmp):
    meta, hf = _pair(tiny, tmp)
    truncate(hf / "tokenizer_config.json", 0.5)
    return _verify(meta, hf), "tokenizer_config.json is not valid JSON"


def c_verify_bad_params(tiny, tmp):
    meta, hf = _pair(tiny, tmp)
    (meta / "params.json").write_text("dim=64")
    return _verify(meta, hf), "params.json is not valid JSON"


def c_verify_missing_index_file(tiny, tmp):
    meta, hf = _pair(tiny, tmp)
    (hf / "model.safetensors").rename(hf / "model-00001-of-00002.safetensors")
    from safetensors import safe_open

    with safe_open(str(hf / "model-00001-of-00002.safetensors"), "pt") as f:
        names = list(f.keys())
    wm = {k: "model-00001-of-00002.safetensors" for k in names}
    wm[names[0]] = "model-00002-of-00002.safetensors"
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    return _verify(meta, hf), "model-00002-of-00002.safetensors"


def c_verify_meta_unknown_key(tiny, tmp):
    meta, hf = _pair(tiny, tmp)
    add_tensor(meta / "consolidated.00.pth", "layers.0.attention.wq.bias", torch.zeros(4))
    return _verify(meta, hf), "layers.0.attention.wq.bias"


def c_verify_truncated_pth(tiny, tmp):
    meta, hf = _pair(tiny, tmp)
    truncate(meta / "consolidated.00.pth", 0.7)
    return _verify(meta, hf), "consolidated.00.pth"


def c_to_meta_bad_config(tiny, tmp):
    hf = copy_hf(tiny, SMALL, tmp / "in")
    (hf / "config.json").write_text("")
    return _to_meta(hf, tmp / "out" / "meta"), "config.json is not valid JSON"


def c_to_meta_extra_bias(tiny, tmp):
    hf = copy_hf(tiny, SMALL, tmp / "in")
    add_hf_tensor(hf, "model.layers.0.self_attn.q_proj.bias", (8,))
    return _to_meta(hf, tmp / "out" / "meta"), "model.layers.0.self_attn.q_proj.bias"


def c_to_meta_extra_layer(tiny, tmp):
    hf = copy_hf(tiny, SMALL, tmp / "in")
    n = json.loads((hf / "config.json").read_text())["num_hidden_layers"]
    add_hf_tensor(hf, f"model.layers.{n}.input_layernorm.weight", (8,))
    return _to_meta(hf, tmp / "out" / "meta"), f"layer {n} beyond config.json"


def c_to_meta_missing_tensor(tiny, tmp):
    from safetensors.torch import load_file, save_file

    hf = copy_hf(tiny, SMALL, tmp / "in")
    sd = load_file(str(hf / "model.safetensors"))
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, str(hf / "model.safetensors"), metadata={"format": "pt"})
    return _to_meta(hf, tmp / "out" / "meta"), "model.layers.1.mlp.up_proj.weight"


def c_to_meta_pickle_only(tiny, tmp):
    hf = copy_hf(tiny, SMALL, tmp / "in")
    (hf / "model.safetensors").rename(hf / "pytorch_model.bin")
    return _to_meta(hf, tmp / "out" / "meta"), "pytorch_model.bin"


def c_to_meta_overwrite_hf(tiny, tmp):
    hf = copy_hf(tiny, SMALL, tmp / "in")
    return _to_meta(hf, hf, "--overwrite"), "is the input folder"


def c_to_meta_overwrite_inside_hf(tiny, tmp):
    # The official repositories keep Meta's files in original/: replacing it would delete the
    # tokenizer.model this conversion reads from there.
    hf = copy_hf(tiny, SMALL, tmp / "in")
    (hf / "original").mkdir()
    shutil.copy(tiny.meta(SMALL) / "tokenizer.model", hf / "original" / "tokenizer.model")
    return _to_meta(hf, hf / "original", "--overwrite"), "original"


def c_to_meta_overwrite_tokenizer_folder(tiny, tmp):
    hf = copy_hf(tiny, SMALL, tmp / "in")
    tok = tmp / "tok"
    tok.mkdir()
    shutil.copy(tiny.meta(SMALL) / "tokenizer.model", tok / "tokenizer.model")
    return _to_meta(hf, tok, "--overwrite", "--tokenizer", tok / "tokenizer.model"), "tokenizer.model"


def c_to_meta_missing_tokenizer_flag(tiny, tmp):
    hf = copy_hf(tiny, SMALL, tmp / "in")
    return _to_meta(hf, tmp / "out" / "meta", "--tokenizer", tmp / "no.model"), "--tokenizer"


# ---- issue 15: output paths checked before the run (exit 2 in seconds; nothing written, no model left)

def c_verify_json_is_folder(tiny, tmp):
    meta, hf = _pair(tiny, tmp)
    return [*_verify(meta, hf), "--json", tmp / "out"], f"--json {tmp / 'out'} is a folder"


def c_verify_html_under_file(tiny, tmp):
    meta, hf = _pair(tiny, tmp)
    (tmp / "out" / "afile").write_text("x")
    return [*_verify(meta, hf), "--html", tmp / "out" / "afile" / "r.html"], "is a file, not a directory"


def c_convert_json_is_folder(tiny, tmp):
    # Used to fail after writing the whole model, and leave it behind.
    return [*_convert(_m(tiny, tmp), tmp / "out" / "hf"), "--json", tmp / "out"], f"--json {tmp / 'out'} is a folder"


def c_diagnose_plot_is_folder(tiny, tmp):
    meta, hf = _pair(tiny, tmp)
    return ["diagnose", "--meta-dir", meta, "--hf-dir", hf, "--plot", tmp / "out"], f"--plot {tmp / 'out'} is a folder"


def c_inspect_json_under_file(tiny, tmp):
    (tmp / "out" / "afile").write_text("x")
    # The check names the file in the way, before the run (the late write said only "Not a directory").
    return (["inspect", "--input-dir", _m(tiny, tmp), "--json", tmp / "out" / "afile" / "p.json"],
            f"{tmp / 'out' / 'afile'} is a file, not a directory")


def c_json_and_html_one_file(tiny, tmp):
    meta, hf = _pair(tiny, tmp)
    r = tmp / "out" / "r"
    return [*_verify(meta, hf), "--json", r, "--html", r], "--json and --html both write"


def c_to_meta_output_is_file(tiny, tmp):
    (tmp / "out" / "afile").write_text("x")
    # Named by the check before the run (flag first), not by the conversion's own late refusal.
    return _to_meta(copy_hf(tiny, SMALL, tmp / "in"), tmp / "out" / "afile"), "--output-dir"


def c_demo_keep_not_empty(tiny, tmp):
    # Used to restore edited files and delete added ones in DIR.
    (tmp / "out" / "notes.txt").write_text("mine")
    return ["demo", "--keep", tmp / "out"], "--keep"


# ---- issue 15: numbers that are not sizes; params.json sizes the shards cannot hold

def c_max_shard_size_zero(tiny, tmp):
    return [*_convert(_m(tiny, tmp), tmp / "out" / "hf"), "--max-shard-size", "0MB"], "not a positive size"


def c_max_shard_size_unknown_unit(tiny, tmp):
    return [*_convert(_m(tiny, tmp), tmp / "out" / "hf"), "--max-shard-size", "5XB"], "KiB"  # the units listed


def c_to_meta_num_shards_zero(tiny, tmp):
    return _to_meta(copy_hf(tiny, SMALL, tmp / "in"), tmp / "out" / "meta", "--num-shards", "0"), "--num-shards"


def c_to_meta_num_shards_negative(tiny, tmp):
    return _to_meta(copy_hf(tiny, SMALL, tmp / "in"), tmp / "out" / "meta", "--num-shards", "-1"), "'-1'"


def c_unknown_flag(tiny, tmp):
    # argparse printed its usage block before the error: one line now.
    return [*_convert(_m(tiny, tmp), tmp / "out" / "hf"), "--frobnicate"], "--frobnicate"


def _params(tiny, tmp, **changes):
    src = _m(tiny, tmp)
    edit_json(src / "params.json", **changes)
    return src


def c_params_absurd_layers(tiny, tmp):
    # Was planned: the process grew past several GB within seconds (the OOM killer came).
    return ["inspect", "--input-dir", _params(tiny, tmp, n_layers=10**9)], "n_layers is 1000000000"


def c_convert_params_absurd_layers(tiny, tmp):
    return _convert(_params(tiny, tmp, n_layers=10**9), tmp / "out" / "hf"), "n_layers is 1000000000"


def c_verify_params_absurd_layers(tiny, tmp):
    hf = copy_hf(tiny, SMALL, tmp / "in")
    return _verify(_params(tiny, tmp, n_layers=10**9), hf), "n_layers is 1000000000"


def c_diagnose_params_absurd_layers(tiny, tmp):
    hf = copy_hf(tiny, SMALL, tmp / "in")
    return ["diagnose", "--meta-dir", _params(tiny, tmp, n_layers=10**6), "--hf-dir", hf], "n_layers is 1000000"


def c_params_absurd_vocab(tiny, tmp):
    return ["inspect", "--input-dir", _params(tiny, tmp, vocab_size=10**12)], "vocab_size is 1000000000000"


def c_params_absurd_heads(tiny, tmp):
    return ["inspect", "--input-dir", _params(tiny, tmp, n_heads=10**9)], "n_heads is 1000000000"


def c_params_absurd_kv_heads(tiny, tmp):
    return ["inspect", "--input-dir", _params(tiny, tmp, n_kv_heads=10**9)], "n_kv_heads is 1000000000"


def c_params_absurd_multiple_of(tiny, tmp):
    return ["inspect", "--input-dir", _params(tiny, tmp, multiple_of=10**12)], "multiple_of"


def c_params_absurd_dim(tiny, tmp):
    return ["inspect", "--input-dir", _params(tiny, tmp, dim=10**9)], "dim is 1000000000"


# Within the bounds, but not what the shards hold (tiny llama3.2-1b: vocab 816, FFN 512, 2 kv heads of 16).

def c_params_wrong_vocab(tiny, tmp):
    return _convert(_params(tiny, tmp, vocab_size=1024), tmp / "out" / "hf"), "vocab_size is 1024 but the shards hold 816"


def c_verify_params_wrong_vocab(tiny, tmp):
    hf = copy_hf(tiny, SMALL, tmp / "in")
    return _verify(_params(tiny, tmp, vocab_size=1024), hf), "vocab_size is 1024 but the shards hold 816"


def c_params_wrong_multiple_of(tiny, tmp):
    # multiple_of 96 rounds the FFN to 576; the shards' w1 has 512 rows.
    return (["inspect", "--input-dir", _params(tiny, tmp, multiple_of=96)],
            "multiple_of 96 and ffn_dim_multiplier 1.5 give a feed-forward size of 576, but the shards' "
            "feed_forward.w1 holds 512 rows")


def c_verify_params_wrong_ffn_multiplier(tiny, tmp):
    hf = copy_hf(tiny, SMALL, tmp / "in")
    return _verify(_params(tiny, tmp, ffn_dim_multiplier=2.0), hf), "a feed-forward size of 704, but"


def c_params_wrong_multiple_of_sharded(tiny, tmp):
    # Two shards of 13B's tiny layout (dim 64, multiple_of 32: FFN 192): shard 0's 96 rows times two.
    src = _m(tiny, tmp, SHARDED)
    edit_json(src / "params.json", multiple_of=128)
    return _convert(src, tmp / "out" / "hf"), "a feed-forward size of 256, but the shards' feed_forward.w1 holds 192 rows (2 shards)"


def c_params_wrong_kv_heads(tiny, tmp):
    return _convert(_params(tiny, tmp, n_kv_heads=4), tmp / "out" / "hf"), "n_kv_heads is 4 but the shards' attention.wk holds 32 rows"


def c_verify_params_wrong_kv_heads(tiny, tmp):
    hf = copy_hf(tiny, SMALL, tmp / "in")
    return _verify(_params(tiny, tmp, n_kv_heads=4), hf), "2 heads of 16"


def c_verify_empty_tokenizer(tiny, tmp):
    meta, hf = _pair(tiny, tmp)
    (meta / "tokenizer.model").write_bytes(b"")
    return _verify(meta, hf), f"{meta / 'tokenizer.model'}: neither"


def c_verify_other_model_type(tiny, tmp):
    meta, hf = _pair(tiny, tmp)
    edit_json(hf / "config.json", model_type="mistral", architectures=["MistralForCausalLM"])
    return _verify(meta, hf), "model_type is 'mistral'"


def c_to_meta_absurd_layers(tiny, tmp):
    hf = copy_hf(tiny, SMALL, tmp / "in")
    edit_json(hf / "config.json", num_hidden_layers=10**9)
    return _to_meta(hf, tmp / "out" / "meta"), "num_hidden_layers is 1000000000"


# ---- issue 15: mistakes named as such

def c_verify_swapped(tiny, tmp):
    meta, hf = _pair(tiny, tmp)
    return _verify(hf, meta), "did you swap them?"


def c_diagnose_swapped(tiny, tmp):
    meta, hf = _pair(tiny, tmp)
    return ["diagnose", "--meta-dir", hf, "--hf-dir", meta], "did you swap them?"


def c_to_meta_given_meta(tiny, tmp):
    return _to_meta(_m(tiny, tmp), tmp / "out" / "meta"), "is a Meta checkpoint"


CATALOG = [Case(f.__name__[2:], f) for f in [
    c_overwrite_same, c_overwrite_parent, c_overwrite_grandparent, c_overwrite_tokenizer_folder,
    c_overwrite_linked_tokenizer, c_overwrite_symlink_to_input, c_overwrite_linked_blobs, c_output_is_input_file,
    c_not_empty, c_parent_under_file, c_no_params, c_params_bad_json, c_params_wrong_type, c_params_not_object,
    c_params_wrong_dim, c_truncated_shard, c_garbage_shard, c_missing_shard, c_shard_count_mismatch,
    c_unknown_key, c_unknown_key_other_shard, c_extra_layer, c_unknown_key_dry_run, c_md5_mismatch,
    c_no_tokenizer, c_input_missing, c_hf_as_input, c_bad_dtype_flag,
    c_verify_truncated_st, c_diagnose_truncated_st, c_to_meta_truncated_st, c_verify_absurd_header,
    c_to_meta_absurd_header, c_diagnose_corrupt_header, c_verify_bad_config, c_verify_bad_generation_config,
    c_verify_bad_tokenizer_config, c_verify_bad_params, c_verify_missing_index_file, c_verify_meta_unknown_key,
    c_verify_truncated_pth, c_to_meta_bad_config, c_to_meta_extra_bias, c_to_meta_extra_layer,
    c_to_meta_missing_tensor, c_to_meta_pickle_only, c_to_meta_overwrite_hf, c_to_meta_overwrite_inside_hf,
    c_to_meta_overwrite_tokenizer_folder, c_to_meta_missing_tokenizer_flag,
    # issue 15
    c_verify_json_is_folder, c_verify_html_under_file, c_convert_json_is_folder, c_diagnose_plot_is_folder,
    c_inspect_json_under_file, c_json_and_html_one_file, c_to_meta_output_is_file, c_demo_keep_not_empty,
    c_max_shard_size_zero, c_max_shard_size_unknown_unit, c_to_meta_num_shards_zero, c_to_meta_num_shards_negative,
    c_unknown_flag, c_params_absurd_layers, c_convert_params_absurd_layers, c_verify_params_absurd_layers,
    c_diagnose_params_absurd_layers, c_params_absurd_vocab, c_params_absurd_heads, c_params_absurd_kv_heads,
    c_params_absurd_multiple_of, c_params_absurd_dim, c_params_wrong_vocab, c_verify_params_wrong_vocab,
    c_params_wrong_multiple_of, c_verify_params_wrong_ffn_multiplier, c_params_wrong_multiple_of_sharded,
    c_params_wrong_kv_heads, c_verify_params_wrong_kv_heads, c_verify_empty_tokenizer, c_verify_other_model_type,
    c_to_meta_absurd_layers, c_verify_swapped, c_diagnose_swapped, c_to_meta_given_meta,
]]


def run_refused(capsys, root: Path, argv, culprit: str, code: int = 2) -> str:
    """Run the CLI in-process and assert the catalog's promises; returns stderr."""
    before = snapshot(root)
    try:
        got = main([str(a) for a in argv])
    except SystemExit as e:  # a usage error, from argparse
        got = e.code
    out, err = capsys.readouterr()
    assert got == code, f"exit {got}, expected {code}\nstdout: {out}\nstderr: {err}"
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llama-parity: "), err
    assert culprit in lines[0], f"{culprit!r} not named in: {lines[0]}"
    assert snapshot(root) == before, "inputs changed or something was left behind"
    return lines[0]


class memory_guard:
    """Ends this process (exit 86, one line on stderr) when its RSS grows `limit` bytes past where it
    was: an absurd input that is planned instead of refused grows inside C code (a tensor of 10**9
    layers' worth), where no signal reaches Python; without the guard it took the machine's memory
    until the kernel's OOM killer chose a process, possibly another one. The test run then fails
    (pytest-xdist reports the worker crashed; a single process exits 86)."""

    def __init__(self, limit: int = 2 << 30):
        self.limit, self.done = limit, threading.Event()

    @staticmethod
    def rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _watch(self, start: int) -> None:
        while not self.done.wait(0.05):
            if self.rss() - start > self.limit:
                os.write(2, f"memory_guard: RSS grew past {self.limit >> 20} MB: an absurd input was planned, "
                            "not refused\n".encode())
                os._exit(86)

    def __enter__(self):
        if Path("/proc/self/statm").is_file():
            threading.Thread(target=self._watch, args=(self.rss(),), daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.done.set()


@pytest.mark.parametrize("case", CATALOG, ids=[c.name for c in CATALOG])
def test_bad_input_catalog(tiny, tmp_path, capsys, case):
    """Bug class: bad input that exits 0 (a silent drop, a deleted checkpoint), exits 1 as if
    parity had failed, prints a traceback or a message naming nothing, leaves partial output,
    or alters an input; an absurd size planned instead of refused (memory_guard ends the run)."""
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    argv, culprit = case.setup(tiny, tmp_path)
    with memory_guard():
        run_refused(capsys, tmp_path, argv, culprit, case.code)


# ---------------------------------------------------------------- a malicious pickle

def test_malicious_pickle_refused_by_every_command(tiny, tmp_path, capsys):
    """Bug class: loading a shard with an unsafe unpickler, which runs whatever code it holds.

    First proves the file is dangerous (an unsafe torch.load creates the marker), then that
    convert, inspect, verify and diagnose refuse it by name with exit 2, and the marker never
    appears. to-meta reads no pickle: an HF folder holding only pytorch_model.bin is refused
    without loading it (catalog case to_meta_pickle_only)."""
    meta = copy_meta(tiny, SMALL, tmp_path / "in")
    hf = copy_hf(tiny, SMALL, tmp_path / "in")
    marker = tmp_path / "pwned"
    make_evil(meta / "consolidated.00.pth", marker)
    proof = tmp_path / "proof.pth"
    shutil.copy(meta / "consolidated.00.pth", proof)
    torch.load(proof, weights_only=False)
    assert marker.read_text() == "pwned", "the test pickle must run code when loaded unsafely"
    marker.unlink()
    proof.unlink()
    for argv in (_convert(meta, tmp_path / "out" / "hf"), ["inspect", "--input-dir", meta],
                 _convert(meta, tmp_path / "out" / "hf", "--dry-run"), _verify(meta, hf),
                 ["diagnose", "--meta-dir", meta, "--hf-dir", hf]):
        line = run_refused(capsys, tmp_path, argv, "consolidated.00.pth")
        assert "refusing to load" in line, line
        assert not marker.exists(), f"{argv[0]} ran the pickle's code"


# ---------------------------------------------------------------- environment: disk, permissions

def test_output_parent_read_only(tiny, tmp_path, capsys):
    """Bug class: a traceback (PermissionError/EROFS) instead of one line when the output's
    parent cannot be written. Root ignores chmod, so a read-only tmpfs is the real thing;
    without mount rights the error is injected."""
    src = copy_meta(tiny, SMALL, tmp_path / "in")
    with tmpfs(tmp_path / "ro", "ro,size=64m") as ro:
        if ro is None:  # simulated: the OSError mkdtemp would raise
            import tempfile

            print("simulated: read-only parent injected (no mount rights)")
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(tempfile, "mkdtemp", lambda **kw: (_ for _ in ()).throw(OSError(30, "Read-only file system")))
                run_refused(capsys, tmp_path, _convert(src, tmp_path / "ro" / "hf"), "cannot write in")
            return
        run_refused(capsys, tmp_path, _convert(src, ro / "hf"), f"cannot write in {ro}")


def test_disk_full(tiny, tmp_path, capsys):
    """Bug class: a full disk giving a traceback, a half-written output, or a staging folder that
    fills the disk for good. A tmpfs too small for the weights is refused before writing; one
    that holds the weights but not the tokenizer files fails mid-write (ENOSPC)."""
    src = copy_meta(tiny, SMALL, tmp_path / "in")
    weights = (tiny.hf(SMALL) / "model.safetensors").stat().st_size
    with tmpfs(tmp_path / "small", "size=64k") as small:
        if small is not None:
            run_refused(capsys, tmp_path, _convert(src, small / "hf"), "not enough disk space")
    pages = -(-weights // 4096) + 8  # the weights and 32 KB: the tokenizer files (~100 KB) cannot fit
    with tmpfs(tmp_path / "full", f"size={pages * 4}k") as full:
        if full is None:  # simulated: os.write raising ENOSPC in the middle of the weights
            from llama_parity.converter import safetensors_writer as sw

            print("simulated: ENOSPC injected into the weight writer (no mount rights)")
            calls = []

            def fail_later(fd, data):
                calls.append(1)
                if len(calls) > 3:
                    raise OSError(28, "No space left on device")
                return os.write(fd, data)

            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(sw, "_write_all", lambda fd, mv: fail_later(fd, mv))
                run_refused(capsys, tmp_path, _convert(src, tmp_path / "out" / "hf"), "no space left")
            return
        run_refused(capsys, tmp_path, _convert(src, full / "hf"), f"no space left on the device holding {full}")
    # to-meta: torch.save's own writer would report ENOSPC as an opaque RuntimeError (a traceback)
    hf = copy_hf(tiny, SMALL, tmp_path / "in")
    with tmpfs(tmp_path / "full2", f"size={-(-weights // 4096) * 4 + 8}k") as full2:
        if full2 is not None:
            run_refused(capsys, tmp_path, _to_meta(hf, full2 / "meta", "--num-shards", "1"), "no space left")


def _fill(folder: Path) -> None:
    """Fill the file system holding `folder` to the last byte."""
    with open(folder / "filler", "wb", buffering=0) as fh:
        for size in (1 << 16, 1 << 12, 1 << 9, 1):
            try:
                while True:
                    fh.write(b"x" * size)
            except OSError as e:
                assert e.errno == 28, e


def test_convert_report_and_model_all_or_nothing(tiny, tmp_path, capsys):
    """Bug class: a disk filling while `convert --json R` writes R leaving the finished model published
    without its report (or a truncated R). R is written whole before the model folder's rename: a full
    disk refuses both, and nothing is left (no model, no staging folder, no temporary R, no lock). R is
    on a real full tmpfs when mounting is allowed; otherwise ENOSPC is injected into R's write alone."""
    import types

    from llama_parity import report_files

    src = copy_meta(tiny, SMALL, tmp_path / "in")
    out = tmp_path / "out" / "hf"
    with tmpfs(tmp_path / "reports", "size=64k") as reports:
        if reports is None:
            print("simulated: ENOSPC injected into the report's write (no mount rights)")

            def full(fd):
                raise OSError(28, "No space left on device")

            reports = tmp_path / "reports"
            with pytest.MonkeyPatch.context() as mp:  # report_files' own os: the model's writes are untouched
                mp.setattr(report_files, "os", types.SimpleNamespace(**{**vars(os), "fsync": full}))
                run_refused(capsys, tmp_path, [*_convert(src, out), "--json", reports / "r.json"], "--json")
        else:
            _fill(reports)
            line = run_refused(capsys, tmp_path, [*_convert(src, out), "--json", reports / "sub" / "r.json"],
                               f"--json {reports / 'sub' / 'r.json'}")
            assert "No space left" in line and "not kept" in line, line
    assert main([str(a) for a in [*_convert(src, out), "--json", tmp_path / "r.json"]]) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "r.json").read_text())["output_dir"] == str(out) and (out / "config.json").is_file()
    # R inside the output folder is part of it (it made the folder early, and the rename then failed),
    # but never one of the model's own files.
    out2 = tmp_path / "out2" / "hf"
    run_refused(capsys, tmp_path, [*_convert(src, out2), "--json", out2 / "config.json"], "model's own config.json")
    assert main([str(a) for a in [*_convert(src, out2), "--json", out2 / "logs" / "r.json"]]) == 0
    capsys.readouterr()
    assert json.loads((out2 / "logs" / "r.json").read_text())["output_dir"] == str(out2)


def test_convert_verify_report_rewrite_failure_says_what_each_file_holds(tiny, tmp_path, capsys, monkeypatch):
    """Bug class: `convert --verify --json R` whose second write of R (the verify result added) fails,
    e.g. a disk that filled during the verify, leaving a traceback, a truncated R or a silent exit 0:
    one line names --json and says that R still holds the conversion's report and the model card the
    verify result; exit 2; R is the whole conversion report; the model stays (it was converted and
    verified)."""
    from llama_parity import cli

    src = copy_meta(tiny, SMALL, tmp_path / "in")
    out, report = tmp_path / "out" / "hf", tmp_path / "r.json"

    def full_disk(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cli, "write_json", full_disk)  # only the rewrite goes through it (R is staged first)
    got = main([str(a) for a in [*_convert(src, out), "--verify", "--json", report]])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert got == 2 and "Traceback" not in captured.out + captured.err, (got, captured.err)
    assert len(lines) == 1 and lines[0].startswith(f"llama-parity: --json {report}: cannot add the verify result"), lines
    assert "No space left" in lines[0] and "holds the conversion's report" in lines[0] and "README.md" in lines[0]
    data = json.loads(report.read_text())
    assert data["output_dir"] == str(out) and "verify" not in data
    assert (out / "config.json").is_file() and "PARITY OK" in (out / "README.md").read_text()


# ---------------------------------------------------------------- signals and SIGKILL

# `llama-parity convert` with a pause before each converted chunk (0.5 s; with _WAIT_FOR, until the
# test's go-ahead), so that a tiny conversion lasts long enough to be signalled, killed or raced at a
# deterministic point. The pause runs in the writer's producer thread, which the interrupted writer
# joins: a short one. It is added here, in the test's own child process, not by a hook in the product.
_SLOW_CONVERT = """
import signal, sys, time
# as from a terminal: a test run under nohup (SIGHUP ignored, a choice the CLI keeps) must not decide it
signal.signal(signal.SIGHUP, signal.SIG_DFL)
from llama_parity.converter import convert
chunks = convert.iter_chunks
def paced(*args, **kwargs):
    for chunk in chunks(*args, **kwargs):
        time.sleep(0.5)
        yield chunk
convert.iter_chunks = paced
from llama_parity.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _slow_convert(src: Path, out: Path) -> Forked:
    return Forked(_SLOW_CONVERT, ["convert", "--input-dir", str(src), "--output-dir", str(out), "--no-progress"])


def _staging(out: Path) -> list[Path]:
    return list(out.parent.glob(f".{out.name}.partial-*"))


def _writing(out: Path) -> Path | None:
    return next((p for p in _staging(out) if any(p.glob("*.safetensors"))), None)


def test_signals_clean_up_and_exit_128_plus_signal(tiny, tmp_path, capsys):
    """Bug class: SIGTERM/SIGHUP (timeout, systemd, Kubernetes, Slurm, a closed terminal) killing
    the conversion without cleanup, or Ctrl-C reported as bad input (2) instead of 130.

    Real child processes (Forked), each signalled as soon as it writes weights (a test wrapper pauses 0.5 s
    before each chunk, so a tiny conversion lasts ~10 s). While one is running, a second conversion into its
    output is refused, naming the live pid. A SIGKILLed run's hidden folder is removed by the
    next run, which says so."""
    src = copy_meta(tiny, SMALL, tmp_path / "in")
    before = snapshot(tmp_path / "in")
    sigs = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM, "SIGHUP": signal.SIGHUP, "SIGKILL": signal.SIGKILL}
    procs = {name: _slow_convert(src, tmp_path / name / "hf") for name in sigs}  # in parallel: startup dominates
    stagings: dict[str, Path] = {}
    t0 = time.monotonic()
    while len(stagings) < len(procs):
        assert time.monotonic() - t0 < 120, "conversions never started writing"
        for name, p in procs.items():
            if name in stagings:
                continue
            assert p.poll() is None, (name, p.communicate())
            found = _writing(tmp_path / name / "hf")
            if found is None:
                continue
            if name == "SIGTERM":  # a live conversion owns this output: a second one is refused
                run_refused(capsys, tmp_path / "in", _convert(src, tmp_path / name / "hf"), f"pid {p.pid}")
            stagings[name] = found
            p.send_signal(sigs[name])
        time.sleep(0.05)

    for name, p in procs.items():
        out, err = p.communicate(timeout=60)
        if name == "SIGKILL":
            assert p.returncode == -signal.SIGKILL
            assert stagings[name].exists()
            continue
        assert p.returncode == 128 + sigs[name], (name, p.returncode, err)
        assert "Traceback" not in err and err.count("\n") == 1 and name in err, err
        assert not (tmp_path / name).exists(), name  # nor the folder made for the output (nor a staging folder)

    # The next run into the SIGKILLed output: the dead run's folder is removed and named.
    out_dir = tmp_path / "SIGKILL" / "hf"
    assert main([str(a) for a in _convert(src, out_dir)]) == 0
    printed = capsys.readouterr().out
    assert f"removed {stagings['SIGKILL']}" in printed and f"pid {procs['SIGKILL'].pid}" in printed, printed
    assert not _staging(out_dir) and (out_dir / "model.safetensors").is_file()
    assert snapshot(tmp_path / "in") == before


# `llama-parity verify` that stops at one point (a marker file says it got there) until a signal comes:
# in the model checks, or while a report is being flushed to its temporary file (before its rename).
# The pause is added here, in the test's own child process, by wrapping the product's functions.
_PAUSED_VERIFY = """
import os, sys, time
stop, marker = sys.argv[1], sys.argv[2]
from llama_parity import report_files, verify
def pause():
    open(marker, "w").close()
    # ended by the signal the test sends. Short sleeps, a guard: should the signal land on another of
    # the child's threads, Python runs the handler only when the main thread returns to the
    # interpreter, which one long sleep would delay by its whole length (the hang once seen here is
    # put down to tqdm's lock held across the fork: forked.py)
    for _ in range(2400):
        time.sleep(0.05)
if stop == "model":
    checks = verify._model_checks
    def paused(*a, **k):
        pause()
        return checks(*a, **k)
    verify._model_checks = paused
else:  # the report named `stop` is stopped between its write and its rename
    fsync = os.fsync
    def paused_fsync(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(f".{stop}.tmp-"):
            pause()
        return fsync(fd)
    report_files.os.fsync = paused_fsync
from llama_parity.cli import main
sys.exit(main(sys.argv[3:]))
"""


def test_signal_during_verify_leaves_no_report_or_a_whole_one(tiny, tmp_path):
    """Bug class: SIGTERM (timeout, a scheduler) or Ctrl-C during `verify --json R --html H` leaving an
    empty or truncated report, a temporary file, a traceback, or an exit code that reads as bad input
    or parity failure. Real child processes (Forked), each stopped at one point and signalled there: SIGTERM in
    the model checks (143, no report), Ctrl-C while R's bytes sit in their temporary file (130, no R,
    no temporary file, no H). A report is never half there: test_reports_written_whole."""
    meta, hf = tiny.meta(SMALL), tiny.hf(SMALL)
    cases = {"model": signal.SIGTERM, "r.json": signal.SIGINT}
    procs = {}
    for stop in cases:
        out = tmp_path / stop.replace(".", "_")
        out.mkdir()
        scope = "--quick" if stop == "model" else "--metadata-only"  # the reports' stops need no model run
        argv = [*map(str, _verify(meta, hf)), scope, "--no-tokenizer", "--json", str(out / "r.json"),
                "--html", str(out / "r.html")]
        procs[stop] = (out, Forked(_PAUSED_VERIFY, [stop, str(out / "marker"), *argv]))
    pending = set(procs)
    t0 = time.monotonic()
    while pending:  # signal each as soon as it reaches its stop
        assert time.monotonic() - t0 < 120, "verify never reached its stop"
        for stop in list(pending):
            out, p = procs[stop]
            assert p.poll() is None, (stop, p.communicate())
            if (out / "marker").exists():
                p.send_signal(cases[stop])
                pending.discard(stop)
        time.sleep(0.02)
    for stop, (out, p) in procs.items():
        sig = cases[stop]
        _, err = p.communicate(timeout=60)
        assert p.returncode == 128 + sig, (stop, p.returncode, err)
        assert "Traceback" not in err and err.count("\n") == 1 and sig.name in err, (stop, err)
        assert os.listdir(out) == ["marker"], (stop, os.listdir(out))


def test_partial_folder_of_unknown_owner_is_named(tiny, tmp_path, capsys):
    """Bug class: a partial folder the tool cannot attribute (another host, an older version)
    removed silently, or left unmentioned to fill the disk."""
    src = copy_meta(tiny, SMALL, tmp_path / "in")
    (tmp_path / "out").mkdir()
    stale = tmp_path / "out" / ".hf.partial-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    assert main([str(a) for a in _convert(src, tmp_path / "out" / "hf")]) == 0
    printed = capsys.readouterr().out
    assert str(stale) in printed and f"rm -rf '{stale}'" in printed, printed
    assert stale.exists()


def test_full_memory_mode_that_cannot_fit_is_refused_up_front(tiny, tmp_path, capsys, monkeypatch):
    """Bug class: `verify --memory full` (or `diagnose`, which also holds both models) on a model larger
    than the machine's memory running for minutes and dying to the OOM killer (exit 137, no report)
    instead of one line naming the need and the way out (streaming); `auto` is never refused for memory."""
    from llama_parity import verify as verify_mod

    meta, hf = copy_meta(tiny, SMALL, tmp_path / "in"), copy_hf(tiny, SMALL, tmp_path / "in")
    monkeypatch.setattr(verify_mod, "available_memory", lambda: 1 << 20)  # 1 MB left on this "machine"
    line = run_refused(capsys, tmp_path, [*_verify(meta, hf), "--memory", "full"], "--memory streaming")
    assert "GB" in line and "available" in line, line
    assert verify_mod.choose_memory_mode(hf, "auto") == "streaming"  # auto streams, never refused for memory
    line = run_refused(capsys, tmp_path, ["diagnose", "--meta-dir", meta, "--hf-dir", hf], "llama-parity verify")
    assert "hidden states per layer" in line, line


# ---------------------------------------------------------------- issue 15: reports, writers, mistakes

def test_outputs_checked_before_the_run(tiny, tmp_path, capsys, monkeypatch):
    """Bug class: a report path that cannot be written (a folder, under a file, a read-only mount)
    failing only after the whole run: minutes on a big model, and `convert --json` then left the
    finished model behind. The work itself is replaced by a tripwire: refusing must not reach it."""
    from llama_parity import verify as verify_mod
    from llama_parity.converter import convert as convert_mod, hf_to_meta

    def tripwire(*a, **k):
        raise AssertionError("the run started before its output paths were checked")

    meta, hf = copy_meta(tiny, SMALL, tmp_path / "in"), copy_hf(tiny, SMALL, tmp_path / "in")
    monkeypatch.setattr(verify_mod, "verify", tripwire)
    monkeypatch.setattr(convert_mod, "convert_meta_to_hf", tripwire)
    monkeypatch.setattr(hf_to_meta, "convert_hf_to_meta", tripwire)
    (tmp_path / "out").mkdir()
    run_refused(capsys, tmp_path, [*_verify(meta, hf), "--json", tmp_path / "out"], "--json")
    run_refused(capsys, tmp_path, [*_convert(meta, tmp_path / "out" / "hf"), "--json", tmp_path / "out"], "--json")
    with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        if ro is None:
            print("simulated: read-only folder not mountable here; the folder and file cases above still ran")
            return
        before = snapshot(tmp_path / "in")
        for argv, flag in (([*_verify(meta, hf), "--html", ro / "r.html"], "--html"),
                           ([*_convert(meta, tmp_path / "out" / "hf"), "--json", ro / "sub" / "c.json"], "--json"),
                           (_to_meta(hf, ro / "meta"), "--output-dir")):
            assert main([str(a) for a in argv]) == 2
            err = capsys.readouterr().err.strip()
            assert err.count("\n") == 0 and flag in err and "cannot write in" in err, err
        assert snapshot(tmp_path / "in") == before and not (tmp_path / "out" / "hf").exists()


def test_reports_written_whole(tiny, tmp_path, capsys, monkeypatch):
    """Bug class: a signal or a full disk during a report's write leaving an empty or truncated file
    (or clobbering the previous report). Injected at the write: the old file stays as it was, no
    temporary file remains, and the CLI says one line."""
    from llama_parity import report_files

    meta, hf = tiny.meta(SMALL), tiny.hf(SMALL)  # built before the injection below
    target = tmp_path / "r.json"
    target.write_text("previous report\n")
    real_fsync = os.fsync

    def interrupted(fd):
        raise KeyboardInterrupt  # what the CLI's SIGTERM handler raises

    monkeypatch.setattr(report_files.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        report_files.write_atomic(target, "{" + " " * 100_000)
    assert target.read_text() == "previous report\n" and os.listdir(tmp_path) == ["r.json"]

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report_files.os, "fsync", full)
    new = tmp_path / "new.json"
    run_refused(capsys, tmp_path, [*_verify(meta, hf), "--metadata-only", "--json", new], "No space left")
    monkeypatch.setattr(report_files.os, "fsync", real_fsync)
    assert main([str(a) for a in [*_verify(meta, hf), "--metadata-only", "--json", new]]) == 0
    capsys.readouterr()
    assert json.loads(new.read_text())["ok"] is True and sorted(os.listdir(tmp_path)) == ["new.json", "r.json"]


def test_one_writer_per_output(tiny, tmp_path, capsys):
    """Bug class: two conversions into one output both exiting 0, the second silently replacing the
    first's output without --overwrite (each passed the checks before the other wrote). A held lock
    makes convert, to-meta and demo --keep refuse naming the holder; then a real race of two
    processes started together: exactly one writes, the other refuses in one line."""
    from llama_parity.converter.staging import output_lock

    meta, hf = copy_meta(tiny, SMALL, tmp_path / "in"), copy_hf(tiny, SMALL, tmp_path / "in")
    (tmp_path / "out").mkdir()
    for argv, out in ((_convert(meta, tmp_path / "out" / "hf"), tmp_path / "out" / "hf"),
                      (_to_meta(hf, tmp_path / "out" / "meta"), tmp_path / "out" / "meta"),
                      (["demo", "--keep", tmp_path / "out" / "demo"], tmp_path / "out" / "demo")):
        with output_lock(out):
            run_refused(capsys, tmp_path, argv, f"pid {os.getpid()}")
    assert os.listdir(tmp_path / "out") == []

    # The race: two processes started together. Whichever takes the lock holds it (a test wrapper stops
    # it after its first chunk until the test lets it go), so the other meets it, wherever it is.
    out, go = tmp_path / "race" / "hf", tmp_path / "go"
    held = _SLOW_CONVERT.replace("time.sleep(0.5)", f"_wait_for({str(go)!r})")
    held = held.replace("chunks = convert.iter_chunks", _WAIT_FOR + "chunks = convert.iter_chunks")
    procs = [Forked(held, [*map(str, _convert(meta, out))]) for _ in range(2)]
    loser = _first_to_exit(procs, timeout=120)
    go.touch()
    winner = procs[1 - procs.index(loser)]
    assert winner.wait(timeout=120) == 0, winner.communicate()
    err = loser.communicate()[1]
    assert loser.returncode == 2 and "Traceback" not in err and err.count("\n") == 1, err
    assert "another llama-parity (pid" in err and f"is writing {out}" in err, err  # its pid, or ? if read before written
    go.unlink()
    assert sorted(os.listdir(out.parent)) == ["hf"] and (out / "model.safetensors").is_file()


_WAIT_FOR = """
import os
def _wait_for(path):  # the test's go-ahead; polled, the conversion holds its lock meanwhile
    while not os.path.exists(path):
        time.sleep(0.01)
"""


def _first_to_exit(procs: list[Forked], timeout: float) -> Forked:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        for p in procs:
            if p.poll() is not None:
                return p
        time.sleep(0.01)
    raise AssertionError("neither conversion ended")


def test_symlinked_output_is_written_through(tiny, tmp_path, capsys):
    """Bug class: an output path that is a symlink replaced by a folder while its target stayed empty
    (the model landed beside the link's target, not in it)."""
    src = copy_meta(tiny, SMALL, tmp_path / "in")
    target = tmp_path / "disk" / "models"
    target.mkdir(parents=True)
    link = tmp_path / "out"
    link.symlink_to(target)
    assert main([str(a) for a in _convert(src, link)]) == 0
    assert f"{link} is a link: written into its target {target}" in capsys.readouterr().out
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert (target / "model.safetensors").is_file() and os.listdir(tmp_path / "disk") == ["models"]


def test_next_line_pastes_with_spaces(tiny, tmp_path, capsys):
    """Bug class: the printed `next:` command breaking when pasted because a path has spaces."""
    import shlex

    src = copy_meta(tiny, SMALL, tmp_path / "my models")
    out = tmp_path / "hf out" / "it's here"
    assert main([str(a) for a in [*_convert(src, out), "--instruct"]]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("next: "))
    assert shlex.split(line[len("next: "):]) == ["llama-parity", "verify", "--meta-dir", str(src), "--hf-dir",
                                                  str(out), "--instruct"], line


def test_memory_estimate_scales_with_the_model(tiny, monkeypatch):
    """Bug class: a fixed 1.5 GiB added to diagnose's and --memory full's estimate, refusing tiny
    models on a machine short of memory. The 1B shape's estimate stays at its measured peak (13.8 GB
    of RSS); a tiny model needs megabytes and runs with 256 MB free."""
    from llama_parity import verify as verify_mod

    need = verify_mod.full_memory_need(tiny.hf(SMALL))
    assert need < 50 << 20, need
    monkeypatch.setattr(verify_mod, "available_memory", lambda: 256 << 20)
    verify_mod.refuse_if_too_big(tiny.hf(SMALL), "diagnose", "-")  # not refused
    one_b = Path(__file__).resolve().parents[1] / "llama_parity" / "releases" / "official" / "llama3.2-1b"
    if (one_b / "config.json").is_file():  # a source checkout: the real 1B config
        assert 12.5e9 < verify_mod.full_memory_need(one_b) < 14.5e9


def test_reports_never_land_on_or_among_the_inputs(tiny, tmp_path, capsys):
    """Bug class: a report path inside what the run reads. `verify --json HF/model.safetensors`
    replaced the weights it had just judged with its JSON (exit 0, PARITY OK on the screen, the model
    gone); a report in the HF folder is a file the attestation did not list; `--json R --attestation
    R` overwrote the record being checked. Each refused in the first second, by flag and path, inputs
    byte for byte as they were (symlinked paths resolved)."""
    meta, hf = copy_meta(tiny, SMALL, tmp_path / "in"), copy_hf(tiny, SMALL, tmp_path / "in")
    (tmp_path / "link").symlink_to(hf)
    cases = [
        ([*_verify(meta, hf), "--json", hf / "model.safetensors"], "--hf-dir"),
        ([*_verify(meta, hf), "--html", tmp_path / "link" / "r.html"], "--hf-dir"),  # through a symlink
        ([*_verify(meta, hf), "--json", meta / "params.json"], "--meta-dir"),
        (["diagnose", "--meta-dir", meta, "--hf-dir", hf, "--plot", hf / "p.png"], "--hf-dir"),
        ([*_convert(meta, tmp_path / "out"), "--json", meta / "r.json"], "--input-dir"),
    ]
    for argv, flag in cases:
        line = run_refused(capsys, tmp_path, argv, flag)
        assert "write it elsewhere" in line, line
    att = tmp_path / "att.json"
    assert main([str(a) for a in [*_verify(meta, hf), "--metadata-only", "--no-tokenizer", "--json", att]]) == 0
    capsys.readouterr()
    run_refused(capsys, tmp_path, ["verify", "--hf-dir", hf, "--attestation", att, "--json", att], "--attestation")
