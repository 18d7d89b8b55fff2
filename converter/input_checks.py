"""Is every input readable, before anything is judged or converted? (exit 2, naming the file)

`verify` and `diagnose` report exit 1 for "the files are readable and they disagree"; a truncated
download, a corrupt header or a pickle that would run code is a different answer (exit 2), and
must be told apart before any model is built. Only headers and pickles' metadata are read here:
no tensor data, so the checks cost milliseconds even for a 405B checkpoint.

The safetensors header is checked by llama_parity/formats/safetensors.py (8-byte length, JSON,
offsets inside the file) rather than by `safe_open`, whose errors do not name the file, and which
would map an absurd header length before complaining.
"""

from __future__ import annotations

import json
from pathlib import Path

from llama_parity.formats import FormatError
from llama_parity.formats.safetensors import SafetensorsHeader, read_header

from .errors import ConversionError
from .keymap import check_hf_keys, check_meta_keys

def read_json(path: Path, *, what: str = "") -> object:
    """Parse a JSON file; a malformed one is one line naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path} is not valid JSON ({e}); {what or 're-download or regenerate it'}") from None
    except OSError as e:
        raise ConversionError(f"cannot read {path}: {e.strerror}") from None


def safetensors_header(path: Path) -> SafetensorsHeader:
    """The tensor table of a .safetensors file, checked against the file's bytes (formats.safetensors)."""
    try:
        return read_header(path)
    except FormatError as e:
        raise ConversionError(str(e)) from None
    except OSError as e:
        raise ConversionError(f"cannot read {path}: {e.strerror}") from None


def check_hf_folder(hf_dir: Path, *, all_keys_known: bool = False) -> dict[str, SafetensorsHeader]:
    """Every JSON file parses and every weight file's header is sound; returns file -> its header.

    `all_keys_known`: also refuse tensors a Llama model of config.json's depth has no place for
    (to-meta would drop them; verify judges such a folder instead, as transformers loads it).
    """
    hf_dir = Path(hf_dir)
    for p in sorted(hf_dir.glob("*.json")):
        read_json(p)
    cfg = read_json(hf_dir / "config.json")
    if not isinstance(cfg, dict):
        raise ConversionError(f"{hf_dir / 'config.json'} is not a JSON object")
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        wm = read_json(index)
        wm = wm.get("weight_map") if isinstance(wm, dict) else None
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise ConversionError(f"{index} has no weight_map of tensor name -> file")
    elif (hf_dir / "model.safetensors").is_file():
        wm = None
    else:
        pickles = sorted(p.name for p in hf_dir.glob("*.bin")) + sorted(p.name for p in hf_dir.glob("*.pt*"))
        extra = f" ({', '.join(pickles)} are pickles and are never loaded: convert them to safetensors)" if pickles else ""
        raise ConversionError(f"no model.safetensors or model.safetensors.index.json in {hf_dir}{extra}")
    files: dict[str, SafetensorsHeader] = {}
    for f in sorted(set(wm.values())) if wm is not None else ["model.safetensors"]:
        p = hf_dir / f
        if not p.is_file():
            raise ConversionError(f"{p} is listed in {index.name} but missing (incomplete download?)")
        files[f] = safetensors_header(p)
    if wm is not None:
        for name, f in wm.items():
            if name not in files[f].tensors:
                raise ConversionError(f"{index} maps {name} to {f}, which does not hold it")
    n_layers = cfg.get("num_hidden_layers")
    if all_keys_known and isinstance(n_layers, int):
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
