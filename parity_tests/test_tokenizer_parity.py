"""HF tokenizer (as converted by us, loaded with AutoTokenizer) == Meta's tokenizer, on every variant.

Tiny tokenizers are trained on the fly (sentencepiece with Llama's settings; a small tiktoken rank file)
and written for every family; the real Llama 2 tokenizer.model (fixtures/data) and the real Llama 3 one
(shipped by llama-models) are converted too. Built once per session.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama_parity.fixtures.tokenizers import TINY_CASE_SPECS, hf_tokenizer, meta_tokenizer
from llama_parity.tokenizer_check import CURATED_CORPUS, check_tokenizer, first_diff
from llama_parity.converter.tokenizer_files import infilling_ids
from llama_parity.reference_model.tokenizer import SentencePieceTokenizer, infilling_prompt_tokens

ALL_CASES = [name for name, *_ in TINY_CASE_SPECS] + [
    "real-llama2-chat",
    "real-llama3.1-instruct",
]
# One case per distinct tokenizer.json pipeline (model, normaliser, pre-tokenizer, decoder) for the fuzzed
# tests: the 3.2 / 3.3 / Guard / base tiny cases share 3.1's file and pipeline and differ only in special-token
# names, eos and template, which the whole-vocabulary, added-token and config checks compare id by id;
# tiny Llama 1 shares Llama 2's file.
PIPELINE_CASES = ["tiny-llama2-chat", "tiny-codellama-instruct", "tiny-llama3-instruct", "tiny-llama3.1-instruct",
                  "real-llama2-chat", "real-llama3.1-instruct"]
HYPO = settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="session")
def tok_report(tok_cases):
    """One whole-tokenizer report per case for the session: the report is a pure function of the files,
    and proving the real 128k vocabulary and its merges costs seconds each time."""
    done = {}

    def get(name):
        if name not in done:
            case = _case(tok_cases, name)
            done[name] = check_tokenizer(case.model_path, case.hf_dir, hf_tokenizer=hf_tokenizer(case),
                                         release=case.release)
        return done[name]
    return get


def _case(tok_cases, name):
    if name not in tok_cases:
        assert name.startswith("real-llama3"), name
        pytest.skip("llama-models is not importable, so the real Llama 3 tokenizer.model is unavailable")
    return tok_cases[name]


# --- text strategy: unicode of known trouble -----------------------------------------------------------

_PIECES = st.sampled_from([
    " ", "  ", "   ", "\n", "\n\n", "\n\n\n", "\t", "\t\t", "\r\n", "\r", "\u00a0", "\u3000", "\u2028", "\u200b",
    "日本語", "中文", "한국어", "こんにちは", "🙂", "🚀", "👍🏽", "👨‍👩‍👧", "🇫🇷",
    "e\u0301", "\u0301", "\u0300\u0302", "שלום", "مرحبا", "\u202e", "Привет", "Ελλάδα",
    "0", "7", "42", "123", "4567", "99999999", "3.14", "1,000",
    "don't", "'s", "'LL", "I'm", "▁", "<", ">", "[INST]", "<<SYS>>",
    "supercalifragilistic", "x" * 40, "Hello", "world", "the", "a", "Llama",
    ".", ",", "!", "?", "-", "_", "=", "*", "#", "{", "}", "(", ")", "/", "\\", "\"", "'",
])
_CHARS = st.characters(blacklist_categories=("Cs",))
_WS = st.text(st.sampled_from(" \n\t\r\u00a0\u3000\u2028\u0085\u000b\u000c"), min_size=1, max_size=30)
TEXT = st.one_of(
    st.lists(_PIECES, max_size=12).map("".join),
    st.text(_CHARS, max_size=40),
    st.lists(st.one_of(_PIECES, st.text(_CHARS, max_size=4), _WS), max_size=10).map("".join),
    st.lists(st.one_of(_PIECES, _WS), min_size=20, max_size=80).map("".join),  # longer texts
)


def _no_special(meta, s: str) -> bool:
    return not any(name in s for name in meta.special_tokens)


def _assert_same(s, meta_ids, hf_ids):
    assert meta_ids == hf_ids, f"{s!r}: meta={meta_ids} hf={hf_ids} first diff at {first_diff(meta_ids, hf_ids)}"


# --- tests ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL_CASES)
def test_curated_corpus_report_ok(tok_cases, tok_report, name):
    """Bug class: any converted tokenizer that differs from Meta's on known trouble (leading/trailing/double
    spaces, "\\n\\n", empty string, digits, CJK, emoji, byte fallback), on special ids, vocab size, decode,
    strict special-token text, or the chat template; false failures of the release-aware checks (whole
    vocabulary, added-token flags, config special tokens, post-processor BOS, official template, Guard
    categories, infilling) on a right folder. The report lists string, both id lists, first diff."""
    case = _case(tok_cases, name)
    report = tok_report(name)
    assert report.ok, "\n".join(report.mismatch_lines())
    exact = {c.name: c for c in report.checks}
    assert exact["encode with bos"].total >= len(CURATED_CORPUS) - 10
    assert exact["whole vocabulary (every id's bytes / piece)"].total >= 300 and "added tokens: special flags" in exact
    official = any(n.startswith("chat template == official template") for n in exact)
    # Code Llama Instruct is no registry release: no official template to judge against (Meta's format is)
    assert official == ((case.instruct and case.family != "codellama") or case.family == "llama-guard-3")
    assert exact["every merge at its priority (tokenizer.json merges)"].total > 0
    assert "tokenizer_config.json / special_tokens_map.json fields" in exact
    assert ("Code Llama infilling prompt == Meta's" in exact) == (case.family == "codellama")


def _pipelines(tok_cases, names):
    """(name, Meta tokenizer, HF tokenizer, is sentencepiece) for each named case built here (the real Llama 3
    one needs llama-models: its absence is reported by the tests parametrized with it)."""
    out = []
    for name in names:
        if name in tok_cases:
            meta = meta_tokenizer(tok_cases[name])
            out.append((name, meta, hf_tokenizer(tok_cases[name]), isinstance(meta, SentencePieceTokenizer)))
    return out


def test_encode_decode_fuzz(tok_cases):
    """Bug class: merge order (by id instead of score), missing/misplaced dummy prefix (Metaspace skips it
    when text starts with a space), byte fallback, ignore_merges, split pattern, cleanup of decode spaces:
    HF encode (with and without bos) and decode must equal Meta's on generated unicode text, on every
    distinct pipeline (PIPELINE_CASES). Each generated text goes through all of them: drawing the
    examples, not tokenizing them, was 90% of this test's time when each pipeline drew its own."""
    pipes = _pipelines(tok_cases, PIPELINE_CASES)

    @HYPO
    @given(TEXT)
    def run(s):
        for name, meta, hf, sp in pipes:
            if not _no_special(meta, s):
                continue
            m = meta.encode(s, bos=True, eos=False)
            _assert_same((name, s), m, hf(s, add_special_tokens=True)["input_ids"])
            _assert_same((name, s), meta.encode(s, bos=False, eos=False), hf(s, add_special_tokens=False)["input_ids"])
            assert hf.decode(m, skip_special_tokens=sp) == meta.decode(m), (name, s)

    run()


