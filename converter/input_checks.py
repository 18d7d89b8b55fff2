"""Is every input readable, before anything is judged or converted? (exit 2, naming the file)

`verify` and `diagnose` report exit 1 for "the files are readable and they disagree"; a truncated
download, a corrupt header or a pickle that would run code is a different answer (exit 2), and
must be told apart before any model is built. Only headers and pickles' metadata are read here:
no tensor data, so the checks cost milliseconds even for a 405B checkpoint.

The safetensors header is checked by hand (8-byte length, JSON, offsets inside the file) rather
than with `safe_open`, whose errors do not name the file, and which would map an absurd header
length before complaining.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from .errors import ConversionError
from .keymap import check_hf_keys, check_meta_keys

# safetensors itself refuses headers above 100 MB (a 405B index of every tensor is ~100 KB).
MAX_HEADER_BYTES = 100_000_000
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


def read_json(path: Path, *, what: str = "") -> object:
    """Parse a JSON file; a malformed one is one line naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path} is not valid JSON ({e}); {what or 're-download or regenerate it'}") from None
    except OSError as e:
        raise ConversionError(f"cannot read {path}: {e.strerror}") from None


def safetensors_header(path: Path) -> tuple[dict, int]:
    """The tensor table of a .safetensors file and where its data starts, after checking that
    the table describes the file's bytes."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ConversionError(f"{path} is truncated ({size} bytes): not a safetensors file; re-download it")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise ConversionError(f"{path}: header length {n} is impossible for a {size}-byte file "
                                      "(truncated or corrupt); re-download or re-convert it")
            raw = fh.read(n)
    except OSError as e:
        raise ConversionError(f"cannot read {path}: {e.strerror}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ConversionError(f"{path}: corrupt safetensors header (not JSON); re-download or re-convert it") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    _check_offsets(path, header, size - 8 - n)
    return header, 8 + n


def _check_offsets(path: Path, header: dict, data_bytes: int) -> None:
    end = 0
    for name, t in header.items():
        try:
            a, b = (int(x) for x in t["data_offsets"])
            nbytes = _ITEMSIZE[t["dtype"]] * math.prod(int(d) for d in t["shape"])
        except (KeyError, TypeError, ValueError):
            raise ConversionError(f"{path}: corrupt safetensors header entry for {name!r}") from None
        if not 0 <= a <= b or b - a != nbytes:
            raise ConversionError(f"{path}: {name!r} has data offsets {[a, b]} that do not match its shape")
        end = max(end, b)
    if end != data_bytes:
        state = "truncated" if end > data_bytes else "longer than its header says"
        raise ConversionError(f"{path} is {state}: its header describes {end} data bytes, the file holds "
                              f"{data_bytes}; re-download or re-convert it")


def check_hf_folder(hf_dir: Path, *, all_keys_known: bool = False) -> dict[str, tuple[dict, int]]:
    """Every JSON file parses and every weight file's header is sound; returns file -> (tensor
    table, data start) as `safetensors_header` gives them.

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
    files: dict[str, tuple[dict, int]] = {}
    for f in sorted(set(wm.values())) if wm is not None else ["model.safetensors"]:
        p = hf_dir / f
        if not p.is_file():
            raise ConversionError(f"{p} is listed in {index.name} but missing (incomplete download?)")
        files[f] = safetensors_header(p)
    if wm is not None:
        for name, f in wm.items():
            if name not in files[f][0]:
                raise ConversionError(f"{index} maps {name} to {f}, which does not hold it")
    n_layers = cfg.get("num_hidden_layers")
    if all_keys_known and isinstance(n_layers, int):
        check_hf_keys([k for table, _ in files.values() for k in table], n_layers, where=hf_dir)
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
