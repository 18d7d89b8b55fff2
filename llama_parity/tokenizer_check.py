"""Tokenizer parity: Meta's tokenizer (reference_model) and the release's facts against an HF tokenizer folder.

`check_tokenizer(tokenizer_model, hf_dir, release=tokenizer_release(meta_dir))` trusts nothing in the HF
folder. It loads it as users do (`transformers.AutoTokenizer.from_pretrained(hf_dir)`), reads its JSON files,
and runs named steps, each a list of checks (the steps live in the modules named):

exact checks (bound 0 mismatches), each mismatch naming the file and field or the id:
- every token (tokenizer_vocab): vocabulary size, every id's bytes or piece, every merge at its priority
  against the merges Meta's ranks (tiktoken) or pieces and scores (sentencepiece) imply, every piece's type,
  the BPE model's settings, the added tokens and their flags, special-token ids and names, and a
  tokenizer.model shipped in the folder piece by piece;
- configuration (tokenizer_fields): bos/eos/unk/pad as the release implies, BOS from the post-processor,
  every tokenizer_config.json / special_tokens_map.json field that changes behaviour in transformers 4.x
  or 5.x against the release's official files; what only fills a gap passes and the report says so;
- encode / decode / special-token text (here): encode with and without bos, decode, random ids,
  special-token text in strict mode (`split_special_tokens=True`);
- chat and infilling (tokenizer_chat): the folder's chat template rendered on fixed dialogs == the
  release's official template; Llama 2 / Code Llama / Llama Guard 3 templates == Meta's format; Code
  Llama's infilling prompt == Meta's `infilling_prompt_tokens`.

measured classes (reported with counts, never hidden, not a failure):
- special-token text with HF's default parsing (HF reads "<|eot_id|>" typed by a user as the control token;
  Meta reads it as text; chat templates rely on HF's parsing),
- runs longer than 25,000 characters (Meta cuts them before encoding; tokenizer.json cannot),
- decode of ids whose sentencepiece byte pieces are not valid UTF-8 (sentencepiece replaces each invalid
  byte, HF's ByteFallback the whole run): only ids not produced by encoding text (e.g. sampled) reach it,
- reserved special-token names (other tools name some reserved ids as Meta's official HF repos do),
- the official Llama 3.x templates against Meta's ChatFormat (they add a dated system header and trim).

The check and its steps import nothing from the converter; only `tokenizer_release` still asks the
converter's detection which release a Meta folder is (it moves to the release registry's identification).
The measurements behind docs/tokenizers.md (transformers' default loading against ours, every code point,
one merge per token) are in benchmarks/tokenizer_bench.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_parity.reference_model.tokenizer import (
    LLAMA3_SPECIAL_TOKENS,
    SentencePieceTokenizer,
    detect_tokenizer_kind,
    load_meta_tokenizer,
)
from llama_parity.tokenizer_chat import chat_checks, infill_checks
from llama_parity.tokenizer_corpus import (  # noqa: F401 - the corpus is part of this module's interface
    CURATED_CORPUS,
    fuzz_corpus,
    has_invalid_byte_run,
    long_run_corpus,
    official_render_cases,
    random_id_sequences,
    special_text_corpus,
)
from llama_parity.tokenizer_fields import field_checks, special_token_checks
from llama_parity.tokenizer_report import (  # noqa: F401 - re-exported: the report verify prints
    Acc,
    CheckResult,
    Ctx,
    Mismatch,
    TokenizerReport,
    first_diff,
    hf_call,
    ids_of,
    read_json,
)
from llama_parity.tokenizer_vocab import (
    merges_checks,
    model_settings_checks,
    piece_type_checks,
    shipped_model_checks,
    vocab_checks,
)


# --- what the release implies --------------------------------------------------------------------------

@dataclass(frozen=True)
class TokenizerRelease:
    """What a release implies for its tokenizer files: family (special-token table, eos), chat or base,
    and Llama Guard 3's category count (1B: 13, 8B: 14), all from llama_parity.releases.identify."""

    family: str
    instruct: bool
    guard_categories: int | None = None
    label: str = ""


