"""Facts read from a download's files: where the tokenizer is and what kind it is, how many ids it
defines, and whether the download is Meta's FP8 checkpoint."""

from __future__ import annotations

import base64
from pathlib import Path

import torch


# --- the tokenizer -------------------------------------------------------------------------------

def find_tokenizer(meta_dir: Path) -> Path | None:
    """tokenizer.model next to the shards, or one folder up (Llama 2 downloads ship it once there)."""
    meta_dir = Path(meta_dir)
    return next((p for p in (meta_dir / "tokenizer.model", meta_dir.parent / "tokenizer.model") if p.is_file()), None)


def tokenizer_kind(path: Path) -> str:
    """'tiktoken' (Llama 3: base64 token, space, rank per line) or 'sentencepiece' (Llama 1/2 and
    Code Llama: a protobuf whose first field, the pieces, starts with byte 0x0a); ValueError else."""
    head = Path(path).open("rb").read(4096)
    lines = head.split(b"\n")
    lines = [ln for ln in (lines[:-1] if len(lines) > 1 else lines) if ln.strip()]
    if lines and all(_is_rank_line(ln) for ln in lines):
        return "tiktoken"
    if head[:1] == b"\x0a":
        return "sentencepiece"
    raise ValueError(f"{path}: neither a sentencepiece model nor a tiktoken rank file")


def _is_rank_line(line: bytes) -> bool:
    parts = line.split()
    if len(parts) != 2 or not parts[1].isdigit():
        return False
    try:
        base64.b64decode(parts[0], validate=True)
    except ValueError:
        return False
    return True


def tokenizer_n_words(path: Path, kind: str | None = None) -> int:
    """Ids the tokenizer defines: sentencepiece's vocab size, or Llama 3's ranks plus its 256 special tokens."""
    kind = kind or tokenizer_kind(path)
    if kind == "sentencepiece":
        import sentencepiece

        return sentencepiece.SentencePieceProcessor(model_file=str(path)).vocab_size()
    return sum(1 for line in Path(path).open("rb") if line.strip()) + LLAMA3_SPECIAL_TOKEN_COUNT


LLAMA3_SPECIAL_TOKEN_COUNT = 256  # Meta's Llama 3 tokenizer appends 256 special tokens after the ranks


# --- quantized downloads ---------------------------------------------------------------------------

FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
                   if hasattr(torch, n))


def fp8_scale_files(meta_dir: Path) -> list[str]:
    """Meta's FP8 checkpoints (the folder `Llama3.1-405B`) carry fp8_scales_N.pt beside the shards."""
    return sorted(p.name for p in Path(meta_dir).glob("fp8_scales_*.pt"))


def fp8_refusal(meta_dir: Path, fp8_tensor: str | None) -> str | None:
    """One line telling the user what to do with an FP8 checkpoint, or None when it is not one."""
    scales = fp8_scale_files(meta_dir)
    if not scales and fp8_tensor is None:
        return None
    evidence = ", ".join(([f"{scales[0]}" + (f" (+{len(scales) - 1} more)" if len(scales) > 1 else "")] if scales else [])
                         + ([fp8_tensor] if fp8_tensor else []))
    return (f"{meta_dir} holds Meta's FP8-quantized checkpoint ({evidence}): its weights are scaled FP8, "
            "which this converter does not dequantise; download the bf16 release instead "
            "(`llama model download --model-id Llama3.1-405B:bf16-mp8`, folder Llama3.1-405B-bf16-mp8, "
            "or the -Instruct / -mp16 variants) and convert that")