@pytest.mark.parametrize("name", ["tiny-llama2-chat", "tiny-llama3.1-instruct", "real-llama2-chat",
                                  "real-llama3.1-instruct"])
def test_whitespace_runs_and_newlines(tok_cases, name):
    """Bug class: tie order of the -1e9 whitespace merges (sentencepiece merges ties leftmost) and
    whitespace/newline pre-tokenization: every run of 0..70 spaces/newlines/tabs in several contexts."""
    case = _case(tok_cases, name)
    meta, hf = meta_tokenizer(case), hf_tokenizer(case)
    for n in range(71):
        for ch in (" ", "\n", "\t"):
            for ctx in ("{}", "a{}", "{}a", "a{}b", "\n{}x"):
                s = ctx.format(ch * n)
                _assert_same(s, meta.encode(s, bos=True, eos=False), hf(s)["input_ids"])


@pytest.mark.parametrize("name", ["tiny-llama2-chat", "tiny-codellama-instruct", "tiny-llama3.1-instruct",
                                  "real-llama2-chat", "real-llama3.1-instruct"])
def test_special_token_text_strict_and_default(tok_cases, tok_report, name):
    """Bug class: special-token text typed by a user ("<|eot_id|>", "<s>"). Strict mode
    (split_special_tokens=True) must give Meta's plain-text ids; the default HF parsing gives the control
    token, a documented difference that must stay visible (counted separately in the report)."""
    case = _case(tok_cases, name)
    meta, hf = meta_tokenizer(case), hf_tokenizer(case)
    for special, i in list(meta.special_tokens.items())[:12]:
        s = f"hi {special} there"
        m = meta.encode(s, bos=True, eos=False)
        assert i not in m[1:]
        _assert_same(s, m, hf(s, split_special_tokens=True)["input_ids"])
        assert i in hf(s)["input_ids"][1:], "HF default parsing should read special text as the control token"
        # Meta's allowed_special mode matches HF's default parsing
        if not isinstance(meta, SentencePieceTokenizer) or special in ("<s>", "</s>"):
            assert meta.encode(s, bos=True, eos=False, allowed_special="all") == hf(s)["input_ids"]
    by = {c.name: c for c in tok_report(name).checks}
    assert by["special-token text, HF default parsing"].mismatches > 0
    assert by["special-token text, HF default parsing"].bound is None
    assert by["special-token text, strict (split_special_tokens=True)"].mismatches == 0


