"""reference_model.tokenizer (our port of Meta's tokenizers) and the tiny tokenizer generators."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama_parity.fixtures.tokenizers import (
    CODELLAMA_INFILL_PIECES,
    make_tiny_sentencepiece,
    make_tiny_tiktoken,
    meta_tokenizer,
    real_llama2_tokenizer,
    real_llama3_tokenizer,
)
from llama_parity.reference_model.tokenizer import (
    SentencePieceTokenizer,
    TiktokenTokenizer,
    load_meta_tokenizer,
    meta_text_chunks,
    split_long_runs,
)

HYPO = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))


def test_tiny_generators_deterministic_fast_llama_settings(tmp_path):
    """Bug class: tiny tokenizers that differ between runs (flaky suites) or lack Llama's traits
    (byte fallback, split digits, dummy prefix, unk/bos/eos = 0/1/2, 16 whitespace pieces scored -1e9)."""
    a = make_tiny_sentencepiece(tmp_path / "a.model")
    b = make_tiny_sentencepiece(tmp_path / "b.model")
    c = make_tiny_sentencepiece(tmp_path / "c.model", codellama=True)
    ta = make_tiny_tiktoken(tmp_path / "a.tiktoken")
    tb = make_tiny_tiktoken(tmp_path / "b.tiktoken")
    assert a.read_bytes() == b.read_bytes() and ta.read_bytes() == tb.read_bytes()

    sp = SentencePieceTokenizer(a).sp_model
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert sum(sp.is_byte(i) for i in range(sp.get_piece_size())) == 256
    ws = [i for i in range(sp.get_piece_size()) if set(sp.id_to_piece(i)) == {"▁"}]
    assert sorted(len(sp.id_to_piece(i)) for i in ws) == list(range(1, 17))
    assert all(sp.get_score(i) == -1e9 for i in ws)
    assert sp.encode("12345", out_type=str)[1:] == list("12345")  # split_digits
    assert sp.encode("a", out_type=str)[0].startswith("▁")  # add_dummy_prefix
    assert sp.encode("\U0001f47e", out_type=str)[-4:] == ["<0xF0>", "<0x9F>", "<0x91>", "<0xBE>"]  # byte fallback
    assert 320 <= sp.get_piece_size() <= 1000

    cl = SentencePieceTokenizer(c)
    assert cl.has_infill and not SentencePieceTokenizer(a).has_infill
    ids = [cl.prefix_id, cl.suffix_id, cl.middle_id, cl.eot_id]
    assert ids == sorted(ids) and ids[-1] == cl.n_words - 1  # Code Llama's order, appended last
    assert [cl.id_to_piece(i) for i in ids] == list(CODELLAMA_INFILL_PIECES)
    tt = TiktokenTokenizer(ta)
    assert tt.n_words == tt.n_ranks + 256 and tt.bos_id == tt.n_ranks and tt.n_ranks > 256


def test_load_meta_tokenizer_detects_kind(tok_cases):
    """Bug class: tokenizer kind taken from a version flag instead of the file content."""
    assert isinstance(load_meta_tokenizer(real_llama2_tokenizer()), SentencePieceTokenizer)
    assert isinstance(load_meta_tokenizer(tok_cases["tiny-llama3.1-instruct"].model_path), TiktokenTokenizer)
    if real_llama3_tokenizer() is not None:
        assert isinstance(load_meta_tokenizer(real_llama3_tokenizer()), TiktokenTokenizer)


def test_sentencepiece_port_is_meta(tok_cases):
    """Bug class: the port adding/dropping bos/eos differently from Meta, or parsing "<s>" typed by a user
    as a control token by default; Code Llama's infill encode without the implicit leading space."""
    meta = meta_tokenizer(tok_cases["real-llama2-chat"])
    assert (meta.n_words, meta.bos_id, meta.eos_id, meta.pad_id, meta.stop_tokens) == (32000, 1, 2, -1, (2,))
    assert meta.encode(" Hello", bos=True, eos=False) == [1, 29871, 15043]
    assert meta.encode("hi", bos=True, eos=True) == [1] + meta.sp_model.encode("hi") + [2]
    assert 1 not in meta.encode("<s>", bos=False, eos=False)
    assert meta.encode("a<s>b", bos=False, eos=False, allowed_special="all") == \
        meta.sp_model.encode("a") + [1] + meta.sp_model.encode("b")
    assert meta.decode(meta.encode(" two  spaces ", bos=True, eos=True)) == " two  spaces "
    for cl in (meta, meta_tokenizer(tok_cases["tiny-codellama-instruct"])):
        for s in ("foo bar", "def f():\n    return 1", " lead"):
            assert cl.decode_infilling(cl.encode_infilling(s)) == s
        assert not cl.id_to_piece(cl.encode_infilling("foo")[0]).startswith("▁")


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.text(st.sampled_from(["a", "b", " ", "\n", "\t", "\u3000", "é"]), max_size=60), st.integers(1, 6))
def test_long_run_split_matches_meta(s, max_run):
    """Bug class: Meta's cutting of long whitespace / non-whitespace runs reimplemented with an off-by-one
    (checked against llama-models' own function at small run limits)."""
    pytest.importorskip("llama_models", reason="llama-models is not importable")
    from llama_models.llama3.tokenizer import Tokenizer

    assert list(split_long_runs(s, max_run)) == list(Tokenizer._split_whitespaces_or_nonwhitespaces(s, max_run))
    assert "".join(split_long_runs(s, max_run)) == s


