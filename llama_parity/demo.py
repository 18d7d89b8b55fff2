"""`llama-parity demo`: the embedded default job, needing no download.

Builds a tiny random checkpoint in Meta's exact file format (default: the Llama 3.2 1B layout, the
release where a wrong RoPE factor hides most easily), converts it, verifies the conversion and
prints the report.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from llama_parity.converter.convert import ConversionReport, ConvertOptions, convert_meta_to_hf
from llama_parity import releases as registry
from llama_parity.fixtures.factory import make_tiny_checkpoint

from .verify import VerifyReport, verify

DEFAULT_VARIANT = "llama3.2-1b-instruct"


@contextlib.contextmanager
def run_demo(keep: str | bool | None = None, variant_id: str = DEFAULT_VARIANT, device: str = "cpu",
             progress: bool | None = None) -> Iterator[tuple[Path, ConversionReport, VerifyReport]]:
    """Yields (workdir, conversion, verify report). `keep`: a folder to build in and keep, True for a
    kept temporary folder, falsy for a temporary folder removed on exit (also on errors)."""
    spec = registry.get(variant_id)
    workdir = Path(keep) if isinstance(keep, (str, Path)) else Path(tempfile.mkdtemp(prefix="llama-parity-demo-"))
    try:
        meta_dir = make_tiny_checkpoint(spec, workdir / "meta")
        hf_dir = workdir / "hf" / spec.meta_dir_name
        conv = convert_meta_to_hf(meta_dir, hf_dir, ConvertOptions(overwrite=True, progress=progress))
        yield workdir, conv, verify(meta_dir, hf_dir, device=device)
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
