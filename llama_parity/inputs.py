"""Is every input readable, before anything is judged or converted? (exit 2, naming the file)

Neutral ground shared by the converter and the judge: these checks say whether a file can be read
at all, never what it should contain (each side answers that with its own tables: the converter's
keymap, the judge's expected names), so a bug here can refuse a good file or name the wrong
culprit, but cannot make a wrong conversion pass.

`verify` and `diagnose` report exit 1 for "the files are readable and they disagree"; a truncated
download, a corrupt header or a pickle that would run code is a different answer (exit 2), and
must be told apart before any model is built. Only headers and pickles' metadata are read here
(the readers are llama_parity/formats'): no tensor data, so the checks cost milliseconds even for
a 405B checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import InputError
from .formats import FormatError
from .formats.pth import load_state_dict
from .formats.safetensors import SafetensorsHeader, read_header


def read_json(path: Path, *, what: str = "") -> object:
    """Parse a JSON file; a malformed one is one line naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not valid JSON ({e}); {what or 're-download or regenerate it'}") from None
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror}") from None


def safetensors_header(path: Path) -> SafetensorsHeader:
    """The tensor table of a .safetensors file, checked against the file's bytes (formats.safetensors)."""
    try:
        return read_header(path)
    except FormatError as e:
        raise InputError(str(e)) from None
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror}") from None


def load_shard_safely(p: Path) -> dict[str, torch.Tensor]:
    """A consolidated.NN.pth as a memory-mapped state dict, its pickle never run (formats.pth)."""
    try:
        return load_state_dict(p)
    except FormatError as e:
        raise InputError(str(e)) from None


def check_hf_files(hf_dir: Path) -> dict[str, SafetensorsHeader]:
    """Every JSON file parses and every weight file's header is sound; returns file -> its header.

    Which tensors the folder should hold is each side's own question (the converter's key table,
    the judge's expected names), not asked here.
    """
    hf_dir = Path(hf_dir)
    for p in sorted(hf_dir.glob("*.json")):
        read_json(p)
    cfg = read_json(hf_dir / "config.json")
    if not isinstance(cfg, dict):
        raise InputError(f"{hf_dir / 'config.json'} is not a JSON object")
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        wm = read_json(index)
        wm = wm.get("weight_map") if isinstance(wm, dict) else None
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise InputError(f"{index} has no weight_map of tensor name -> file")
    elif (hf_dir / "model.safetensors").is_file():
        wm = None
    else:
        pickles = sorted(p.name for p in hf_dir.glob("*.bin")) + sorted(p.name for p in hf_dir.glob("*.pt*"))
        extra = f" ({', '.join(pickles)} are pickles and are never loaded: convert them to safetensors)" if pickles else ""
        raise InputError(f"no model.safetensors or model.safetensors.index.json in {hf_dir}{extra}")
    files: dict[str, SafetensorsHeader] = {}
    for f in sorted(set(wm.values())) if wm is not None else ["model.safetensors"]:
        p = hf_dir / f
        if not p.is_file():
            raise InputError(f"{p} is listed in {index.name} but missing (incomplete download?)")
        files[f] = safetensors_header(p)
    if wm is not None:
        for name, f in wm.items():
            if name not in files[f].tensors:
                raise InputError(f"{index} maps {name} to {f}, which does not hold it")
    return files



def subfolder_hint(directory: Path) -> str:
    """For a folder without shards: name the sub-folders that hold some (the parent-folder mistake,
    e.g. pointing at ~/.llama/checkpoints or at Llama 2's download root)."""
    try:
        subs = sorted(d for d in Path(directory).iterdir() if d.is_dir() and any(d.glob("consolidated.*.pth")))
    except OSError:
        return ""
    if not subs:
        return ""
    names = ", ".join(str(d) for d in subs[:5]) + (f" (and {len(subs) - 5} more)" if len(subs) > 5 else "")
    return f"; the shards are in a sub-folder: pass {'one of ' if len(subs) > 1 else ''}{names}"
