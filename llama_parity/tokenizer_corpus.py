"""What the tokenizer check feeds both tokenizers: strings of known trouble, dialogs, random ids.

Fixed and deterministic, so a report is reproducible; `fuzz_corpus` draws from the same classes for the
measured numbers (benchmarks/tokenizer_bench.py).
"""

from __future__ import annotations

import random
from typing import Any

from llama_parity.reference_model.tokenizer import MAX_NO_WHITESPACES_CHARS, SentencePieceTokenizer, TiktokenTokenizer

# --- strings of known trouble ------------------------------------------------------------------

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


# --- random ids ----------------------------------------------------------------------------------------

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


# --- dialogs and infilling pairs ----------------------------------------------------------------------

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


INFILL_CASES = (("def add(a, b):\n    ", "\n    return c\n"), ("", "x = 1"), ("import os\n", ""),
                (" leading space", "  two spaces"), ("print(", ")\n"), ("# ☺ smile", "☺"))
