"""`llama-parity verify --meta-dir META --gguf FILE.gguf`: judge a llama.cpp GGUF against Meta's checkpoint.

Steps (each a list of checks in the same report verify prints, --json, --html):
metadata (meta_checks, weights.file_type_check) -> tokenizer (vocab, chat) -> weights (weights, one
tensor at a time) -> outputs (outputs: the reference on the dequantised weights) -> llama.cpp itself
(runtime: the llama-cpp-python binding in a child process: its encoding of the corpus and chat dialogs, its
logits against the reference on the file's weights; a note when absent or crashed). Nothing is imported from the
converter: the judge holds its own name table and reads the GGUF with its own header parser and gguf's
type tables.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from .gguf_file import GGUFInputError, read_gguf

__all__ = ["GGUFInputError", "verify_gguf", "read_gguf"]


def _progress():
    from tqdm import tqdm

    quiet = not sys.stderr.isatty()
    return lambda it, desc, total=None, unit="tensor": tqdm(it, desc=desc, unit=unit, total=total, disable=quiet)


def _meta_tokenizer(meta_dir: Path, family: str):
    from llama_parity.releases import find_tokenizer
    from llama_parity.reference_model.tokenizer import LLAMA3_FAMILY_VERSION, load_meta_tokenizer

    from .vocab import memo

    path = find_tokenizer(meta_dir)
    if path is None:
        return None, None
    version = LLAMA3_FAMILY_VERSION.get(family, "3.2")
    # loaded once per file content (read-only afterwards): several GGUFs of one checkpoint share it
    key = ("meta tokenizer", str(path), hashlib.sha256(path.read_bytes()).hexdigest(), version)
    tok = memo(key, lambda: load_meta_tokenizer(path, version=version), fresh=False)
    return tok, path


def verify_gguf(meta_dir: str | Path, gguf_path: str | Path, *, variant_id: str | None = None,
                instruct: bool | None = None, checks: str = "all", report=None):
    """Every check of a GGUF file against the Meta checkpoint. `checks`: "all", "quick" (no outputs run:
    metadata, tokenizer, weights), "metadata" (no tensor data beyond rope_freqs). Returns a
    verify.VerifyReport (the same table, JSON and HTML as an HF folder's); `report` appends to one."""
    from llama_parity.metadata import read_meta_side
    from llama_parity.parity import expected_rope_scaling, model_prompts
    from llama_parity.tokenizer_check import TokenizerRelease
    from llama_parity.verify import InputError, VerifyReport

    from .names import with_pread
    from .meta_checks import architecture_checks, expected_from, rope_scaling_checks, structure_ok, \
        tensor_table_checks, tying_check
    from .vocab import tokenizer_report
    from .weights import file_type_check, weight_checks

    meta_dir = Path(meta_dir)
    try:
        gf = read_gguf(gguf_path)
        meta = with_pread(read_meta_side(meta_dir, variant_id=variant_id, instruct=instruct), meta_dir)
        rope = expected_rope_scaling(meta_dir, variant_id)
    except GGUFInputError as e:
        raise InputError(str(e)) from None
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise InputError(f"cannot read the Meta checkpoint: {type(e).__name__}: {e}") from None
    tok, tok_path = _meta_tokenizer(meta_dir, meta.family)
    ex = expected_from(meta, tok, rope)
    report = report or VerifyReport(str(meta_dir), str(gguf_path), "cpu")
    found = tensor_table_checks(gf, ex) + architecture_checks(gf, ex) + rope_scaling_checks(gf, ex)
    found += [tying_check(gf, ex), file_type_check(gf)]
    report.checks += found
    report.notes += meta.evidence
    release = TokenizerRelease(meta.family, meta.instruct, None, meta.release.id if meta.release else meta.family)
    if tok is None:
        report.notes.append("no tokenizer.model next to the Meta checkpoint: the GGUF's tokenizer not checked")
    else:
        report.tokenizer = tokenizer_report(gf, tok, _guard(release, meta), tok_path)
    if checks == "metadata" or not structure_ok(found):
        report.notes.append("GGUF weights and outputs not run: " + ("metadata only" if checks == "metadata" else
                            "the GGUF's tensor table is not the Meta checkpoint's (see the failed checks)"))
        return report
    progress = _progress()
    report.checks += weight_checks(gf, meta, progress)
    if checks != "quick":
        from .outputs import output_checks

        prompt = _prompt(meta_dir, tok_path, ex.vocab, model_prompts)
        logits = _runtime(report, gf, tok, _guard(release, meta), prompt)
        report.checks += output_checks(gf, meta, ex, prompt, progress, runtime_logits=logits)
    return report


def _prompt(meta_dir: Path, tok_path, vocab: int, model_prompts) -> list[int]:
    """verify's prompt for this checkpoint (parity.model_prompts loads Meta's tokenizer to encode it): computed
    once per tokenizer content and vocabulary size, for several GGUFs of one checkpoint."""
    from .vocab import memo

    if tok_path is None:
        return model_prompts(meta_dir, vocab).main
    key = ("prompt", hashlib.sha256(Path(tok_path).read_bytes()).hexdigest(), vocab)
    return memo(key, lambda: model_prompts(meta_dir, vocab).main, fresh=False)


def _runtime(report, gf, tok, release, prompt: list[int]):
    """llama.cpp itself on the file (a child process): its encoding into the tokenizer report, its logits
    returned for the outputs step. Absent or crashed, the report says so in a note (never a pass, never
    the file's failure)."""
    from . import runtime

    if not runtime.available():
        report.notes.append(f"llama.cpp runtime not run (llama_cpp is not importable): llama.cpp's own encoding and "
                            f"logits of this file are NOT judged; {runtime.INSTALL_HINT}")
        return None
    cases = runtime.token_cases(gf, tok, release) if tok is not None else []
    types = "/".join(sorted({t.type_name for t in gf.tensors.values()}))
    run = runtime.evaluate(gf.path, types, [c[:3] for c in cases], [prompt])
    if run.failure:
        report.notes.append(f"{run.failure}: the runtime's failure, not a verdict on the file; llama.cpp's "
                            "encoding and logits NOT judged")
        return None
    if run.peak_rss:
        report.notes.append(f"llama.cpp's runtime loaded the file itself in a child process: its peak RSS "
                            f"{run.peak_rss / 1e9:.2f} GB is llama.cpp's memory, not the judge's")
    if tok is not None and report.tokenizer is not None:
        from .vocab import expected_special_ids

        if cases:
            report.tokenizer.checks.append(runtime.token_check(cases, run.tokens))
        eos = expected_special_ids(tok, release.family if release else "", bool(release and release.instruct))["eos"]
        report.tokenizer.checks.append(runtime.special_check(runtime.expected_special(tok, eos), run.special))
    return run.logits[0]


def _guard(release, meta):
    """Llama Guard 3's category count (1B: 13, 8B: 14) for its chat template."""
    from dataclasses import replace

    from llama_parity.releases import guard_categories

    if meta.family != "llama-guard-3" or meta.release is None:
        return release
    return replace(release, guard_categories=guard_categories(meta.release.id))
