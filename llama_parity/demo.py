"""`llama-parity demo`: the embedded default job, needing no download.

Builds a tiny random checkpoint in Meta's exact file format (default: the Llama 3.2 1B layout, the
release where a wrong RoPE factor hides most easily), converts it, verifies the conversion and
prints the report.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from llama_parity.converter.convert import ConversionReport, ConvertOptions, convert_meta_to_hf
from llama_parity.fixtures import variants as registry
from llama_parity.fixtures.factory import make_tiny_checkpoint

from .verify import VerifyReport, verify

DEFAULT_VARIANT = "llama3.2-1b-instruct"


def run_demo(workdir: Path | None = None, variant_id: str = DEFAULT_VARIANT, device: str = "cpu",
             progress: bool | None = None) -> tuple[ConversionReport, VerifyReport]:
    spec = registry.get(variant_id)
    if workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="llama-parity-demo-"))
    meta_dir = make_tiny_checkpoint(spec, workdir / "meta")
    hf_dir = workdir / "hf" / spec.meta_dir_name
    conv = convert_meta_to_hf(meta_dir, hf_dir, ConvertOptions(overwrite=True, progress=progress))
    rep = verify(meta_dir, hf_dir, device=device)
    return conv, rep
