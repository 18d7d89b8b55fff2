"""Is every input readable, and does it hold only tensors a conversion consumes? (exit 2, naming the file)

Readability (JSON parses, safetensors headers describe their files, shards load without running
code) is the neutral `llama_parity.inputs`, shared with the judge; which tensors a folder may hold
is the converter's own key table (`keymap`), which the judge does not share.
"""

from __future__ import annotations

from pathlib import Path

from llama_parity.formats.safetensors import SafetensorsHeader
from llama_parity.inputs import check_hf_files, read_json, safetensors_header  # noqa: F401 (re-exported)

from .errors import ConversionError
from .keymap import check_hf_keys, check_meta_keys


def check_hf_folder(hf_dir: Path, *, all_keys_known: bool = False) -> dict[str, SafetensorsHeader]:
    """Every JSON file parses and every weight file's header is sound; returns file -> its header.

    `all_keys_known`: also refuse tensors a Llama model of config.json's depth has no place for
    (to-meta would drop them; verify judges such a folder instead, as transformers loads it).
    """
    files = check_hf_files(hf_dir)
    n_layers = read_json(Path(hf_dir) / "config.json").get("num_hidden_layers")
    if all_keys_known and isinstance(n_layers, int):
        held = {k.split(".")[2] for h in files.values() for k in h.tensors if k.startswith("model.layers.")}
        if n_layers > len(held):  # bounded before any loop over the layers (10**9 ran until killed)
            raise ConversionError(f"{hf_dir / 'config.json'}: num_hidden_layers is {n_layers} but the weights hold "
                                  f"{len(held)} layer(s); the config does not describe these files")
        check_hf_keys([k for h in files.values() for k in h.tensors], n_layers, where=hf_dir)
    return files


def check_meta_folder(meta_dir: Path) -> None:
    """Shards load safely (no pickle code runs), params.json parses, no tensor goes unconsumed."""
    from .meta_checkpoint import MetaCheckpoint

    ckpt = MetaCheckpoint(meta_dir)
    try:
        for s in range(ckpt.num_shards):
            check_meta_keys(ckpt.keys(s), int(ckpt.params["n_layers"]), where=ckpt.shard_paths[s])
    finally:
        ckpt.close()


def check_params_bounds(ckpt) -> None:
    """Before detection and planning: no params.json size larger than the shards hold (a layer count of
    10**9 was planned, and grew the process until the OOM killer came), none contradicting them."""
    from llama_parity.params_bounds import params_contradiction, params_problem

    shapes = {k: tuple(t.shape) for k, t in ckpt.shards[0].items()}
    where = str(ckpt.params_path)
    problem = (params_problem(ckpt.params, shapes, where)
               or params_contradiction(ckpt.params, shapes, ckpt.num_shards, where))
    if problem:
        raise ConversionError(problem)