def tokenizer_release(meta_dir: Path, variant_id: str | None = None, instruct: bool | None = None, *,
                      hf_dir: Path | None = None, ident=None) -> TokenizerRelease | None:
    """The release a Meta checkpoint is: verify's one identification (`ident`, else made here by
    metadata.identify_checkpoint, i.e. releases.identify), so the special tokens and template are
    judged against the release and twin every other check uses. None when it cannot be told (an
    ambiguity, unreadable files): the checks that need it are skipped and a note says so."""
    from llama_parity.releases import guard_categories

    from .metadata import identify_checkpoint

    if ident is None:
        try:
            ident = identify_checkpoint(Path(meta_dir), variant_id=variant_id, instruct=instruct, hf_dir=hf_dir)
        except (OSError, ValueError):  # IdentifyError and JSON errors are ValueErrors; verify reports them
            return None
    if ident.ambiguity:
        return None
    rel = ident.release
    return TokenizerRelease(ident.family, ident.instruct, guard_categories(rel.id if rel else None),
                            rel.id if rel else f"{ident.label} (custom shape)")


# --- the check -----------------------------------------------------------------------------------------

def _infer_version(tokenizer_model: Path, hf) -> str:
    """Which of Meta's Llama 3 special-token tables the HF side claims (the closest by names)."""
    from llama_parity.reference_model.tokenizer import read_tiktoken_ranks

    n = len(read_tiktoken_ranks(tokenizer_model))
    hf_names = hf.convert_ids_to_tokens(list(range(n, n + 256)))
    best = max(LLAMA3_SPECIAL_TOKENS, key=lambda v: sum(a == b for a, b in zip(LLAMA3_SPECIAL_TOKENS[v], hf_names)))
    return best


def _context(tokenizer_model: Path, hf_dir: Path, release, version, hf_tokenizer) -> Ctx:
    from transformers import AutoTokenizer

    from llama_parity.reference_model.tokenizer import LLAMA3_FAMILY_VERSION

    hf = hf_tokenizer if hf_tokenizer is not None else AutoTokenizer.from_pretrained(str(hf_dir))
    kind = detect_tokenizer_kind(tokenizer_model)
    if kind == "tiktoken" and version is None:
        version = LLAMA3_FAMILY_VERSION.get(release.family) if release else None
        version = version or _infer_version(tokenizer_model, hf)
    meta = load_meta_tokenizer(tokenizer_model, version=version or "3.2")
    return Ctx(tokenizer_model, hf_dir, meta, hf, isinstance(meta, SentencePieceTokenizer), release,
                read_json(hf_dir / "tokenizer.json"), read_json(hf_dir / "tokenizer_config.json"),
                read_json(hf_dir / "special_tokens_map.json"))


def check_tokenizer(
    tokenizer_model: Path,
    hf_dir: Path,
    *,
    release: TokenizerRelease | None = None,
    corpus: list[str] | None = None,
    chat: bool = True,
    version: str | None = None,
    hf_tokenizer: Any = None,
) -> TokenizerReport:
    """Compare Meta's tokenizer for `tokenizer_model` (and the release's facts) with the HF folder `hf_dir`."""
    tokenizer_model, hf_dir = Path(tokenizer_model), Path(hf_dir)
    ctx = _context(tokenizer_model, hf_dir, release, version, hf_tokenizer)
    checks = every_token_checks(ctx) + special_token_checks(ctx) + field_checks(ctx)
    checks += encode_checks(ctx, corpus) + decode_checks(ctx) + special_text_checks(ctx, corpus) + long_run_checks(ctx)
    if chat:
        checks += chat_checks(ctx)
    if ctx.sp and ctx.meta.has_infill:
        checks += infill_checks(ctx)
    report = TokenizerReport(str(tokenizer_model), str(hf_dir), ctx.meta.kind, checks)
    if release is None:
        report.notes.append("release unknown: special tokens, chat template, Llama Guard categories and config "
                            "fields were judged against the tokenizer file alone")
    report.notes += [f"tokenizer: {c.name}: passed, each keeping Meta's encoding, decoding and truncation: "
                     + "; ".join(c.accepted) for c in checks if c.accepted]
    return report


