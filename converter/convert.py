"""Meta -> HF conversion: files -> MetaCheckpoint -> Variant -> plan -> streaming writer.

Output is built in a hidden sibling directory, flushed to disk and renamed into place only when
complete (converter/staging.py), so a failure (bad input, full disk, Ctrl-C, SIGTERM) never leaves
a half-written model where a user expects one, and never replaces a folder the inputs live in.
"""

from __future__ import annotations

import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .detect import Variant, detect
from .errors import ConversionError
from .hf_config import write_configs
from .input_checks import check_params_bounds
from .executor import CHUNK_BYTES, ReplicaCheck, Scratch, iter_chunks
from .meta_checkpoint import MetaCheckpoint
from .model_card import write_model_card
from .plan import TensorPlan, build_plan, refuse_unplanned_tensors
from .safetensors_writer import OutTensor, write_shards
from .staging import write_atomically

DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3  # transformers' default "5GB"


@dataclass
class ConvertOptions:
    dtype: torch.dtype | None = None  # None: keep the checkpoint's dtype (bf16 stays bf16 bit for bit)
    variant_id: str | None = None
    instruct: bool | None = None
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    overwrite: bool = False
    write_tokenizer: bool = True
    progress: bool | None = None  # None: only when stderr is a terminal
    verify_md5: bool = False
    keep_original: bool = False  # also copy Meta's files into original/, as the official repositories do
    # A file published with the output or not at all (the CLI's --json report): called with the finished
    # report and the staging folder before the output's rename; returns a staged file
    # (report_files.StagedFile) or None (written into the staging folder); staging.write_atomically
    publish_with: Callable[[ConversionReport, Path], object] | None = None


@dataclass
class ConversionReport:
    variant: Variant
    output_dir: Path
    files: list[str]
    n_tensors: int
    n_bytes: int
    seconds: float
    replicated_max_abs_diff: float
    replicated_worst_key: str
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        v = self.variant
        return {
            "variant": v.label, "registry_id": v.registry_id, "family": v.family, "instruct": v.instruct,
            "output_dir": str(self.output_dir), "files": self.files, "tensors": self.n_tensors,
            "bytes": self.n_bytes, "seconds": round(self.seconds, 3),
            "replicated_tensors_max_abs_diff": self.replicated_max_abs_diff,
            "replicated_tensors_worst_key": self.replicated_worst_key,
            "evidence": list(v.evidence), "warnings": self.warnings,
        }


def dtype_arg(name: str | None) -> torch.dtype | None:
    if name in (None, "", "auto"):
        return None
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if name not in table:
        raise ConversionError(f"unknown --dtype {name!r}; use one of auto, bfloat16, float16, float32")
    return table[name]


class _Progress:
    """Bytes written, rate and time left on stderr; silent unless stderr is a terminal (or forced).

    Updated per written chunk (64 MB), not per tensor: the 1 GB embedding would otherwise freeze
    the bar for seconds and make the rate jump.
    """

    def __init__(self, total_bytes: int, enabled: bool | None):
        self.bar = None
        if enabled is None:
            enabled = sys.stderr.isatty()
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                            desc="converting", dynamic_ncols=True, file=sys.stderr, mininterval=0.5)

    def update(self, n: int, name: str) -> None:
        if self.bar:
            self.bar.set_postfix_str(name[-40:], refresh=False)
            self.bar.update(n)

    def close(self) -> None:
        if self.bar:
            self.bar.close()


def inspect(input_dir: str | Path, options: ConvertOptions | None = None) -> tuple[Variant, list[TensorPlan]]:
    """Detection and plan only: nothing written, no tensor data read except the tie/kv checks."""
    options = options or ConvertOptions()
    ckpt = MetaCheckpoint(input_dir)
    check_params_bounds(ckpt)
    variant = detect(ckpt, variant_id=options.variant_id, instruct=options.instruct)
    refuse_unplanned_tensors(variant, ckpt)
    return variant, build_plan(variant, ckpt, options.dtype)


def convert_meta_to_hf(input_dir: str | Path, output_dir: str | Path,
                       options: ConvertOptions | None = None) -> ConversionReport:
    options = options or ConvertOptions()
    t0 = time.perf_counter()
    output_dir = Path(output_dir)
    ckpt = MetaCheckpoint(input_dir)
    check_params_bounds(ckpt)
    warnings = ckpt.checklist_problems(options.verify_md5)
    if any("md5" in w for w in warnings):
        raise ConversionError("checksum mismatch: " + "; ".join(warnings))
    variant = detect(ckpt, variant_id=options.variant_id, instruct=options.instruct)
    refuse_unplanned_tensors(variant, ckpt)
    plan = build_plan(variant, ckpt, options.dtype)
    if ckpt.has("rope.freqs"):
        warnings += _check_rope_freqs(ckpt, variant)
    if variant.tokenizer_path is None and options.write_tokenizer:
        raise ConversionError(f"tokenizer.model not found in {ckpt.dir} or its parent; it is needed for the HF "
                              "tokenizer files (pass --no-tokenizer to convert the weights alone)")
    n_bytes = sum(e.nbytes for e in plan)

    def write(staging: Path) -> ConversionReport:
        files, replicas = _write_staging(staging, ckpt, variant, plan, options, warnings)
        return ConversionReport(variant, output_dir, files, len(plan), n_bytes, time.perf_counter() - t0,
                                replicas.max_abs_diff, replicas.worst_key, warnings)

    def written(report: ConversionReport, staging: Path):  # the output is complete and on disk; its rename is left
        report.seconds = time.perf_counter() - t0
        return options.publish_with(report, staging) if options.publish_with is not None else None

    return write_atomically(output_dir, write, overwrite=options.overwrite, notes=warnings,
                            input_files=ckpt.input_files, input_dirs=[ckpt.dir], needed_bytes=n_bytes,
                            companion=written)


