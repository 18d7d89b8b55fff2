"""A lazy view of a Meta checkpoint directory: what files are there, their keys, shapes and dtypes.

Each shard is a `PthReader` (llama_parity/formats/pth.py): its state dict is memory-mapped, so listing
keys and shapes reads only the pickled metadata, and tensor data is copied with positioned reads into
the converter's buffers (`read_rows`), never paged through the mapping (mapped pages count in RSS for as
long as they stay mapped: streaming a 16 GB shard through one makes RSS grow to 16 GB). The pages read
are then dropped from the page cache. The format's details and its fallbacks live in that module.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from llama_parity import releases as registry
from llama_parity.formats import FormatError
from llama_parity.formats.pth import PthReader
from llama_parity.inputs import subfolder_hint  # noqa: F401 (re-exported)

from .errors import ConversionError

_SHARD_RE = re.compile(r"^consolidated\.(\d+)\.pth$")


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype


@contextlib.contextmanager
def _as_conversion_error():
    """The format readers' one-line errors, as the converter's (same text, the converter's exit path)."""
    try:
        yield
    except FormatError as e:
        raise ConversionError(str(e)) from None


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
            raise ConversionError(f"no consolidated.NN.pth shards in {self.dir}{extra or subfolder_hint(self.dir)}")
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
        if not isinstance(self.params, dict):
            raise ConversionError(f"{self.params_path} is not a JSON object; is this a Meta Llama params.json?")
        for key in ("dim", "n_layers", "n_heads"):
            if key not in self.params:
                raise ConversionError(f"{self.params_path} lacks {key!r}; is this a Meta Llama params.json?")
            v = self.params[key]
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConversionError(f"{self.params_path}: {key} is {v!r}, expected a positive integer")
        self.tokenizer_path: Path | None = registry.find_tokenizer(self.dir)
        chk = self.dir / "checklist.chk"
        self.checklist_path: Path | None = chk if chk.is_file() else None
        # Each byte is converted once: pages read are dropped from the page cache (read_rows).
        self.readers = [PthReader(p, keep_cached=False) for p in self.shard_paths]

    @property
    def num_shards(self) -> int:
        return len(self.shard_paths)

    @property
    def tokenizer_kind(self) -> str | None:
        if self.tokenizer_path is None:
            return None
        try:
            return registry.tokenizer_kind(self.tokenizer_path)
        except (OSError, ValueError) as e:
            raise ConversionError(f"{e}: replace tokenizer.model with the one from Meta's download") from None

    @cached_property
    def shards(self) -> list[dict[str, torch.Tensor]]:
        """Each shard's state dict, memory-mapped (a pickle that would run code is refused unrun)."""
        with _as_conversion_error():
            return [r.tensors for r in self.readers]

    @property
    def fallback_keys(self) -> set[str]:
        """Tensors read through the memory map, not the fast path (the file's layout was not understood)."""
        return set().union(*(r.fallback_keys for r in self.readers))

    @property
    def input_files(self) -> list[Path]:
        """Every file a conversion reads (what `--overwrite` must never replace)."""
        files = [*self.shard_paths, self.params_path]
        return files + [p for p in (self.tokenizer_path, self.checklist_path) if p is not None]

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

    def close(self) -> None:
        """Close file descriptors opened by read_rows (the memory-mapped view stays usable)."""
        for r in self.readers:
            r.close()

    def read_rows(self, key: str, shard: int, start: int, stop: int, out: torch.Tensor, *,
                  keep_cached: bool = False) -> torch.Tensor:
        """Copy rows [start, stop) (along dim 0) of `key` in `shard` into `out` and return it.

        `out` must be contiguous with the tensor's dtype and shape [stop - start, *shape[1:]].
        Bytes come straight from the file into `out` (no mapping, no intermediate copy), and the
        pages read are dropped from the page cache, so memory use is `out` and nothing else.
        """
        self.info(key, shard)  # a missing key is named as the converter names it
        with _as_conversion_error():
            return self.readers[shard].rows(key, start, stop, out, keep_cached=keep_cached)

    def tensors_equal(self, key_a: str, key_b: str, shard: int, chunk_bytes: int = 64 << 20) -> bool:
        """Bit-exact equality of two tensors of one shard, compared in row chunks by positioned reads.

        `torch.equal(ckpt.tensor(a), ckpt.tensor(b))` pages both through the memory map, which
        puts both whole tensors in RSS (1 GB for a Llama 3 1B embedding and its tied copy). The pages
        stay cached: the conversion reads the embedding again right after this check.
        """
        self.info(key_a, shard), self.info(key_b, shard)
        with _as_conversion_error():
            return self.readers[shard].same_bytes(key_a, key_b, chunk_bytes)

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