def every_token_checks(ctx: Ctx) -> list[CheckResult]:
    """The whole tokenizer, nothing sampled: ids, merges and their priorities, piece types, model settings,
    added tokens, and a tokenizer.model shipped in the folder."""
    return (vocab_checks(ctx) + merges_checks(ctx) + piece_type_checks(ctx) + model_settings_checks(ctx)
            + shipped_model_checks(ctx))


# --- steps: encode, decode, special-token text, long runs ----------------------------------------------

def _texts(ctx: Ctx, corpus) -> tuple[list[str], list[str]]:
    specials = list(ctx.meta.special_tokens)
    texts = list(CURATED_CORPUS) + list(corpus or [])
    special_texts = [t for t in texts if any(s in t for s in specials)] + list(special_text_corpus(specials))
    return [t for t in texts if not any(s in t for s in specials)], special_texts


def encode_checks(ctx: Ctx, corpus) -> list[CheckResult]:
    meta, hf, sp = ctx.meta, ctx.hf, ctx.sp
    enc_bos = Acc("encode with bos", 0)
    enc_nobos = Acc("encode without bos", 0)
    dec = Acc("decode", 0, note="HF decode(skip_special_tokens=True) for sentencepiece (Meta drops control "
                                 "tokens); skip_special_tokens=False for tiktoken (Meta prints them)")
    for t in _texts(ctx, corpus)[0]:
        m_bos = meta.encode(t, bos=True, eos=False)
        enc_bos.add(t, m_bos, hf_call(lambda: ids_of(hf(t, add_special_tokens=True))))
        m = meta.encode(t, bos=False, eos=False)
        enc_nobos.add(t, m, hf_call(lambda: ids_of(hf(t, add_special_tokens=False))))
        dec.add(t, meta.decode(m_bos), hf_call(lambda: hf.decode(m_bos, skip_special_tokens=sp)))
    return [enc_bos.r, enc_nobos.r, dec.r]


def decode_checks(ctx: Ctx) -> list[CheckResult]:
    meta, hf, sp = ctx.meta, ctx.hf, ctx.sp
    rnd = Acc("decode of random ids", 0)
    bad_utf8 = Acc("decode of random ids with invalid UTF-8 byte pieces", None,
                    note="sentencepiece replaces each invalid byte with U+FFFD; HF's ByteFallback decoder "
                         "replaces the whole run of byte pieces")
    for ids in random_id_sequences(meta, 400):
        target = bad_utf8 if has_invalid_byte_run(meta, ids) else rnd
        target.add(str(ids), meta.decode(ids), hf_call(lambda: hf.decode(ids, skip_special_tokens=sp)))
    return [rnd.r, bad_utf8.r]


def special_text_checks(ctx: Ctx, corpus) -> list[CheckResult]:
    meta, hf = ctx.meta, ctx.hf
    strict = Acc("special-token text, strict (split_special_tokens=True)", 0,
                  note="Meta encodes special-token text typed by a user as plain text")
    default = Acc("special-token text, HF default parsing", None,
                   note="HF parses it as the control token (chat templates rely on this); reported, not hidden")
    for t in _texts(ctx, corpus)[1]:
        m = meta.encode(t, bos=True, eos=False)
        strict.add(t, m, hf_call(lambda: ids_of(hf(t, add_special_tokens=True, split_special_tokens=True))))
        default.add(t, m, hf_call(lambda: ids_of(hf(t, add_special_tokens=True))))
    return [strict.r, default.r]


def long_run_checks(ctx: Ctx) -> list[CheckResult]:
    runs = Acc("runs longer than 25,000 chars", None,
                note="Meta cuts them before encoding; tokenizer.json cannot express the cut")
    for t in long_run_corpus():
        runs.add(t, ctx.meta.encode(t, bos=True, eos=False),
                 hf_call(lambda: ids_of(ctx.hf(t, add_special_tokens=True))))
    return [runs.r]