def _write_staging(staging: Path, ckpt: MetaCheckpoint, variant: Variant, plan: list[TensorPlan],
                   options: ConvertOptions, warnings: list[str]) -> tuple[list[str], ReplicaCheck]:
    """Weights, configs and tokenizer files into the staging folder; the caller commits or removes it."""
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        # The tokenizer files (1-1.5 s of Python for a 128k vocab) are built while the weights
        # stream out: that thread mostly computes, the writer mostly waits on the disk.
        tokenizer_job = None
        if options.write_tokenizer:
            from .tokenizer_files import write_hf_tokenizer

            tokenizer_job = pool.submit(write_hf_tokenizer, variant.tokenizer_path, staging,
                                        family=variant.family, instruct=variant.instruct,
                                        guard_categories=_guard_categories(variant))
        replicas = ReplicaCheck()
        files = _write_weights(staging, ckpt, plan, options, replicas)
        if ckpt.fallback_keys:
            warnings.append(f"{len(ckpt.fallback_keys)} tensor(s) (e.g. {min(ckpt.fallback_keys)}) were not laid out "
                            "as plain zip records and went through torch's memory map instead of direct reads: "
                            "the output is the same, but memory use grew with them")
        write_configs(staging, variant, options.dtype or variant.dtype)
        if tokenizer_job is not None:
            _check_tokenizer_size(tokenizer_job.result().vocab_size, variant, warnings)
        if replicas.max_abs_diff > 0:
            warnings.append(f"replicated tensors differ between shards (max |diff| {replicas.max_abs_diff:g} in "
                            f"{replicas.worst_key}); shard 00's copy was written")
        write_model_card(staging, ckpt, variant, options.dtype or variant.dtype, keep_original=options.keep_original)
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return files, replicas


def _write_weights(staging: Path, ckpt: MetaCheckpoint, plan: list[TensorPlan], options: ConvertOptions,
                   replicas: ReplicaCheck) -> list[str]:
    by_name = {e.hf_name: e for e in plan}
    specs = [OutTensor(e.hf_name, e.shape, e.dtype) for e in plan]
    progress = _Progress(sum(s.nbytes for s in specs), options.progress)
    try:
        scratch = Scratch()  # used by the writer's producer thread only
        return write_shards(
            staging, specs,
            lambda s, take: iter_chunks(by_name[s.name], ckpt, replicas, take=take, scratch=scratch),
            max_shard_bytes=options.max_shard_bytes, chunk_bytes=CHUNK_BYTES, on_bytes=progress.update)
    finally:
        progress.close()
        ckpt.close()


def _check_tokenizer_size(tok_vocab: int, variant: Variant, warnings: list[str]) -> None:
    if tok_vocab > variant.vocab_size:
        raise ConversionError(f"the tokenizer defines {tok_vocab} ids but the model's vocab is "
                              f"{variant.vocab_size}: wrong tokenizer.model for this checkpoint?")
    if tok_vocab < variant.vocab_size:
        warnings.append(f"tokenizer defines {tok_vocab} ids, embedding has {variant.vocab_size} rows "
                        "(padding rows are normal for some releases)")


def _guard_categories(variant: Variant) -> int | None:
    """Llama Guard 3's category count (1B: 13, 8B: 14) is a release fact: llama_parity.releases decides it."""
    if variant.family != "llama-guard-3":
        return None
    from llama_parity.releases import guard_categories

    n = guard_categories(variant.registry_id)
    if n is None:
        raise ConversionError("a Llama Guard 3 checkpoint that is neither the released 1B nor 8B: pass "
                              "--variant llama-guard-3-1b or llama-guard-3-8b")
    return n


def _check_rope_freqs(ckpt: MetaCheckpoint, variant: Variant) -> list[str]:
    """Llama 1/2 files carry precomputed RoPE frequencies: they must match params.json's theta."""
    raw = ckpt.tensor("rope.freqs", 0)
    stored = raw.float()
    d = variant.head_dim
    expected = 1.0 / (variant.rope_theta ** (torch.arange(0, d, 2)[: d // 2].float() / d))
    if stored.shape != expected.shape:
        return [f"rope.freqs has shape {list(stored.shape)}, expected {[d // 2]}"]
    rel = float(((stored - expected).abs() / expected).max())
    # stored in the checkpoint dtype (fp16/bf16): agreement to that precision is what we can ask
    tol = 1e-2 if raw.dtype != torch.float32 else 1e-6
    if not math.isfinite(rel) or rel > tol:
        return [f"rope.freqs in the checkpoint does not match rope_theta {variant.rope_theta:g} from params.json "
                f"(max relative difference {rel:.3g}); HF will use params.json's theta"]
    return []