@pytest.mark.parametrize("name", ["tiny-llama3.1-instruct", "real-llama3.1-instruct"])
def test_long_runs_measured_not_hidden(tok_cases, tok_report, name):
    """Bug class: Meta cuts runs longer than 25,000 chars before encoding, which tokenizer.json cannot
    express; text below the cut must match exactly, and the report must count the >25k class separately."""
    case = _case(tok_cases, name)
    meta, hf = meta_tokenizer(case), hf_tokenizer(case)
    for s in ("a" * 25_000, " " * 24_999 + "x", ("word " * 5000)):
        _assert_same(s[:40], meta.encode(s, bos=True, eos=False), hf(s)["input_ids"])
    runs = next(c for c in tok_report(name).checks if c.name.startswith("runs longer"))
    assert runs.total == 3 and runs.bound is None


def test_real_llama2_known_strings(tok_cases):
    """Bug class: the dummy-prefix trap measured in issue 4 (" Hello" must be [1, 29871, 15043], " " must
    be [1, 259]) and Llama 2's real ids (bos 1, eos 2, vocab 32000)."""
    case = tok_cases["real-llama2-chat"]
    hf = hf_tokenizer(case)
    assert hf(" Hello")["input_ids"] == [1, 29871, 15043]
    assert hf(" ")["input_ids"] == [1, 259]
    assert hf("")["input_ids"] == [1]
    assert len(hf) == 32000 and hf.bos_token_id == 1 and hf.eos_token_id == 2 and hf.unk_token_id == 0


def test_real_llama3_known_strings(tok_cases):
    """Bug class: Llama 3 loaded without a BOS (transformers' automatic tiktoken conversion adds none) or
    with wrong special ids."""
    case = _case(tok_cases, "real-llama3.1-instruct")
    hf = hf_tokenizer(case)
    assert hf("Hello world")["input_ids"] == [128000, 9906, 1917]
    assert hf.convert_tokens_to_ids(["<|begin_of_text|>", "<|end_of_text|>", "<|eom_id|>", "<|eot_id|>",
                                     "<|python_tag|>", "<|start_header_id|>"]) == [
        128000, 128001, 128008, 128009, 128010, 128006]
    assert len(hf) == 128256