def test_tiktoken_port_equals_llama_models():
    """Bug class: our Llama 3 port diverging from Meta's (split pattern, special ids, 400k blocks, 25k runs):
    same ids as llama-models' Tokenizer on the real file, including inputs past both cuts."""
    pytest.importorskip("llama_models", reason="llama-models is not importable")
    from llama_models.llama3.tokenizer import Tokenizer

    path = real_llama3_tokenizer()
    theirs, ours = Tokenizer(path), TiktokenTokenizer(path)
    assert (ours.n_words, ours.bos_id, ours.eos_id, ours.pad_id) == (theirs.n_words, theirs.bos_id,
                                                                      theirs.eos_id, theirs.pad_id)
    assert list(ours.stop_tokens) == list(theirs.stop_tokens)
    texts = ["", " ", "Hello world", "<|eot_id|> typed", "\n\n\nx", "日本語 🙂", "a" * 25_001 + " b",
             " " * 30_000 + "x", ("word " * 90_000)[:420_000]]
    for t in texts:
        for bos, eos in ((True, False), (False, True)):
            assert ours.encode(t, bos=bos, eos=eos) == theirs.encode(t, bos=bos, eos=eos), t[:30]
    assert ours.encode("<|eot_id|>", bos=False, eos=False, allowed_special="all") == [128009]
    assert len(meta_text_chunks("a" * 400_001)) == 17  # 16 runs of 25,000 in the first block, then 1 char


def test_tiktoken_versions_names():
    """Bug class: Llama 3.0 given 3.1's eom/python_tag ids (128008 is reserved_4 in 3.0) or the reverse."""
    path = real_llama3_tokenizer()
    if path is None:
        pytest.skip("llama-models is not importable, so the real Llama 3 tokenizer.model is unavailable")
    v30, v31, v32 = (TiktokenTokenizer(path, version=v) for v in ("3.0", "3.1", "3.2"))
    assert v30.eom_id is None and v30.stop_tokens == (128001, 128009)
    assert v30.special_tokens["<|reserved_special_token_4|>"] == 128008
    assert v31.stop_tokens == v32.stop_tokens == (128001, 128008, 128009)
    assert v31.special_tokens["<|python_tag|>"] == v32.special_tokens["<|python_tag|>"] == 128010
    assert "<|image|>" not in v31.special_tokens and v32.special_tokens["<|image|>"] == 128011
    assert max(v30.special_tokens.values()) == max(v31.special_tokens.values()) == 128255
