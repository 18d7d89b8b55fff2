"""apply_chat_template(..., tokenize=True) of the converted tokenizer == Meta's chat format ids
(reference_model.chat_format) on generated multi-turn dialogs, with and without system prompts and
generation prompt, for Llama 2 chat / Code Llama Instruct and Llama 3 / 3.1+ (tool roles)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama_parity.fixtures.tokenizers import hf_tokenizer, meta_tokenizer, tokenizer_cases
from llama_parity.tokenizer_check import first_diff
from llama_parity.reference_model.chat_format import Llama3ChatFormat, Message, dialog_tokens, llama2_dialog_tokens
from llama_parity.reference_model.tokenizer import SentencePieceTokenizer

HYPO = settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))

LLAMA2_CASES = ["tiny-llama2-chat", "tiny-codellama-instruct", "real-llama2-chat"]
LLAMA3_CASES = ["tiny-llama3-instruct", "tiny-llama3.1-instruct", "tiny-llama3.2-instruct",
                "tiny-llama3.3-instruct", "real-llama3.1-instruct", "real-llama3-instruct"]
# Llama Guard 3 has its own moderation template: parity_tests/test_guard_format.py


@pytest.fixture(scope="session")
def tok_cases(tmp_path_factory):
    return tokenizer_cases(tmp_path_factory.mktemp("tokenizers"))


def _case(tok_cases, name):
    if name not in tok_cases:
        pytest.skip("llama-models is not importable, so the real Llama 3 tokenizer.model is unavailable")
    return tok_cases[name]


_PIECES = st.sampled_from([
    "hi", "Hello", " there", "What is 2+2?", "ok", "日本語", "🙂", "e\u0301", "שלום", " ", "  ", "\t", "\n", "\n\n",
    "123", "x = 1", "def f():\n    pass", "[INST]", "<<SYS>>", "don't", ".", "?", "\u00a0", "'s",
])
CONTENT = st.one_of(st.lists(_PIECES, max_size=8).map("".join),
                    st.text(st.characters(blacklist_categories=("Cs",)), max_size=20))


def _newline_ws_start(s: str) -> bool:
    for ch in s:
        if not ch.isspace():
            return False
        if ch in "\r\n":
            return True
    return False


def _boundary(m) -> bool:
    """Meta encodes header "\\n\\n", content and each tool call separately; a template joins them."""
    return _newline_ws_start(m["content"]) or bool(m.get("tool_calls") and m["content"])


def _clean(meta, s: str) -> bool:
    return not any(name in s for name in meta.special_tokens)


def _ids(x):
    return list(x["input_ids"] if hasattr(x, "keys") else x)


@st.composite
def llama2_dialogs(draw):
    n_pairs = draw(st.integers(0, 3))
    msgs = []
    if draw(st.booleans()):
        msgs.append({"role": "system", "content": draw(CONTENT)})
    for _ in range(n_pairs):
        msgs += [{"role": "user", "content": draw(CONTENT)}, {"role": "assistant", "content": draw(CONTENT)}]
    if draw(st.booleans()) or not msgs or msgs[-1]["role"] == "system":
        msgs.append({"role": "user", "content": draw(CONTENT)})
    return msgs


@st.composite
def llama3_dialogs(draw, tools: bool):
    roles = ["system", "user", "assistant"] + (["tool", "ipython"] if tools else [])
    msgs = []
    for _ in range(draw(st.integers(1, 5))):
        role = draw(st.sampled_from(roles))
        m = {"role": role, "content": draw(CONTENT)}
        if tools and role == "assistant":
            if draw(st.booleans()):
                m["python_tag"] = True
            if draw(st.booleans()):
                m["end_of_message"] = True
            if draw(st.integers(0, 3)) == 0:
                m["tool_calls"] = [{"function": {"name": draw(st.sampled_from(["brave_search", "wolfram_alpha"])),
                                                 "arguments": {"query": draw(st.sampled_from(["gold", "pi digits", "x y"]))}}}]
        msgs.append(m)
    return msgs


@pytest.mark.parametrize("name", LLAMA2_CASES)
def test_llama2_chat_template_equals_meta(tok_cases, name):
    """Bug class: Llama 2 [INST] <<SYS>> template drift (system folding, strip of contents, spaces around
    [/INST], one BOS/EOS per turn, no double BOS) against Meta's chat_completion token ids."""
    case = _case(tok_cases, name)
    meta, hf = meta_tokenizer(case), hf_tokenizer(case)

    @HYPO
    @given(llama2_dialogs())
    def run(dialog):
        if not all(_clean(meta, m["content"]) for m in dialog):
            return
        m = llama2_dialog_tokens(meta, dialog)
        h = _ids(hf.apply_chat_template(dialog, tokenize=True))
        assert m == h, f"{dialog!r}: meta={m} hf={h} first diff at {first_diff(m, h)}"
        assert h[:2] != [meta.bos_id, meta.bos_id], "double BOS"
        users = sum(1 for x in dialog if x["role"] == "user")
        assert h.count(meta.bos_id) == users

    run()