DECODE_CASES = ["tiny-llama2-chat", "tiny-codellama-instruct", "tiny-llama3.1-instruct", "real-llama2-chat",
                "real-llama3.1-instruct"]


def test_decode_random_ids(tok_cases, tok_report):
    """Bug class: decoder chain wrong for ids a model can sample but encoding never yields (byte pieces,
    leading "▁", odd merges): HF decode == Meta decode on random non-special id sequences, except runs of
    sentencepiece byte pieces that are not valid UTF-8 (sentencepiece replaces each bad byte, HF's
    ByteFallback the whole run), a class the report counts separately. One drawn sequence of positions
    in [0, 1) is scaled to each case's id range (specials dropped), so the draw is paid once for all."""
    from llama_parity.tokenizer_check import has_invalid_byte_run

    pipes = [(name, meta, hf, sp, set(meta.special_tokens.values()), meta.n_words - (0 if sp else 256))
             for name, meta, hf, sp in _pipelines(tok_cases, DECODE_CASES)]

    @HYPO
    @given(st.lists(st.floats(0, 1, exclude_max=True), min_size=1, max_size=10))
    def run(where):
        for name, meta, hf, sp, specials, top in pipes:
            ids = [i for i in (min(int(w * top), top - 1) for w in where) if i not in specials]
            if ids and not has_invalid_byte_run(meta, ids):
                assert hf.decode(ids, skip_special_tokens=sp) == meta.decode(ids), (name, ids)

    run()
    for name, _, _, sp, _, _ in pipes:
        by = {c.name: c for c in tok_report(name).checks}
        assert by["decode of random ids"].ok, name
        if sp:
            assert by["decode of random ids with invalid UTF-8 byte pieces"].mismatches > 0, name


def test_codellama_infilling_equals_meta(tok_cases):
    """Bug class: Code Llama infilling prompts built with the converted tokenizer unlike Meta's codellama
    `infilling_prompt_tokens`: a dummy-prefix space before the suffix, the ▁<PRE>/▁<SUF>/▁<MID> pieces at
    other ids or encoded as text, BOS missing or doubled, the suffix-first order wrong. Generated prefixes and
    suffixes, both orders, on the tiny Code Llama tokenizer (infill pieces in Code Llama's order)."""
    case = tok_cases["tiny-codellama-instruct"]
    meta, hf = meta_tokenizer(case), hf_tokenizer(case)

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
    @given(TEXT, TEXT, st.booleans())
    def run(prefix, suffix, suffix_first):
        if _no_special(meta, prefix + suffix):
            m = infilling_prompt_tokens(meta, prefix, suffix, suffix_first=suffix_first)
            _assert_same((prefix, suffix), m, infilling_ids(hf, prefix, suffix, suffix_first=suffix_first))

    run()
    pre, suf = meta.encode("def f(x):", bos=False, eos=False), meta.encode_infilling("\n    return x")
    assert infilling_prompt_tokens(meta, "def f(x):", "\n    return x") == \
        [meta.bos_id, meta.prefix_id] + pre + [meta.suffix_id] + suf + [meta.middle_id]
    assert infilling_prompt_tokens(meta, "def f(x):", "\n    return x", suffix_first=True) == \
        [meta.bos_id, meta.prefix_id, meta.suffix_id] + suf + [meta.middle_id] + pre
    assert meta.id_to_piece(pre[0]).startswith("▁") and not meta.id_to_piece(suf[0]).startswith("▁")
    llama2 = tok_cases["tiny-llama2-chat"]
    with pytest.raises(ValueError):
        infilling_ids(hf_tokenizer(llama2), "a", "b")
    with pytest.raises(ValueError):
        infilling_prompt_tokens(meta_tokenizer(llama2), "a", "b")
