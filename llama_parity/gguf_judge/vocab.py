"""A GGUF's tokenizer proven whole against Meta's tokenizer.model.

- tokenizer model (`gpt2` byte-level BPE for Llama 3's tiktoken file, `llama` for sentencepiece) and
  pre-tokenizer (`llama-bpe`: llama.cpp's Llama 3 split; a GGUF with `default` splits text unlike Meta);
- every token's bytes (tiktoken ranks in GPT-2's byte-to-unicode spelling, special-token names) or
  sentencepiece piece, every token type, and the sentencepiece scores;
- merges (gpt2): exactly the pairs (a, b) of tokens whose concatenation is a token, listed in the order
  of that token's rank. That is what makes merge-rank BPE equal to tiktoken's rank BPE: both merge, at
  each step, the adjacent pair whose concatenation ranks lowest (two pairs forming the same token never
  coexist, so their relative order is free);
- bos/eos/eot/eom/unk ids and add_bos/add_eos as the release implies (eos <|eot_id|> for instruct);
- the chat template rendered on fixed dialogs against the release's official template (and, for
  Llama 2 / Code Llama / Guard, Meta's own format), through tokenizer_check's steps.
What llama.cpp itself encodes from the file is judged with its runtime (runtime.token_check).

Results are memoised per process by content (`memo`): Meta's side by the tokenizer file's sha256, each
GGUF-side check by the sha256 of the exact stored bytes of the keys it reads. Several GGUFs of one
checkpoint (f16 and q8_0, or mutants of one file) then prove the 128k-token vocabulary once; any byte
of a key a check reads that differs is another key, so the check runs again.
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any, Callable

from llama_parity.tokenizer_check import CheckResult, Mismatch, TokenizerReport, first_diff
from llama_parity.tokenizer_vocab import gpt2_byte_spelling

MAX_EXAMPLES = 5
MEMO_SIZE = 24
_MEMO: dict[tuple, Any] = {}
VOCAB_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
              "tokenizer.ggml.merges", "tokenizer.ggml.scores")


def memo(key: tuple, compute: Callable[[], Any], *, fresh: bool = True):
    """compute() once per key (a few entries kept); `fresh`: each caller gets its own deep copy (reports
    are edited after the fact), else the shared value (read-only tables)."""
    if key in _MEMO:
        _MEMO[key] = _MEMO.pop(key)  # least recently used first: a checkpoint's tokenizer outlives its mutants
    else:
        if len(_MEMO) >= MEMO_SIZE:
            _MEMO.pop(next(iter(_MEMO)))
        _MEMO[key] = compute()
    return copy.deepcopy(_MEMO[key]) if fresh else _MEMO[key]


def tokenizer_digest(meta) -> tuple:
    """What Meta's tokenizer object is made of: its file's bytes, kind and (tiktoken) version."""
    return hashlib.sha256(meta.path.read_bytes()).hexdigest(), getattr(meta, "kind", ""), getattr(meta, "version", None)
# GGUF token types (llama.cpp's llama_token_type), numbered as sentencepiece's piece types.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


class Acc:
    """Counts comparisons and keeps the first mismatches as examples (bound 0 unless told)."""

    def __init__(self, name: str, bound: int | None = 0, note: str = ""):
        self.r = CheckResult(name, 0, 0, bound, note=note)

    def add(self, text: Any, meta: Any, gguf: Any) -> None:
        self.r.total += 1
        if meta != gguf:
            self.r.mismatches += 1
            if len(self.r.examples) < MAX_EXAMPLES:
                self.r.examples.append(Mismatch(str(text)[:200], _short(meta), _short(gguf), first_diff(meta, gguf)))

    def add_each(self, label: Callable[[int], str], meta: list, gguf: list) -> None:
        """One comparison per id (the GGUF's list may be short): equal lists counted at once, else id by id."""
        if len(gguf) >= len(meta) and meta == gguf[:len(meta)]:
            self.r.total += len(meta)
            return
        for i, m in enumerate(meta):
            self.add(label(i), m, gguf[i] if i < len(gguf) else None)


def _short(x):
    if isinstance(x, list) and len(x) > 40:
        return x[:20] + ["..."] + x[-8:]
    if isinstance(x, str) and len(x) > 200:
        return x[:120] + "..."
    return x


def expected_tokens(meta) -> tuple[list[str], list[int], list[float] | None]:
    """(token text, token type, score or None) for every id of Meta's tokenizer, as GGUF spells them."""
    if getattr(meta, "kind", "") == "tiktoken":
        spell = {i: c for i, c in enumerate(gpt2_byte_spelling())}
        texts = [""] * meta.n_words
        for tok, rank in meta.mergeable_ranks.items():
            texts[rank] = tok.decode("latin-1").translate(spell)
        types = [NORMAL] * meta.n_words
        for name, i in meta.special_tokens.items():
            texts[i], types[i] = name, CONTROL
        return texts, types, None
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(meta.path.read_bytes())
    return [p.piece for p in proto.pieces], [int(p.type) for p in proto.pieces], [p.score for p in proto.pieces]


def expected_merges(texts: list[str], n_ordinary: int) -> tuple[set[str], dict[str, int]]:
    """Every 'a b' whose parts and concatenation are ordinary tokens, and each token's rank."""
    rank = {t: i for i, t in enumerate(texts[:n_ordinary])}
    pairs = set()
    for t in texts[:n_ordinary]:
        for k in range(1, len(t)):
            if t[:k] in rank and t[k:] in rank:
                pairs.add(f"{t[:k]} {t[k:]}")
    return pairs, rank


def merges_check(gf, texts: list[str], n_ordinary: int, want_rank=None) -> CheckResult:
    got = gf.get("tokenizer.ggml.merges") or []
    want, rank = want_rank or expected_merges(texts, n_ordinary)
    acc = Acc("merges (the pairs Meta's ranks imply, in rank order)",
              note="merge-rank BPE equals Meta's rank BPE only with exactly these pairs in this order")
    have = set(got)
    for m in sorted(want - have)[:1000]:
        acc.add("missing merge", m, None)
    for m in sorted(have - want)[:1000]:
        acc.add("merge Meta's ranks do not imply", None, m)
    last, disorder = -1, 0
    for i, m in enumerate(got):
        r = rank.get(m.replace(" ", "", 1), -1)
        if r < last:
            disorder += 1
            if disorder <= 3:
                acc.add(f"merge #{i} out of rank order", f"rank >= {last}", f"{m!r} rank {r}")
        last = max(last, r)
    acc.r.total = max(acc.r.total, len(want))
    acc.r.mismatches += max(0, len(want - have) - 1000) + max(0, len(have - want) - 1000) + max(0, disorder - 3)
    return acc.r


def vocabulary_checks(gf, meta) -> list[CheckResult]:
    """The checks of the module doc on the vocabulary keys (memoised by their bytes and Meta's file)."""
    digest = tokenizer_digest(meta)
    keys = tuple(k for k in VOCAB_KEYS if k != "tokenizer.ggml.merges")
    out = memo(("vocab", gf.digest(keys), digest), lambda: _vocabulary_checks(gf, meta, digest))
    if getattr(meta, "kind", "") == "tiktoken":  # the merges depend on the ordinary tokens alone: one proof per
        def merges():  # file for every Llama 3 version (their special-token names differ, not their merges)
            texts, _, _, want = _meta_side(meta, digest)
            return merges_check(gf, texts, len(meta.mergeable_ranks), want)
        out.append(memo(("merges check", gf.digest(["tokenizer.ggml.merges"]), digest[0]), merges))
    return out


def _meta_side(meta, digest) -> tuple:
    """Meta's tokens, types, scores and (tiktoken) implied merges, computed once per tokenizer file."""
    def compute():
        texts, types, scores = expected_tokens(meta)
        if getattr(meta, "kind", "") != "tiktoken":
            return texts, types, scores, None
        # the merges follow from the ordinary tokens alone: one computation per file for every Llama 3 version
        n = len(meta.mergeable_ranks)
        return texts, types, scores, memo(("merges", digest[0]), lambda: expected_merges(texts, n), fresh=False)
    return memo(("meta", digest), compute, fresh=False)


def _vocabulary_checks(gf, meta, digest) -> list[CheckResult]:
    tiktoken = getattr(meta, "kind", "") == "tiktoken"
    kind = Acc("tokenizer model and pre-tokenizer", note="gpt2 + llama-bpe for Llama 3 (tiktoken); llama (spm)")
    kind.add("tokenizer.ggml.model", "gpt2" if tiktoken else "llama", gf.get("tokenizer.ggml.model"))
    pre = gf.get("tokenizer.ggml.pre")
    kind.add("tokenizer.ggml.pre", "llama-bpe" if tiktoken else "default", pre if pre or tiktoken else "default")
    texts, types, scores, merges = _meta_side(meta, digest)
    got_texts = gf.get("tokenizer.ggml.tokens") or []
    size = Acc("vocabulary size")
    size.add("tokenizer.ggml.tokens", len(texts), len(got_texts))
    whole = Acc("every token's bytes / piece")
    whole.add_each(lambda i: f"id {i}", texts, got_texts)
    got_types = gf.get("tokenizer.ggml.token_type") or []
    typ = Acc("token types", note="normal / control / byte / unknown / user-defined as Meta's file says (<unk> may "
              "be control: llama.cpp finds it by unknown_token_id)")
    want_types = [got_types[i] if t == UNKNOWN and i < len(got_types) and got_types[i] == CONTROL else t
                  for i, t in enumerate(types)]
    typ.add_each(lambda i: f"id {i} {texts[i]!r}", want_types, got_types)
    out = [kind.r, size.r, whole.r, typ.r]
    if not tiktoken:
        got_scores = gf.get("tokenizer.ggml.scores") or []
        sc = Acc("sentencepiece scores", note="all -1000 when llama.cpp built the vocabulary without tokenizer.model; "
                 "control and unknown pieces are never merged into, so their scores are not compared")
        ids = [i for i, t in enumerate(types) if t not in (CONTROL, UNKNOWN)]
        sc.add_each(lambda j: f"id {ids[j]} {texts[ids[j]]!r}", [scores[i] for i in ids],
                    [got_scores[i] if i < len(got_scores) else None for i in ids])
        out.append(sc.r)
    return out


def expected_special_ids(meta, family: str, instruct: bool) -> dict[str, int | None]:
    """bos/eos/eot/eom/unk as Meta's tokenizer and the release imply (eos <|eot_id|> for Llama 3.x
    instruct and Llama Guard 3, <|end_of_text|> for base models; </s> for sentencepiece)."""
    if getattr(meta, "kind", "") == "tiktoken":
        eos = meta.eot_id if instruct or family == "llama-guard-3" else meta.eos_id
        return {"bos": meta.bos_id, "eos": eos, "eot": meta.eot_id, "eom": meta.eom_id, "unknown": None}
    return {"bos": meta.bos_id, "eos": meta.eos_id, "eot": meta.eot_id, "eom": None, "unknown": meta.unk_id}


def special_checks(gf, meta, family: str, instruct: bool) -> list[CheckResult]:
    """Required: bos, eos (the instruct eos bug), add_bos true, and Code Llama's eot (▁<EOT>). Optional
    keys, when present, must hold Meta's id (Llama 3's eot, eom: llama.cpp also finds them by name;
    unknown) and add_eos must be false."""
    acc = Acc("special token ids and add_bos/add_eos", note="eos <|eot_id|> for instruct (Llama 3 GGUFs shipped "
              "<|end_of_text|>: generation never stopped)")
    want = expected_special_ids(meta, family, instruct)
    for key in ("bos", "eos"):
        acc.add(f"tokenizer.ggml.{key}_token_id", want[key], gf.get(f"tokenizer.ggml.{key}_token_id"))
    # llama.cpp finds Llama 3's <|eot_id|> / <|eom_id|> by name when the keys are absent, but not Code Llama's
    # ▁<EOT>: without the key its infilling never stops (llama.cpp's own converter writes it for 32016 pieces)
    required = {"eot"} if getattr(meta, "kind", "") != "tiktoken" and want["eot"] is not None else set()
    for key in ("eot", "eom", "unknown"):
        got = gf.get(f"tokenizer.ggml.{key}_token_id")
        if got is not None or key in required:
            acc.add(f"tokenizer.ggml.{key}_token_id", want[key], got)
    acc.add("tokenizer.ggml.add_bos_token", True, gf.get("tokenizer.ggml.add_bos_token", True))
    acc.add("tokenizer.ggml.add_eos_token", False, gf.get("tokenizer.ggml.add_eos_token", False))
    return [acc.r]


def tokenizer_report(gf, meta, release, tokenizer_path) -> TokenizerReport:
    from .chat import chat_template_checks

    family = release.family if release is not None else ""
    instruct = bool(release.instruct) if release is not None else False
    checks = vocabulary_checks(gf, meta) + special_checks(gf, meta, family, instruct)
    checks += chat_template_checks(gf, meta, release)
    report = TokenizerReport(str(tokenizer_path), str(gf.path), meta.kind, checks)
    if release is None:
        report.notes.append("release unknown: eos and the chat template judged against the tokenizer alone")
    return report
