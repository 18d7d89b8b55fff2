"""Tokenizer parity: Meta's tokenizer (reference_model) and the release's facts against an HF tokenizer folder.

`check_tokenizer(tokenizer_model, hf_dir, release=tokenizer_release(meta_dir))` trusts nothing in the HF
folder. It loads it as users do (`transformers.AutoTokenizer.from_pretrained(hf_dir)`), reads its JSON files,
and runs named steps, each a list of checks:

exact checks (bound 0 mismatches), each mismatch naming the file and field or the id:
- vocab_checks: vocabulary size, every id's bytes or piece (tokenizer.json), the added tokens and their
  flags (special, not normalized, no lstrip/rstrip/single_word) in tokenizer.json and tokenizer_config.json,
  special-token ids and names;
- special_token_checks: bos/eos/unk/pad in tokenizer_config.json and special_tokens_map.json as the release
  implies, and the post-processor adding BOS exactly once;
- encode_checks / decode_checks / special_text_checks: encode with and without bos, decode, random ids,
  special-token text in strict mode (`split_special_tokens=True`);
- chat_checks: the folder's chat template rendered on fixed dialogs == the release's official template;
  Llama 2 / Code Llama / Llama Guard 3 templates == Meta's format (Guard's category count from the release);
- infill_checks (Code Llama): the infilling prompt == Meta's `infilling_prompt_tokens`.

measured classes (reported with counts, never hidden, not a failure):
- special-token text with HF's default parsing (HF reads "<|eot_id|>" typed by a user as the control token;
  Meta reads it as text; chat templates rely on HF's parsing),
- runs longer than 25,000 characters (Meta cuts them before encoding; tokenizer.json cannot),
- decode of ids whose sentencepiece byte pieces are not valid UTF-8 (sentencepiece replaces each invalid
  byte, HF's ByteFallback the whole run): only ids not produced by encoding text (e.g. sampled) reach it,
- reserved special-token names (other tools name some reserved ids as Meta's official HF repos do),
- the official Llama 3.x templates against Meta's ChatFormat (they add a dated system header and trim).

Run `python -m llama_parity.tokenizer_check [convert_llama_weights_to_hf.py]` to measure transformers'
default loading against ours on the real Llama 2 / Llama 3 tokenizers, and
`python -m llama_parity.tokenizer_check --sweep` for every code point in five contexts (the numbers in
docs/tokenizers.md).
"""

from __future__ import annotations

import json
import random
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llama_parity.reference_model.chat_format import dialog_tokens, llama_guard3_dialog_tokens
from llama_parity.reference_model.tokenizer import (
    LLAMA3_SPECIAL_TOKENS,
    MAX_NO_WHITESPACES_CHARS,
    SentencePieceTokenizer,
    TiktokenTokenizer,
    detect_tokenizer_kind,
    load_meta_tokenizer,
)

MAX_EXAMPLES = 5  # mismatches kept per check in the report (counts are always complete)

# --- built-in corpus of known trouble ------------------------------------------------------------------

CURATED_CORPUS: tuple[str, ...] = (
    "", " ", "  ", "   ", "\n", "\n\n", "\n\n\n", "\t", "\r\n", " \n", "\n ", "\t\t\n",
    "Hello", " Hello", "  Hello", "Hello ", "Hello  ", " Hello ", "Hello world", "Hello  world", "Hello\nworld",
    "Hello\n\nworld", "Hello\n\n\nworld", "Hello\tworld", "Hello\r\nworld", "hello\u00a0world", "a b  c   d    e",
    "line1\n line2\n  line3", "    def f():\n        return 1\n", "\tindented", "trailing\n", "trailing\n\n",
    "1", "12", "123", "1234", "12345678901234567890", "3.14159", "1,000,000", "2024-07-23", "v1.2.3",
    "x = 10 ** 9 + 7", "0x7fff_ffff", "½ ¼ ⅓", "١٢٣ ٤٥٦", "१२३",
    "don't", "I'm", "we'll", "they're", "you've", "she'd", "it's", "DON'T", "I'M", "it’s", "'s", " 's",
    "日本語", "中文文本", "한국어 텍스트", "日本語のテキスト 中文 한국어", "こんにちは世界",
    "🙂", "🚀🚀🚀", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷🇩🇪", " 🙂", "emoji🙂inside",
    "e\u0301", "a\u0300\u0301\u0302", "Zalgo: Z\u0351\u0352\u0353a\u0354l\u0355g\u0356o", "ﬁ ﬂ ﬀ", "Å Å",
    "שלום עולם", "مرحبا بالعالم", "\u202eRTL override\u202c", "mixed English עברית العربية",
    "Привет, мир!", "Ελληνικά", "ᚠᛇᚻ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "𓀀𓀁", "\U0010fffd", "\ufeffBOM", "zero\u200bwidth", "\u3000ideographic space",
    "line\u2028separator", "tab\u000bvertical", "form\u000cfeed", "nul\x00char", "bell\x07", "\x7f",
    "▁", "▁▁", "▁hi", " ▁ ", "<0x41>", "<unk>",
    "supercalifragilisticexpialidocious", "Pneumonoultramicroscopicsilicovolcanoconiosis" * 3,
    "a" * 100, "ab" * 200, "-" * 64, "=" * 80, "." * 33, " " * 17 + "x", " " * 100, "\n" * 30, "\t" * 20,
    "https://example.com/a/b?c=d&e=f#g", "user@example.com", "C:\\Windows\\System32", "$HOME/.bashrc",
    "{\"key\": [1, 2, {\"nested\": null}]}", "<html><body>hi</body></html>", "SELECT * FROM t WHERE x='y';",
    "[INST] hi [/INST]", "<<SYS>>\nsys\n<</SYS>>\n\n", "[/INST]", " [INST]", "Q: what?\nA: that.",
    "The quick brown fox jumps over the lazy dog. " * 5,
    "Ünïcödé wïth äccénts", "ÀÉÎÕÜ àéîõü", "ß ẞ", "İstanbul ı I i", "ǅ ǈ ǋ",
)


