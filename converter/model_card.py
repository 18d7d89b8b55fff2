"""The output folder as Meta's official Hugging Face repositories ship it: a README.md model card,
Meta's LICENSE and USE_POLICY.md, and (on request) Meta's own files under `original/`.

Written into the conversion's staging folder, so it appears atomically with the weights. The card
names where the weights came from and what made them; `record_verify` later fills in the verify
result (`llama-parity convert --verify`), between markers, leaving the rest of the card alone.
"""

from __future__ import annotations

import datetime
import os
import shutil
import tempfile
from pathlib import Path

import torch

# Names Meta's downloads use for the license texts (Llama 2/3 download scripts put them at the
# download root, one folder above the model folder; some releases ship LICENSE.txt).
LICENSE_FILES = (("LICENSE", "LICENSE.txt", "LICENSE.md"), ("USE_POLICY.md",))
VERIFY_BEGIN, VERIFY_END = "<!-- llama-parity verify: begin -->", "<!-- llama-parity verify: end -->"


def find_license_files(ckpt_dir: Path) -> list[Path]:
    """Meta's license texts next to the shards, else in the download root (the parent folder)."""
    found = []
    for names in LICENSE_FILES:
        hit = next((d / n for d in (ckpt_dir, ckpt_dir.parent) for n in names if (d / n).is_file()), None)
        if hit is not None:
            found.append(hit)
    return found


def original_files(ckpt) -> list[Path]:
    """What the official repositories keep under original/: params.json, the shards, tokenizer.model."""
    files = [ckpt.params_path, *ckpt.shard_paths]
    return files + ([ckpt.tokenizer_path] if ckpt.tokenizer_path is not None else [])


def _release_row(variant) -> str:
    if not variant.registry_id:
        return "not a registered release (custom shape)"
    from llama_parity.releases import get

    return f"`{variant.registry_id}` (Meta's own conversion: `{get(variant.registry_id).hf_repo}`)"


def render_card(ckpt, variant, dtype: torch.dtype, licenses: list[Path], kept_original: bool) -> str:
    from llama_parity import __version__

    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    lic = (f"Meta's {' and '.join(f'`{p.name}`' for p in licenses)} from the download are included in this folder; "
           "the model is governed by them." if licenses else
           "No LICENSE or USE_POLICY.md was found next to the download; the model remains under Meta's license "
           "and acceptable use policy for this release.")
    original = ("`original/` holds Meta's files as downloaded (params.json, consolidated.NN.pth, tokenizer.model)."
                if kept_original else "")
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [llama, llama-parity]
---

# {variant.label} (Hugging Face format)

Converted from Meta's original checkpoint by llama-parity. The weights are Meta's: shards merged, q/k rows
reordered for Hugging Face's rotary layout, nothing else changed.

| | |
|---|---|
| source checkpoint | `{ckpt.dir.name}` ({ckpt.dir.resolve()}), {len(ckpt.shard_paths)} shard(s) |
| release | {_release_row(variant)} |
| variant | {variant.label} |
| dtype | {str(dtype).replace('torch.', '')} |
| converter | llama-parity {__version__} |
| date | {today} |

## Verification

{VERIFY_BEGIN}
Not verified yet. Run `llama-parity verify --meta-dir {ckpt.dir} --hf-dir <this folder>`
(or convert with `--verify`, which records the result here).
{VERIFY_END}

## License

{lic} {original}
"""


def write_model_card(out_dir: Path, ckpt, variant, dtype: torch.dtype, *, keep_original: bool = False) -> None:
    """README.md, Meta's license texts and, with keep_original, Meta's files in original/ (copies:
    a hard link would let a later edit of the output change the user's download)."""
    licenses = find_license_files(ckpt.dir)
    for p in licenses:
        shutil.copyfile(p, out_dir / p.name)
    if keep_original:
        (out_dir / "original").mkdir()
        for p in original_files(ckpt):
            shutil.copyfile(p, out_dir / "original" / p.name)
    (out_dir / "README.md").write_text(render_card(ckpt, variant, dtype, licenses, keep_original), encoding="utf-8")


def _verify_block(report) -> str:
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"`llama-parity verify` on {when} ({report.device}): **{report.verdict}**",
             "", "| check | measured | bound | result |", "|---|---|---|---|"]
    cell = lambda x: str(x).replace("|", "\\|")  # noqa: E731
    rows = report.rows()
    is_measured = lambda bound: str(bound).startswith("measured")  # noqa: E731 (no bound: a measurement)
    for name, measured, bound, ok in rows:
        result = "measured" if is_measured(bound) else "ok" if ok else "FAIL"
        lines.append(f"| {cell(name)} | {cell(measured)} | {'-' if is_measured(bound) else cell(bound)} | {result} |")
    lines.append("")
    if any(is_measured(r[2]) for r in rows):
        lines.append("- measured: counted and reported, not judged (known differences, see llama-parity's "
                     "docs/tokenizers.md)")
    lines += [f"- {n}" for n in report.notes]
    lines += _attestation_lines(getattr(report, "attestation", None))
    return "\n".join(lines).rstrip()


def _attestation_lines(att: dict | None) -> list[str]:
    """The files' sha256 as verify read them (the weight files' are the Hub's LFS digests), so a
    copy can be checked with `llama-parity verify --attestation REPORT.json` or sha256sum."""
    if not att:
        return []
    lines = ["", f"Attestation (sha256 of every file below, {len(att['hf_tensors'])} tensors digested one by one; "
             f"all files together: `{att['digest']}`):", "", "| file | sha256 |", "|---|---|"]
    lines += [f"| {name} | `{digest}` |" for name, digest in att["hf_files"].items()]
    meta = ", ".join(f"{n} `{d[:16]}…`" for n, d in att["meta_files"].items())
    return lines + ["", f"Judged against Meta's files: {meta}"]


def record_verify(hf_dir: str | Path, report) -> bool:
    """Put a verify result into the card between the markers; False when there is no card with them."""
    card = Path(hf_dir) / "README.md"
    text = card.read_text(encoding="utf-8") if card.is_file() else ""
    if VERIFY_BEGIN not in text or VERIFY_END not in text:
        return False
    head, rest = text.split(VERIFY_BEGIN, 1)
    tail = rest.split(VERIFY_END, 1)[1]
    new = f"{head}{VERIFY_BEGIN}\n{_verify_block(report)}\n{VERIFY_END}{tail}"
    fd, tmp = tempfile.mkstemp(prefix=".README.", dir=card.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(new)
    os.chmod(tmp, card.stat().st_mode & 0o777)
    os.replace(tmp, card)  # never a half-written card
    return True