@pytest.mark.parametrize("name", LLAMA3_CASES)
def test_llama3_chat_template_equals_meta(tok_cases, name):
    """Bug class: Llama 3 header/eot template drift (trimmed contents, missing or doubled BOS, generation
    prompt, 3.1+ ipython role, <|python_tag|>, <|eom_id|>, builtin tool calls) against Meta's ChatFormat,
    for every dialog without a boundary case (content starting with newline-bearing whitespace, or content
    followed by a tool call: Meta encodes those pieces separately; measured separately)."""
    case = _case(tok_cases, name)
    meta, hf = meta_tokenizer(case), hf_tokenizer(case)
    tools = meta.eom_id is not None

    @HYPO
    @given(llama3_dialogs(tools), st.booleans())
    def run(dialog, gp):
        if not all(_clean(meta, m["content"]) and not _boundary(m) for m in dialog):
            return
        m = Llama3ChatFormat(meta).encode_dialog_prompt(dialog, add_generation_prompt=gp)
        h = _ids(hf.apply_chat_template(dialog, tokenize=True, add_generation_prompt=gp))
        assert m == h, f"{dialog!r}: meta={m} hf={h} first diff at {first_diff(m, h)}"
        assert h.count(meta.bos_id) == 1 and h[0] == meta.bos_id

    run()


@pytest.mark.parametrize("name", ["tiny-llama3.1-instruct", "real-llama3.1-instruct"])
def test_llama31_system_with_builtin_tools(tok_cases, name):
    """Bug class: Meta's 3.1 tool system header ("Environment: ipython", "Tools: ...", dates) rendered
    differently by the template than by Meta's prompt format."""
    case = _case(tok_cases, name)
    meta, hf = meta_tokenizer(case), hf_tokenizer(case)
    fmt = Llama3ChatFormat(meta)
    for tools in (["brave_search", "wolfram_alpha"], ["code_interpreter"], ["brave_search", "code_interpreter"]):
        for dialog in ([{"role": "user", "content": "gold price?"}],
                       [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "hi"}]):
            m = fmt.encode_dialog_prompt(dialog, builtin_tools=tools, today="21 September 2024")
            h = _ids(hf.apply_chat_template(dialog, tokenize=True, add_generation_prompt=True,
                                            builtin_tools=tools, date_string="21 September 2024"))
            assert m == h, f"{tools} {dialog}: first diff at {first_diff(m, h)}"
    text = hf.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True,
                                  builtin_tools=["brave_search", "wolfram_alpha"], date_string="21 September 2024")
    assert "Environment: ipython\nTools: brave_search, wolfram_alpha\nCutting Knowledge Date: December 2023\n" \
           "Today Date: 21 September 2024\n\n<|eot_id|>" in text


@pytest.mark.parametrize("name", ["tiny-llama3.1-instruct", "real-llama3.1-instruct"])
def test_boundary_class_is_only_newline_start(tok_cases, name):
    """Bug class: chat differences hidden or mis-attributed. Meta encodes "\\n\\n" after the header and
    the content separately; a rendered template joins them. Differences must come only from contents
    starting with newline-bearing whitespace ("\\nhi": Meta 271,198,6151 vs joined 1432,6151), and
    one character of content before the newline restores equality."""
    case = _case(tok_cases, name)
    meta, hf = meta_tokenizer(case), hf_tokenizer(case)
    fmt = Llama3ChatFormat(meta)
    differing = 0
    for lead in ("\n", "\n\n", " \n", "\r\n", "\t\n", "\n "):
        for rest in ("hi", "  x", "123", "🙂"):
            d = [{"role": "user", "content": lead + rest}]
            m = fmt.encode_dialog_prompt(d)
            h = _ids(hf.apply_chat_template(d, tokenize=True, add_generation_prompt=True))
            differing += m != h
            d2 = [{"role": "user", "content": "." + lead + rest}]
            assert fmt.encode_dialog_prompt(d2) == _ids(hf.apply_chat_template(d2, tokenize=True,
                                                                               add_generation_prompt=True))
    assert differing > 0  # the class exists and is measured (reported by check_tokenizer), not hidden
    if name == "real-llama3.1-instruct":
        d = [{"role": "user", "content": "\nhi"}]
        assert fmt.encode_dialog_prompt(d, add_generation_prompt=False)[4:7] == [271, 198, 6151]
        assert _ids(hf.apply_chat_template(d, tokenize=True))[4:6] == [1432, 6151]


def test_meta_chat_format_rules(tok_cases):
    """Bug class: our Meta chat-format port accepting dialogs Meta rejects (non-alternating Llama 2 roles,
    a lone system message) or Llama 3.0 given 3.1-only roles/tokens."""
    l2 = meta_tokenizer(tok_cases["tiny-llama2-chat"])
    with pytest.raises(ValueError):
        llama2_dialog_tokens(l2, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(ValueError):
        llama2_dialog_tokens(l2, [{"role": "system", "content": "s"}])
    l30 = meta_tokenizer(tok_cases["tiny-llama3-instruct"])
    with pytest.raises(ValueError):
        Llama3ChatFormat(l30).encode_message(Message("assistant", "x", python_tag=True))
    assert isinstance(l2, SentencePieceTokenizer)
    assert dialog_tokens(l2, [{"role": "user", "content": "hi"}]) == l2.encode("[INST] hi [/INST]", bos=True, eos=False)