def special_text_corpus(specials: list[str]) -> tuple[str, ...]:
    """Strings that contain special-token text (the class Meta and HF's default parsing treat differently)."""
    picks = specials[:12] + specials[-2:]
    out = []
    for s in picks:
        out += [s, f" {s}", f"hi {s} there", f"{s}{s}", f"x{s}\n\n"]
    return tuple(out)


def long_run_corpus() -> tuple[str, ...]:
    """Runs longer than Meta's 25,000-character cut."""
    n = MAX_NO_WHITESPACES_CHARS
    return ("a" * (n + 7), " " * (n + 3) + "x", "ab" * (n // 2 + 11))


CHAT_DIALOGS: tuple[tuple[dict[str, Any], ...], ...] = (
    ({"role": "user", "content": "Hello!"},),
    ({"role": "user", "content": " padded with spaces "},),
    ({"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}),
    ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello, how can I help?"},
     {"role": "user", "content": "Tell me a joke."}),
    ({"role": "system", "content": "Be nice.\n"}, {"role": "user", "content": "日本語で答えて"},
     {"role": "assistant", "content": "はい。"}, {"role": "user", "content": "🙂"}),
    ({"role": "user", "content": ""},),
    ({"role": "user", "content": "code:\n```python\nprint(1)\n```"}, {"role": "assistant", "content": "ok\n\n"}),
    ({"role": "user", "content": "trailing newline\n"}, {"role": "assistant", "content": " spaced answer "}),
)

TOOL_DIALOGS: tuple[tuple[dict[str, Any], ...], ...] = (
    ({"role": "user", "content": "Price of gold?"},
     {"role": "assistant", "content": "", "python_tag": True,
      "tool_calls": [{"function": {"name": "brave_search", "arguments": {"query": "gold price"}}}]},
     {"role": "tool", "content": "{\"price\": 2400}"}),
    ({"role": "user", "content": "Is 7 prime?"},
     {"role": "assistant", "content": "def is_prime(n):\n    return n > 1", "python_tag": True,
      "end_of_message": True},
     {"role": "ipython", "content": "True"}),
)

BOUNDARY_DIALOGS: tuple[tuple[dict[str, Any], ...], ...] = (
    ({"role": "user", "content": "\nhi"},),
    ({"role": "user", "content": "\n\nhi"},),
    ({"role": "user", "content": " \nhi"},),
    ({"role": "user", "content": "\r\nhi"},),
    ({"role": "system", "content": "\nsys"}, {"role": "user", "content": "ok"}),
    ({"role": "user", "content": "search"},
     {"role": "assistant", "content": "Let me search. ",
      "tool_calls": [{"function": {"name": "brave_search", "arguments": {"query": "gold"}}}]}),
)


def fuzz_corpus(n: int = 300, seed: int = 0) -> list[str]:
    """Deterministic random strings drawn from classes of known trouble (used for the measured numbers)."""
    rng = random.Random(seed)
    pools = [
        " ", "  ", "\n", "\n\n", "\t", "\r\n", "\u00a0", "\u3000",
        "a", "the", "Hello", "world", "Llama", "tokenizer", "x" * 12, "don't", "'s",
        "0", "7", "42", "1234567", "3.14",
        "日本", "語", "中文", "한국어", "🙂", "👍🏽", "🇫🇷", "e\u0301", "\u0301", "שלום", "مرحبا", "Привет",
        ".", ",", "!", "?", "(", ")", "{", "}", "[", "]", "<", ">", "/", "\\", "-", "_", "=", "*", "#", "@",
        "▁", "\u200b", "\ufeff", "𝔘", "ß", "İ",
    ]
    out = []
    for _ in range(n):
        k = rng.randint(0, 12)
        out.append("".join(rng.choice(pools) for _ in range(k)))
    return out


# --- report --------------------------------------------------------------------------------------------

@dataclass
class Mismatch:
    text: str
    meta: Any
    hf: Any
    first_diff: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CheckResult:
    name: str
    total: int
    mismatches: int
    bound: int | None  # None: measured and reported, not a failure
    examples: list[Mismatch] = field(default_factory=list)
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.bound is None or self.mismatches <= self.bound

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d


@dataclass
class TokenizerReport:
    tokenizer_model: str
    hf_dir: str
    kind: str
    checks: list[CheckResult]
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {"tokenizer_model": self.tokenizer_model, "hf_dir": self.hf_dir, "kind": self.kind, "ok": self.ok,
                "checks": [c.to_dict() for c in self.checks], "notes": list(self.notes)}

    def rows(self) -> list[tuple[str, str, str, bool]]:
        """(check, measured, bound, ok) for a human table. Measured classes read as measurements."""
        out = []
        for c in self.checks:
            if c.bound is None:
                out.append((f"tokenizer: {c.name}", f"{c.mismatches}/{c.total} differ",
                            "measured (docs/tokenizers.md)", c.ok))
            else:
                out.append((f"tokenizer: {c.name}", f"{c.mismatches}/{c.total} mismatches", f"<= {c.bound}", c.ok))
        return out

    def mismatch_lines(self) -> list[str]:
        """Examples of each mismatch, failing checks first (measured classes after them)."""
        lines = []
        for c in sorted(self.checks, key=lambda c: c.ok):
            for m in c.examples:
                lines.append(f"[{c.name}] {m.text!r}: meta={m.meta!r} hf={m.hf!r} first diff at {m.first_diff}")
        return lines


def first_diff(a, b) -> int:
    """First differing position (-1 when equal); 0 for differing scalars."""
    if not (isinstance(a, (str, list, tuple)) and isinstance(b, (str, list, tuple))):
        return -1 if a == b else 0
    if isinstance(a, str) and isinstance(b, str):
        n = min(len(a), len(b))
    else:
        a, b = list(a), list(b)
        n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n if len(a) != len(b) else -1


class _Acc:
    def __init__(self, name: str, bound: int | None, note: str = ""):
        self.r = CheckResult(name, 0, 0, bound, note=note)

    def add(self, text: Any, meta: Any, hf: Any) -> None:
        self.r.total += 1
        if meta != hf:
            self.r.mismatches += 1
            if len(self.r.examples) < MAX_EXAMPLES:
                shown = text if isinstance(text, str) and len(text) <= 200 else _short(text)
                fd = first_diff(meta, hf)
                if isinstance(meta, str) and isinstance(hf, str) and max(len(meta), len(hf)) > 200:
                    meta, hf = _around(meta, fd), _around(hf, fd)  # long renderings: where they part
                self.r.examples.append(Mismatch(shown, _short(meta), _short(hf), fd))


def _around(s: str, i: int, width: int = 60) -> str:
    return ("..." if i > width else "") + s[max(0, i - width) : i + width] + ("..." if i + width < len(s) else "")


def _short(x: Any) -> Any:
    if isinstance(x, str) and len(x) > 200:
        return x[:100] + f"...<{len(x)} chars>..." + x[-20:]
    if isinstance(x, list) and len(x) > 60:
        return x[:30] + ["..."] + x[-10:]
    if isinstance(x, (list, tuple)) and x and isinstance(x[0], dict):
        return json.dumps(x, ensure_ascii=False)
    return x


def random_id_sequences(meta, n: int, seed: int = 0) -> list[list[int]]:
    """Deterministic random sequences of non-special ids (half of them byte pieces for sentencepiece)."""
    rng = random.Random(seed)
    specials = set(meta.special_tokens.values())
    n_normal = meta.n_words - (256 if isinstance(meta, TiktokenTokenizer) else 0)
    pool = [i for i in range(n_normal) if i not in specials]
    byte_ids = []
    if isinstance(meta, SentencePieceTokenizer):
        byte_ids = [i for i in pool if meta.sp_model.is_byte(i)]
    out = []
    for k in range(n):
        src = byte_ids if byte_ids and k % 2 else pool
        out.append([rng.choice(src) for _ in range(rng.randint(1, 8))])
    return out


def has_invalid_byte_run(meta, ids) -> bool:
    """True when consecutive sentencepiece byte pieces in `ids` do not form valid UTF-8."""
    if not isinstance(meta, SentencePieceTokenizer):
        return False
    run = bytearray()
    for i in list(ids) + [None]:
        if i is not None and meta.sp_model.is_byte(i):
            run.append(int(meta.sp_model.id_to_piece(i)[3:5], 16))
            continue
        if run:
            try:
                run.decode("utf-8")
            except UnicodeDecodeError:
                return True
            run = bytearray()
    return False


# --- what the release implies --------------------------------------------------------------------------

@dataclass(frozen=True)
class TokenizerRelease:
    """What a release implies for its tokenizer files: family (special-token table, eos), chat or base,
    and Llama Guard 3's category count (1B: 13, 8B: 14), all from fixtures.variants via detection."""

    family: str
    instruct: bool
    guard_categories: int | None = None
    label: str = ""


def tokenizer_release(meta_dir: Path, variant_id: str | None = None,
                      instruct: bool | None = None) -> TokenizerRelease | None:
    """The release a Meta checkpoint is (converter.detect's decision, one home for release facts), or None
    when it cannot be told (then the checks that need it are skipped and a note says so). `instruct`
    (verify's --instruct/--base) picks the twin whose special tokens and template to expect."""
    from llama_parity.converter.detect import detect
    from llama_parity.converter.meta_checkpoint import MetaCheckpoint
    from llama_parity.fixtures.variants import guard_categories

    try:
        v = detect(MetaCheckpoint(Path(meta_dir)), variant_id=variant_id, instruct=instruct)
    except Exception:  # noqa: BLE001 - verify reports bad input elsewhere; here: release unknown
        return None
    return TokenizerRelease(v.family, v.instruct, guard_categories(v.registry_id), v.registry_id or v.label)


# --- the check -----------------------------------------------------------------------------------------

def _infer_version(tokenizer_model: Path, hf) -> str:
    """Which of Meta's Llama 3 special-token tables the HF side claims (the closest by names)."""
    from llama_parity.reference_model.tokenizer import read_tiktoken_ranks

    n = len(read_tiktoken_ranks(tokenizer_model))
    hf_names = hf.convert_ids_to_tokens(list(range(n, n + 256)))
    best = max(LLAMA3_SPECIAL_TOKENS, key=lambda v: sum(a == b for a, b in zip(LLAMA3_SPECIAL_TOKENS[v], hf_names)))
    return best


def _hf(fn):
    """Run one HF call; an exception becomes a value that differs from Meta's (reported, not raised)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - any failure of the judged tokenizer is a mismatch
        return f"error: {type(e).__name__}: {e}"


def _is_reserved_name(name: str) -> bool:
    return name.startswith("<|reserved_special_token_") or name in ("<|step_id|>", "<|image|>")


def _ids(x) -> list[int]:
    if isinstance(x, dict) or hasattr(x, "keys"):
        x = x["input_ids"]
    return list(x)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        return None


@dataclass
class _Ctx:
    """Everything the check steps share: Meta's tokenizer, the loaded HF tokenizer and the raw HF files."""

    tokenizer_model: Path
    hf_dir: Path
    meta: Any
    hf: Any
    sp: bool
    release: TokenizerRelease | None
    tokenizer_json: dict | None
    tokenizer_config: dict | None
    special_map: dict | None


def _context(tokenizer_model: Path, hf_dir: Path, release, version, hf_tokenizer) -> _Ctx:
    from transformers import AutoTokenizer

    from llama_parity.reference_model.tokenizer import LLAMA3_FAMILY_VERSION

    hf = hf_tokenizer if hf_tokenizer is not None else AutoTokenizer.from_pretrained(str(hf_dir))
    kind = detect_tokenizer_kind(tokenizer_model)
    if kind == "tiktoken" and version is None:
        version = LLAMA3_FAMILY_VERSION.get(release.family) if release else None
        version = version or _infer_version(tokenizer_model, hf)
    meta = load_meta_tokenizer(tokenizer_model, version=version or "3.2")
    return _Ctx(tokenizer_model, hf_dir, meta, hf, isinstance(meta, SentencePieceTokenizer), release,
                _read_json(hf_dir / "tokenizer.json"), _read_json(hf_dir / "tokenizer_config.json"),
                _read_json(hf_dir / "special_tokens_map.json"))


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
    checks = vocab_checks(ctx) + special_token_checks(ctx) + encode_checks(ctx, corpus) + decode_checks(ctx)
    checks += special_text_checks(ctx, corpus) + long_run_checks(ctx)
    if chat:
        checks += chat_checks(ctx)
    if ctx.sp and ctx.meta.has_infill:
        checks += infill_checks(ctx)
    report = TokenizerReport(str(tokenizer_model), str(hf_dir), ctx.meta.kind, checks)
    if release is None:
        report.notes.append("release unknown: special tokens, chat template and Llama Guard categories were "
                            "judged against the tokenizer file alone")
    return report


# --- step: the whole vocabulary and the added tokens --------------------------------------------------

def _gpt2_byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte -> printable character table (HF byte-level BPE vocabularies use it).
    A copy kept on purpose: the judge does not import the converter's table."""
    printable = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in table.items()}


def _meta_pieces(meta) -> list[Any]:
    """Meta's content of every id: bytes (tiktoken ranks), sentencepiece piece strings, special names."""
    if isinstance(meta, TiktokenTokenizer):
        out: list[Any] = [None] * meta.n_words
        for tok, rank in meta.mergeable_ranks.items():
            out[rank] = tok
        for name, i in meta.special_tokens.items():
            out[i] = name
        return out
    return [meta.sp_model.id_to_piece(i) for i in range(meta.n_words)]


def _hf_pieces(ctx: _Ctx) -> list[Any]:
    """The HF folder's content of every id, from tokenizer.json (byte-level strings back to bytes)."""
    model = (ctx.tokenizer_json or {}).get("model") or {}
    vocab = model.get("vocab") or {}
    out: list[Any] = [None] * max(ctx.meta.n_words, len(ctx.hf))
    dec = None if ctx.sp else _gpt2_byte_decoder()
    for tok, i in vocab.items():
        if 0 <= i < len(out):
            out[i] = tok if ctx.sp else (bytes(dec[c] for c in tok) if all(c in dec for c in tok) else tok)
    for a in (ctx.tokenizer_json or {}).get("added_tokens") or []:
        if 0 <= a["id"] < len(out) and (ctx.sp or out[a["id"]] is None):
            out[a["id"]] = a["content"]
    return out


ADDED_FLAGS = {"special": True, "normalized": False, "lstrip": False, "rstrip": False, "single_word": False}


def vocab_checks(ctx: _Ctx) -> list[CheckResult]:
    """Vocabulary size, every id's bytes or piece, and each added token's flags (as the official repos)."""
    meta = ctx.meta
    size = _Acc("vocab size", 0)
    size.add("len(tokenizer)", meta.n_words, len(ctx.hf))
    whole = _Acc("whole vocabulary (every id's bytes / piece)", 0,
                 note="tokenizer.json model.vocab and added_tokens against Meta's tokenizer, id by id")
    if ctx.tokenizer_json is None:
        whole.add("tokenizer.json", "present", "missing or unreadable")
    else:
        reserved = {i for name, i in meta.special_tokens.items() if _is_reserved_name(name)}
        for i, (m, h) in enumerate(zip(_meta_pieces(meta), _hf_pieces(ctx))):
            if (m is not None or h is not None) and i not in reserved:  # reserved names: measured below
                whole.add(f"id {i}", m, h)
    flags = _Acc("added tokens: special flags", 0,
                 note="Meta's control/special tokens are special, not normalized, no lstrip/rstrip/single_word")
    expected = dict(meta.special_tokens.items())
    for label, table in _added_tables(ctx):
        by_id = {int(i): a for i, a in table.items()}
        for name, i in expected.items():
            a = by_id.get(i)
            keys = tuple(ADDED_FLAGS) if _is_reserved_name(name) else ("content", *ADDED_FLAGS)
            want = {k: ADDED_FLAGS.get(k, name) for k in keys}
            flags.add(f"{label} id {i} ({name})", want, None if a is None else {k: a.get(k) for k in keys})
        for i in sorted(set(by_id) - set(expected.values())):
            flags.add(f"{label} id {i}", "not an added token in Meta's tokenizer", by_id[i].get("content"))
    return [size.r, whole.r, flags.r] + _special_name_checks(ctx)


def _added_tables(ctx: _Ctx) -> list[tuple[str, dict]]:
    out = []
    if ctx.tokenizer_json is not None:
        out.append(("tokenizer.json added_tokens", {a["id"]: a for a in ctx.tokenizer_json.get("added_tokens") or []}))
    if ctx.tokenizer_config is not None and "added_tokens_decoder" in ctx.tokenizer_config:
        out.append(("tokenizer_config.json added_tokens_decoder", ctx.tokenizer_config["added_tokens_decoder"]))
    return out


def _special_name_checks(ctx: _Ctx) -> list[CheckResult]:
    meta, hf = ctx.meta, ctx.hf
    acc = _Acc("special-token ids and names", 0)
    reserved = _Acc("reserved special-token names", None,
                    note="ids Meta's code names <|reserved_special_token_N|>, <|step_id|> or <|image|>; other "
                         "tools (Meta's official HF repos) name some differently; no text encodes to them")
    for name, i in meta.special_tokens.items():
        target = reserved if _is_reserved_name(name) else acc
        target.add(name, [i, name], [hf.convert_tokens_to_ids(name), hf.convert_ids_to_tokens(i)])
    acc.add("bos_token_id", meta.bos_id, hf.bos_token_id)
    return [acc.r, reserved.r]


# --- step: bos/eos/pad/unk in the config files, BOS from the post-processor -----------------------------

def _token_text(v: Any) -> Any:
    return v.get("content") if isinstance(v, dict) else v


def expected_special_tokens(ctx: _Ctx) -> dict[str, Any]:
    """bos/eos/unk/pad names the release implies (as Meta's official HF configs): eos is <|eot_id|> for
    Llama 3.x instruct and Llama Guard 3, <|end_of_text|> for base models; no pad token."""
    meta = ctx.meta
    if ctx.sp:
        sp = meta.sp_model
        return {"bos_token": sp.id_to_piece(meta.bos_id), "eos_token": sp.id_to_piece(meta.eos_id),
                "unk_token": sp.id_to_piece(meta.unk_id), "pad_token": None}
    rel = ctx.release
    if rel is None:  # either is a Meta eos for some release of this file
        eos: Any = {"<|eot_id|>", "<|end_of_text|>"}
    else:
        eos = "<|eot_id|>" if (rel.instruct or rel.family == "llama-guard-3") else "<|end_of_text|>"
    return {"bos_token": "<|begin_of_text|>", "eos_token": eos, "unk_token": None, "pad_token": None}


def special_token_checks(ctx: _Ctx) -> list[CheckResult]:
    """tokenizer_config.json and special_tokens_map.json bos/eos/unk/pad, and the post-processor's BOS."""
    acc = _Acc("special tokens in tokenizer_config.json / special_tokens_map.json", 0,
               note="bos/eos/unk/pad against the release (eos <|eot_id|> for instruct/Guard, no pad)")
    for fname, data in (("tokenizer_config.json", ctx.tokenizer_config), ("special_tokens_map.json", ctx.special_map)):
        if data is None:
            continue
        for key, want in expected_special_tokens(ctx).items():
            got = _token_text(data.get(key))
            ok = got in want if isinstance(want, set) else got == want
            acc.add(f"{fname} {key}", got if ok else sorted(want) if isinstance(want, set) else want, got)
    post = _Acc("BOS from tokenizer.json post_processor (exactly once)", 0,
                note="transformers 5 ignores add_bos_token when tokenizer.json exists: the post-processor adds BOS")
    if ctx.tokenizer_json is not None:
        bos = [ctx.meta.bos_id, expected_special_tokens(ctx)["bos_token"]]
        post.add("tokenizer.json post_processor (single sequence)", [bos, "$A"],
                 single_template(ctx.tokenizer_json.get("post_processor")))
    return [acc.r, post.r]


def single_template(pp: Any) -> Any:
    """What a tokenizer.json post-processor adds around one sequence: [[id, token], ..., "$A", ...]."""
    if pp is None:
        return ["$A"]
    if pp.get("type") == "Sequence":
        parts = [single_template(p) for p in pp.get("processors") or []]
        steps = [p for p in parts if p != ["$A"]]
        return steps[0] if len(steps) == 1 else ["$A"] if not steps else f"several templating steps: {steps}"
    if pp.get("type") == "ByteLevel":
        return ["$A"]
    if pp.get("type") != "TemplateProcessing":
        return f"unsupported post_processor {pp.get('type')}"
    out: list[Any] = []
    for piece in pp.get("single") or []:
        if "Sequence" in piece:
            out.append("$" + piece["Sequence"].get("id", "A"))
        else:
            name = piece["SpecialToken"]["id"]
            for i in (pp.get("special_tokens") or {}).get(name, {}).get("ids") or [None]:
                out.append([i, name])
    return out


# --- steps: encode, decode, special-token text, long runs ----------------------------------------------

def _texts(ctx: _Ctx, corpus) -> tuple[list[str], list[str]]:
    specials = list(ctx.meta.special_tokens)
    texts = list(CURATED_CORPUS) + list(corpus or [])
    special_texts = [t for t in texts if any(s in t for s in specials)] + list(special_text_corpus(specials))
    return [t for t in texts if not any(s in t for s in specials)], special_texts


def encode_checks(ctx: _Ctx, corpus) -> list[CheckResult]:
    meta, hf, sp = ctx.meta, ctx.hf, ctx.sp
    enc_bos = _Acc("encode with bos", 0)
    enc_nobos = _Acc("encode without bos", 0)
    dec = _Acc("decode", 0, note="HF decode(skip_special_tokens=True) for sentencepiece (Meta drops control "
                                 "tokens); skip_special_tokens=False for tiktoken (Meta prints them)")
    for t in _texts(ctx, corpus)[0]:
        m_bos = meta.encode(t, bos=True, eos=False)
        enc_bos.add(t, m_bos, _hf(lambda: _ids(hf(t, add_special_tokens=True))))
        m = meta.encode(t, bos=False, eos=False)
        enc_nobos.add(t, m, _hf(lambda: _ids(hf(t, add_special_tokens=False))))
        dec.add(t, meta.decode(m_bos), _hf(lambda: hf.decode(m_bos, skip_special_tokens=sp)))
    return [enc_bos.r, enc_nobos.r, dec.r]


def decode_checks(ctx: _Ctx) -> list[CheckResult]:
    meta, hf, sp = ctx.meta, ctx.hf, ctx.sp
    rnd = _Acc("decode of random ids", 0)
    bad_utf8 = _Acc("decode of random ids with invalid UTF-8 byte pieces", None,
                    note="sentencepiece replaces each invalid byte with U+FFFD; HF's ByteFallback decoder "
                         "replaces the whole run of byte pieces")
    for ids in random_id_sequences(meta, 400):
        target = bad_utf8 if has_invalid_byte_run(meta, ids) else rnd
        target.add(str(ids), meta.decode(ids), _hf(lambda: hf.decode(ids, skip_special_tokens=sp)))
    return [rnd.r, bad_utf8.r]


def special_text_checks(ctx: _Ctx, corpus) -> list[CheckResult]:
    meta, hf = ctx.meta, ctx.hf
    strict = _Acc("special-token text, strict (split_special_tokens=True)", 0,
                  note="Meta encodes special-token text typed by a user as plain text")
    default = _Acc("special-token text, HF default parsing", None,
                   note="HF parses it as the control token (chat templates rely on this); reported, not hidden")
    for t in _texts(ctx, corpus)[1]:
        m = meta.encode(t, bos=True, eos=False)
        strict.add(t, m, _hf(lambda: _ids(hf(t, add_special_tokens=True, split_special_tokens=True))))
        default.add(t, m, _hf(lambda: _ids(hf(t, add_special_tokens=True))))
    return [strict.r, default.r]


def long_run_checks(ctx: _Ctx) -> list[CheckResult]:
    runs = _Acc("runs longer than 25,000 chars", None,
                note="Meta cuts them before encoding; tokenizer.json cannot express the cut")
    for t in long_run_corpus():
        runs.add(t, ctx.meta.encode(t, bos=True, eos=False), _hf(lambda: _ids(ctx.hf(t, add_special_tokens=True))))
    return [runs.r]


# --- step: chat template (official template of the release; Meta's ChatFormat as judge) -----------------

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city (°C)",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
WEATHER_CALL = {"role": "assistant", "tool_calls": [{"type": "function", "function": {
    "name": "get_weather", "arguments": {"city": "Zürich", "unit": "celsius"}}}]}
SEARCH_CALL = {"role": "assistant", "tool_calls": [{"type": "function", "function": {
    "name": "brave_search", "arguments": {"query": "gold price"}}}]}
GUARD_DIALOGS: tuple[tuple[dict[str, Any], ...], ...] = (
    ({"role": "user", "content": "How do I bake bread?"},),
    ({"role": "user", "content": "hi"}, {"role": "assistant", "content": " I can't help with that. "}),
    ({"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c\n"}),
)
DATE = {"date_string": "26 Jul 2024"}


def official_render_cases(family: str) -> list[tuple[tuple[dict[str, Any], ...], dict[str, Any]]]:
    """(dialog, apply_chat_template kwargs) rendered to compare a folder's template with the official one:
    system prompts, multi-turn, and the tool features each release's official template supports."""
    if family == "llama-guard-3":
        return [(d, {}) for d in GUARD_DIALOGS] + [(GUARD_DIALOGS[1], {"excluded_category_keys": ["S2", "S13"]})]
    cases = [(d, dict(DATE)) for d in CHAT_DIALOGS] + [(CHAT_DIALOGS[2], {})]
    if family in ("llama2", "codellama"):
        cases.append((({"role": "user", "content": "a"}, {"role": "user", "content": "b"}), {}))  # must raise
    if family in ("llama3.1", "llama3.2", "llama3.3"):
        user = {"role": "user", "content": "Weather in Zürich?"}
        result = {"role": "tool", "content": "{\"temp\": 21}"}
        cases += [((user,), {"tools": [WEATHER_TOOL], **DATE}),
                  ((CHAT_DIALOGS[2][0], user), {"tools": [WEATHER_TOOL], "tools_in_user_message": False, **DATE}),
                  ((user, WEATHER_CALL, result), {"tools": [WEATHER_TOOL], **DATE})]
    if family in ("llama3.1", "llama3.3"):
        cases.append((({"role": "user", "content": "gold?"}, SEARCH_CALL, {"role": "ipython", "content": "2400"}),
                      {"builtin_tools": ["brave_search", "code_interpreter"], **DATE}))
    return cases


def _render(fn) -> Any:
    try:
        return fn()
    except Exception:  # noqa: BLE001 - a dialog the template refuses: both sides must refuse it
        return "raises"


def official_template_checks(ctx: _Ctx) -> list[CheckResult]:
    from llama_parity.converter.tokenizer_files import chat_template_for, render_chat_template

    rel = ctx.release
    want = chat_template_for(rel.family, rel.instruct, guard_categories=rel.guard_categories)
    if want is None:
        return []
    acc = _Acc(f"chat template == official template ({rel.label})", 0,
               note="tokenizer_config.json chat_template rendered on fixed dialogs (system, multi-turn, tools) "
                    "against the official template of the release")
    have = getattr(ctx.hf, "chat_template", None)
    if not have:
        acc.add("tokenizer_config.json chat_template", "the official template", None)
        return [acc.r]
    names = expected_special_tokens(ctx)
    eos = names["eos_token"] if isinstance(names["eos_token"], str) else "<|eot_id|>"
    for dialog, kw in official_render_cases(rel.family):
        for gp in (True, False):
            d = [dict(m) for m in dialog]
            m = _render(lambda: render_chat_template(want, d, bos_token=names["bos_token"], eos_token=eos,
                                                     add_generation_prompt=gp, **kw))
            h = _render(lambda: ctx.hf.apply_chat_template(d, tokenize=False, add_generation_prompt=gp, **kw))
            acc.add(f"tokenizer_config.json chat_template on {_short(d)} {kw or ''}", m, h)
    return [acc.r]


def meta_format_checks(ctx: _Ctx) -> list[CheckResult]:
    """The folder's template against Meta's own format: exact for Llama 2 / Code Llama (the official
    template equals Meta's chat_completion) and Llama Guard 3 (category count from the release);
    measured for Llama 3.x, whose official templates add a system header and trim contents."""
    meta, hf, rel = ctx.meta, ctx.hf, ctx.release
    guard = rel.guard_categories if rel is not None and rel.family == "llama-guard-3" else None
    exact = ctx.sp or guard is not None
    if exact:
        acc = _Acc("chat template == Meta chat format" + (f" (Llama Guard 3, {guard} categories)" if guard else ""), 0)
    else:
        acc = _Acc("chat template vs Meta ChatFormat", None,
                   note="official Llama 3.x templates trim contents and (3.1+) add the 'Cutting Knowledge Date / "
                        "Today Date' system header; Meta's ChatFormat does neither (docs/tokenizers.md)")
    dialogs = list(GUARD_DIALOGS) if guard else list(CHAT_DIALOGS) + ([] if ctx.sp else list(BOUNDARY_DIALOGS))
    for d in dialogs:
        for gp in ((False,) if ctx.sp or guard else (True, False)):
            try:
                m = (llama_guard3_dialog_tokens(meta, list(d), n_categories=guard) if guard
                     else dialog_tokens(meta, list(d), add_generation_prompt=gp))
            except ValueError:
                continue
            acc.add(_short(list(d)), m,
                    _hf(lambda: _ids(hf.apply_chat_template(list(d), tokenize=True, add_generation_prompt=gp))))
    return [acc.r]


def chat_checks(ctx: _Ctx) -> list[CheckResult]:
    out = official_template_checks(ctx) if ctx.release is not None else []
    if getattr(ctx.hf, "chat_template", None):
        out += meta_format_checks(ctx)
    return out


# --- step: Code Llama infilling -------------------------------------------------------------------------

INFILL_CASES = (("def add(a, b):\n    ", "\n    return c\n"), ("", "x = 1"), ("import os\n", ""),
                (" leading space", "  two spaces"), ("print(", ")\n"), ("# ☺ smile", "☺"))


def infill_checks(ctx: _Ctx) -> list[CheckResult]:
    """Code Llama's infilling prompt built with the HF tokenizer == Meta's infilling_prompt_tokens."""
    from llama_parity.converter.tokenizer_files import infilling_ids
    from llama_parity.reference_model.tokenizer import infilling_prompt_tokens

    acc = _Acc("Code Llama infilling prompt == Meta's", 0,
               note="<s> ▁<PRE> prefix ▁<SUF> suffix ▁<MID> (and suffix first), as Meta's codellama builds it")
    for pre, suf in INFILL_CASES:
        for sf in (False, True):
            acc.add(f"prefix={pre!r} suffix={suf!r} suffix_first={sf}",
                    infilling_prompt_tokens(ctx.meta, pre, suf, suffix_first=sf),
                    _hf(lambda: infilling_ids(ctx.hf, pre, suf, suffix_first=sf)))
    return [acc.r]


# --- measuring transformers' default loading against ours (docs/tokenizers.md) -------------------------

def default_loaders(tokenizer_model: Path, workdir: Path, anchor_script: Path | None = None) -> dict[str, Any]:
    """transformers' default ways to get an HF tokenizer from a bare Meta tokenizer.model.

    - `AutoTokenizer.from_pretrained(dir holding only tokenizer.model)` (automatic conversion);
    - sentencepiece: `LlamaTokenizer.from_pretrained(dir)` and `LlamaTokenizer(vocab_file=...)`;
    - tiktoken: `PreTrainedTokenizerFast.from_pretrained(dir)` (automatic tiktoken conversion);
    - both: the output of transformers' conversion script (base model, offline), reloaded with AutoTokenizer,
      when `anchor_script` (a runnable copy of convert_llama_weights_to_hf.py) is given.
    """
    import importlib.util

    from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerFast

    workdir = Path(workdir)
    out: dict[str, Any] = {}
    kind = detect_tokenizer_kind(tokenizer_model)
    bare = workdir / "bare"
    bare.mkdir(parents=True, exist_ok=True)
    (bare / "tokenizer.model").write_bytes(Path(tokenizer_model).read_bytes())
    out["AutoTokenizer.from_pretrained(dir with tokenizer.model)"] = AutoTokenizer.from_pretrained(str(bare))
    if kind == "sentencepiece":
        out["LlamaTokenizer.from_pretrained(dir)"] = LlamaTokenizer.from_pretrained(str(bare))
        out["LlamaTokenizer(vocab_file=...)"] = LlamaTokenizer(vocab_file=str(tokenizer_model))
    else:
        out["PreTrainedTokenizerFast.from_pretrained(dir)"] = PreTrainedTokenizerFast.from_pretrained(str(bare))
    if anchor_script is not None and Path(anchor_script).is_file():
        spec = importlib.util.spec_from_file_location("anchor_convert_llama", str(anchor_script))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        d = workdir / "anchor"
        try:
            if kind == "sentencepiece":
                mod.write_tokenizer(str(d), str(tokenizer_model), llama_version="2")
            else:
                names = list(LLAMA3_SPECIAL_TOKENS["3.1"])
                mod.write_tokenizer(str(d), str(tokenizer_model), llama_version="3.1", special_tokens=names)
            out["conversion script output (AutoTokenizer)"] = AutoTokenizer.from_pretrained(str(d))
        except Exception as e:  # recorded as a measured fact, not hidden
            cause = e.__cause__ or e.__context__ or e
            out["conversion script output (AutoTokenizer)"] = f"failed: {type(cause).__name__}: {cause}"
    return out


def measure_encode(meta, hf, texts: list[str]) -> dict[str, int]:
    sp = isinstance(meta, SentencePieceTokenizer)
    out = {"strings": len(texts), "encode_bos": 0, "encode_nobos": 0, "decode": 0}
    for t in texts:
        m = meta.encode(t, bos=True, eos=False)
        if m != _ids(hf(t, add_special_tokens=True)):
            out["encode_bos"] += 1
        if meta.encode(t, bos=False, eos=False) != _ids(hf(t, add_special_tokens=False)):
            out["encode_nobos"] += 1
        if meta.decode(m) != hf.decode(m, skip_special_tokens=sp):
            out["decode"] += 1
    return out


def measure_default_vs_ours(n_fuzz: int = 2000, anchor_script: Path | None = None) -> dict[str, Any]:
    """Mismatch counts of transformers' default loading vs ours, same fuzzed and curated strings."""
    from llama_parity.converter.tokenizer_files import write_hf_tokenizer
    from llama_parity.fixtures.tokenizers import real_llama2_tokenizer, real_llama3_tokenizer
    from transformers import AutoTokenizer

    specials = ("<s>", "</s>", "<unk>", "<|")  # special-token text is its own class (see check_tokenizer)
    fuzz = [t for t in fuzz_corpus(n_fuzz, seed=0) if not any(x in t for x in specials)]
    curated = [t for t in CURATED_CORPUS if not any(x in t for x in specials)]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, path, family in (("llama2", real_llama2_tokenizer(), "llama2"),
                                    ("llama3", real_llama3_tokenizer(), "llama3.1")):
            if path is None:
                continue
            meta = load_meta_tokenizer(path, version="3.1")
            ours_dir = Path(tmp) / f"ours_{label}"
            write_hf_tokenizer(path, ours_dir, family=family, instruct=False)
            loaders = default_loaders(path, Path(tmp) / label, anchor_script)
            loaders["ours (llama-parity)"] = AutoTokenizer.from_pretrained(str(ours_dir))
            results[label] = {
                name: (tok if isinstance(tok, str) else
                       {"curated": measure_encode(meta, tok, curated), "fuzzed": measure_encode(meta, tok, fuzz)})
                for name, tok in loaders.items()
            }
    return results


SWEEP_TEMPLATES = ("a{c}b", "{c}{c} x", " {c}1", "x\n{c} ", "{c}")


def codepoint_sweep(tokenizer_model: Path, hf_dir: Path, *, templates=SWEEP_TEMPLATES, batch: int = 20000,
                    version: str = "3.1") -> dict[str, list[str]]:
    """Every Unicode scalar value in each template, Meta vs HF (no bos): the mismatching strings per template.

    Minutes, not seconds (about 5.5 million strings): a one-off measurement, not part of the test suite.
    """
    from transformers import AutoTokenizer

    meta = load_meta_tokenizer(tokenizer_model, version=version)
    tk = AutoTokenizer.from_pretrained(str(hf_dir)).backend_tokenizer
    cps = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    bad: dict[str, list[str]] = {}
    for tmpl in templates:
        strs = [tmpl.format(c=chr(c)) for c in cps]
        for i in range(0, len(strs), batch):
            chunk = strs[i : i + batch]
            hs = [e.ids for e in tk.encode_batch(chunk, add_special_tokens=False)]
            if isinstance(meta, TiktokenTokenizer):
                ms = meta.model.encode_ordinary_batch(chunk)
            else:
                ms = meta.sp_model.encode(chunk)
            bad.setdefault(tmpl, []).extend(s for s, m, h in zip(chunk, ms, hs) if m != h)
    return bad


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--sweep"]:
        from llama_parity.converter.tokenizer_files import write_hf_tokenizer
        from llama_parity.fixtures.tokenizers import real_llama2_tokenizer, real_llama3_tokenizer

        with tempfile.TemporaryDirectory() as tmp:
            for label, path, family in (("llama2", real_llama2_tokenizer(), "llama2"),
                                        ("llama3", real_llama3_tokenizer(), "llama3.1")):
                if path is None:
                    continue
                write_hf_tokenizer(path, Path(tmp) / label, family=family, instruct=False)
                res = codepoint_sweep(path, Path(tmp) / label)
                print(label, {k: len(v) for k, v in res.items()},
                      {k: [hex(ord(c)) for s in v[:10] for c in s if ord(c) > 127] for k, v in res.items() if v})
    else:
        anchor = Path(sys.argv[1]) if len(sys.argv) > 1 else None
        print(json.dumps(measure_default_vs_ours(anchor_script=anchor), indent=2))
