"""A lazy view of a Meta checkpoint directory: what files are there, their keys, shapes and dtypes.

Shards are opened memory-mapped (`torch.load(mmap=True)`), so listing keys and shapes reads only
the pickled metadata; tensor bytes are paged in when a tensor is actually used.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from .errors import ConversionError

_SHARD_RE = re.compile(r"^consolidated\.(\d+)\.pth$")


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype


def sniff_tokenizer_kind(path: Path) -> str:
    """'tiktoken' (base64 rank lines) or 'sentencepiece' (a protobuf), from the file's first bytes."""
    head = path.open("rb").read(256)
    first_line = head.split(b"\n", 1)[0]
    parts = first_line.split(b" ")
    if len(parts) == 2 and parts[1].strip().isdigit() and re.fullmatch(rb"[A-Za-z0-9+/=]+", parts[0] or b"-"):
        return "tiktoken"
    return "sentencepiece"


class MetaCheckpoint:
    """Files of one Meta download: params.json, consolidated.NN.pth shards, tokenizer.model."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise ConversionError(f"input directory {self.dir} does not exist or is not a directory")
        numbered = []
        for p in self.dir.iterdir():
            m = _SHARD_RE.match(p.name)
            if m:
                numbered.append((int(m.group(1)), p))
        numbered.sort()
        if not numbered:
            extra = ""
            if list(self.dir.glob("*.safetensors")):
                extra = " (this looks like a Hugging Face directory; did you swap input and output?)"
            raise ConversionError(f"no consolidated.NN.pth shards in {self.dir}{extra}")
        idx = [n for n, _ in numbered]
        if idx != list(range(len(idx))):
            missing = sorted(set(range(max(idx) + 1)) - set(idx))
            raise ConversionError(
                f"shards in {self.dir} are numbered {', '.join(f'{n:02d}' for n in idx)}: "
                f"consolidated.{missing[0]:02d}.pth is missing (incomplete download?)")
        self.shard_paths: list[Path] = [p for _, p in numbered]
        self.params_path = self.dir / "params.json"
        if not self.params_path.is_file():
            raise ConversionError(f"params.json missing in {self.dir} (expected next to consolidated.00.pth)")
        try:
            self.params: dict = json.loads(self.params_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConversionError(f"{self.params_path} is not valid JSON: {e}") from None
        for key in ("dim", "n_layers", "n_heads"):
            if key not in self.params:
                raise ConversionError(f"{self.params_path} lacks {key!r}; is this a Meta Llama params.json?")
        # Llama 2 downloads ship tokenizer.model once, in the parent folder of the model folders.
        self.tokenizer_path: Path | None = next(
            (p for p in (self.dir / "tokenizer.model", self.dir.parent / "tokenizer.model") if p.is_file()), None)
        chk = self.dir / "checklist.chk"
        self.checklist_path: Path | None = chk if chk.is_file() else None

    @property
    def num_shards(self) -> int:
        return len(self.shard_paths)

    @property
    def tokenizer_kind(self) -> str | None:
        return sniff_tokenizer_kind(self.tokenizer_path) if self.tokenizer_path else None

    @cached_property
    def shards(self) -> list[dict[str, torch.Tensor]]:
        out = []
        for p in self.shard_paths:
            try:
                sd = torch.load(p, map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:  # torch raises many types for truncated / foreign files
                raise ConversionError(f"cannot read {p}: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                                      " (truncated download or not a PyTorch checkpoint?)") from None
            if not isinstance(sd, dict):
                raise ConversionError(f"{p} does not hold a state dict")
            out.append(sd)
        return out

    def keys(self, shard: int = 0) -> list[str]:
        return list(self.shards[shard].keys())

    def info(self, key: str, shard: int = 0) -> TensorInfo:
        t = self.shards[shard].get(key)
        if t is None:
            raise ConversionError(f"{self.shard_paths[shard].name} lacks tensor {key!r}")
        return TensorInfo(tuple(t.shape), t.dtype)

    def has(self, key: str) -> bool:
        return key in self.shards[0]

    def tensor(self, key: str, shard: int) -> torch.Tensor:
        t = self.shards[shard].get(key)
        if t is None:
            raise ConversionError(f"{self.shard_paths[shard].name} lacks tensor {key!r}")
        return t

    def dtype(self) -> torch.dtype:
        return self.info("tok_embeddings.weight").dtype

    def checklist_problems(self, verify_md5: bool = False) -> list[str]:
        """Names checklist.chk lists that are absent, and (optionally) md5 mismatches."""
        if not self.checklist_path:
            return []
        problems = []
        for line in self.checklist_path.read_text().splitlines():
            parts = line.split()
            if len(parts) != 2:
                continue
            digest, name = parts
            f = self.dir / name
            if not f.is_file():
                problems.append(f"{name} is listed in checklist.chk but missing")
            elif verify_md5:
                h = hashlib.md5()
                with f.open("rb") as fh:
                    for block in iter(lambda: fh.read(1 << 24), b""):
                        h.update(block)
                if h.hexdigest() != digest:
                    problems.append(f"{name}: md5 {h.hexdigest()} != checklist {digest}")
        return problems
