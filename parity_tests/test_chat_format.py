"""Chat templates against Meta's chat format ids (reference_model.chat_format) on generated multi-turn
dialogs, with and without system prompts and generation prompt:
- the official template the converter writes: equal to Meta for Llama 2 chat / Code Llama Instruct; for
  Llama 3.x equal to Meta's format of the dialog the official template implies (its system header with the
  knowledge and today dates, trimmed contents) - the measured difference, pinned down exactly;
- Meta's ChatFormat as a template (package data, `meta_chat_template`): equal to Meta for Llama 3 / 3.1+
  (tool roles, <|python_tag|>, <|eom_id|>, builtin and custom JSON tool calls)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama_parity.converter.tokenizer_files import (chat_template_for, load_chat_template, meta_chat_template,
                                                    render_chat_template)
from llama_parity.fixtures.tokenizers import hf_tokenizer, meta_tokenizer, tokenizer_cases
from llama_parity.tokenizer_chat import render_template
from llama_parity.tokenizer_check import first_diff, official_render_cases
from llama_parity.reference_model.chat_format import Llama3ChatFormat, Message, dialog_tokens, llama2_dialog_tokens
from llama_parity.reference_model.tokenizer import SentencePieceTokenizer

HYPO = settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))

LLAMA2_CASES = ["tiny-llama2-chat", "tiny-codellama-instruct", "real-llama2-chat"]
LLAMA3_CASES = ["tiny-llama3-instruct", "tiny-llama3.1-instruct", "tiny-llama3.2-instruct",
                "tiny-llama3.3-instruct", "real-llama3.1-instruct", "real-llama3-instruct"]
OFFICIAL_DATE = "26 Jul 2024"  # the date the official 3.1 template writes when none is given
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


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False)
                           | st.text(max_size=6), lambda v: st.lists(v, max_size=3) | st.dictionaries(st.text(max_size=5), v, max_size=3),
                           max_leaves=6)
TOOL_CALLS = st.one_of(
    st.builds(lambda n, q: {"function": {"name": n, "arguments": {"query": q}}},
              st.sampled_from(["brave_search", "wolfram_alpha"]), st.sampled_from(["gold", "pi digits", "x y"])),
    st.builds(lambda n, a: {"function": {"name": n, "arguments": a}},
              st.sampled_from(["get_weather", "trouver_l'hôtel", "日本"]), st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=4)))


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
                m["tool_calls"] = [draw(TOOL_CALLS)]
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
def test_meta_llama3_template_equals_meta(tok_cases, name):
    """Bug class: drift of Meta's ChatFormat as a template (trimmed contents, missing or doubled BOS, generation
    prompt, 3.1+ ipython role, <|python_tag|>, <|eom_id|>, builtin and custom JSON tool calls) against the port,
    for every dialog without a boundary case (content starting with newline-bearing whitespace, or content
    followed by a tool call: Meta encodes those pieces separately; measured separately)."""
    case = _case(tok_cases, name)
    meta, hf = meta_tokenizer(case), hf_tokenizer(case)
    tools = meta.eom_id is not None
    template = meta_chat_template(case.family)

    @HYPO
    @given(llama3_dialogs(tools), st.booleans())
    def run(dialog, gp):
        if not all(_clean(meta, m["content"]) and not _boundary(m) for m in dialog):
            return
        m = Llama3ChatFormat(meta).encode_dialog_prompt(dialog, add_generation_prompt=gp)
        h = _ids(hf.apply_chat_template(dialog, tokenize=True, add_generation_prompt=gp, chat_template=template))
        assert m == h, f"{dialog!r}: meta={m} hf={h} first diff at {first_diff(m, h)}"
        assert h.count(meta.bos_id) == 1 and h[0] == meta.bos_id

    run()


@pytest.mark.parametrize("name", ["tiny-llama3.1-instruct", "real-llama3.1-instruct"])
def test_llama31_system_with_builtin_tools(tok_cases, name):
    """Bug class: Meta's 3.1 tool system header ("Environment: ipython", "Tools: ...", dates) rendered
    differently by the template than by Meta's prompt format."""
    case = _case(tok_cases, name)
    meta, hf = meta_tokenizer(case), hf_tokenizer(case)
    fmt, template = Llama3ChatFormat(meta), meta_chat_template(case.family)
    for tools in (["brave_search", "wolfram_alpha"], ["code_interpreter"], ["brave_search", "code_interpreter"]):
        for dialog in ([{"role": "user", "content": "gold price?"}],
                       [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "hi"}]):
            m = fmt.encode_dialog_prompt(dialog, builtin_tools=tools, today="21 September 2024")
            h = _ids(hf.apply_chat_template(dialog, tokenize=True, add_generation_prompt=True, chat_template=template,
                                            builtin_tools=tools, date_string="21 September 2024"))
            assert m == h, f"{tools} {dialog}: first diff at {first_diff(m, h)}"
    text = hf.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True,
                                  chat_template=template, builtin_tools=["brave_search", "wolfram_alpha"], date_string="21 September 2024")
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
    kw = dict(tokenize=True, add_generation_prompt=True, chat_template=meta_chat_template(case.family))
    differing = 0
    for lead in ("\n", "\n\n", " \n", "\r\n", "\t\n", "\n "):
        for rest in ("hi", "  x", "123", "🙂"):
            d = [{"role": "user", "content": lead + rest}]
            m = fmt.encode_dialog_prompt(d)
            h = _ids(hf.apply_chat_template(d, **kw))
            differing += m != h
            d2 = [{"role": "user", "content": "." + lead + rest}]
            assert fmt.encode_dialog_prompt(d2) == _ids(hf.apply_chat_template(d2, **kw))
    assert differing > 0  # the class exists and is measured (reported by check_tokenizer), not hidden
    if name == "real-llama3.1-instruct":
        d = [{"role": "user", "content": "\nhi"}]
        assert fmt.encode_dialog_prompt(d, add_generation_prompt=False)[4:7] == [271, 198, 6151]
        assert _ids(hf.apply_chat_template(d, tokenize=True, chat_template=kw["chat_template"]))[4:6] == [1432, 6151]


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


# --- the official templates the converter writes --------------------------------------------------------

def official_as_meta(dialog, family: str, date: str = OFFICIAL_DATE) -> list[dict]:
    """The dialog Meta's ChatFormat must be given to produce what the official Llama 3.x template renders:
    contents trimmed and, from 3.1 on, the system message prefixed with the knowledge and today dates."""
    msgs = [dict(m) for m in dialog]
    out = []
    if family != "llama3":
        system = msgs.pop(0)["content"].strip() if msgs and msgs[0]["role"] == "system" else ""
        out.append({"role": "system", "content": f"Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n"
                    + system})
    return out + [{"role": m["role"], "content": m["content"].strip()} for m in msgs]


@pytest.mark.parametrize("name", LLAMA3_CASES)
def test_official_llama3_template_is_meta_of_implied_dialog(tok_cases, name):
    """Bug class: an official Llama 3.x template that is not the official one (the 3.1/3.2/3.3 system header
    "Cutting Knowledge Date: December 2023 / Today Date: 26 Jul 2024" missing or reworded, contents not
    trimmed, BOS doubled). The measured difference to Meta's ChatFormat is exactly: trimmed contents and
    (3.1+) that system header; with both applied to the dialog, Meta's ids and the template's are equal."""
    case = _case(tok_cases, name)
    meta, hf = meta_tokenizer(case), hf_tokenizer(case)
    assert hf.chat_template == chat_template_for(case.family, True)

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(llama3_dialogs(False), st.booleans())
    def run(dialog, gp):
        if not all(_clean(meta, m["content"]) for m in dialog):
            return
        m = Llama3ChatFormat(meta).encode_dialog_prompt(official_as_meta(dialog, case.family),
                                                        add_generation_prompt=gp)
        h = _ids(hf.apply_chat_template(dialog, tokenize=True, add_generation_prompt=gp, date_string=OFFICIAL_DATE))
        assert m == h, f"{dialog!r}: meta={m} hf={h} first diff at {first_diff(m, h)}"

    run()
    if case.family != "llama3":  # without date_string: 3.1/3.3 write 26 Jul 2024, 3.2 today's date
        text = hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
        assert "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: " in text
        assert ("Today Date: 26 Jul 2024\n\n<|eot_id|>" in text) == (case.family != "llama3.2")


@pytest.mark.parametrize("name", ["real-llama3.1-instruct", "real-llama3.2-instruct"])
def test_custom_tool_call_json_equals_meta(tok_cases, name):
    """Bug class: a custom (JSON) tool call rendered unlike Meta's llama-models ChatFormat: Jinja's tojson
    with other separators, HTML or non-ASCII escaping, sorted keys, or without Meta's "type": "function".
    Meta's own code (llama_models.llama3.chat_format) is the reference here, on the real Llama 3 tokenizer."""
    pytest.importorskip("llama_models", reason="llama-models is not importable")
    from llama_models.datatypes import RawMessage, StopReason, ToolCall
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer

    case = _case(tok_cases, name)
    meta, hf = meta_tokenizer(case), hf_tokenizer(case)
    theirs = ChatFormat(Tokenizer(case.model_path))
    for args in ({"city": "Zürich", "unit": "celsius"}, {"b": 1, "a": [1, 2.5, None, True], "c": {"é": "\"q\" <&>"}},
                 {}, {"query": "not a builtin tool", "emoji": "🙂"}):
        dialog = [{"role": "user", "content": "Weather?"},
                  {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather", "arguments": args}}]}]
        ref = theirs.encode_dialog_prompt([
            RawMessage(role="user", content="Weather?"),
            RawMessage(role="assistant", content="", stop_reason=StopReason.end_of_message,
                       tool_calls=[ToolCall(call_id="0", tool_name="get_weather", arguments=args)])]).tokens
        assert Llama3ChatFormat(meta).encode_dialog_prompt(dialog) == ref
        h = _ids(hf.apply_chat_template(dialog, tokenize=True, add_generation_prompt=True,
                                        chat_template=meta_chat_template(case.family)))
        assert h == ref, f"{args}: first diff at {first_diff(ref, h)}"


TEMPLATE_NAMES = ["llama2-chat", "codellama-instruct", "llama3-instruct", "llama3.1-instruct", "llama3.2-instruct",
                  "meta-llama3", "meta-llama3.1"]


@pytest.mark.parametrize("name", TEMPLATE_NAMES + ["llama-guard-3"])
def test_jinja2_rendering_equals_transformers(tok_cases, name):
    """Bug class: verify rendering the official template under other Jinja rules than transformers'
    apply_chat_template (whitespace control, tojson's key order and escaping, raise_exception), which
    would fail right folders or pass wrong ones. Fixed dialogs with system, multi-turn and tools."""
    family = {"llama2-chat": "llama2", "codellama-instruct": "codellama", "llama3-instruct": "llama3",
              "meta-llama3": "llama3", "llama-guard-3": "llama-guard-3", "llama3.2-instruct": "llama3.2"}.get(name, "llama3.1")
    case = tok_cases["tiny-llama2-chat" if family in ("llama2", "codellama") else "tiny-llama3.1-instruct"]
    hf = hf_tokenizer(case)
    template = chat_template_for(family, True, guard_categories=13) if family == "llama-guard-3" else load_chat_template(name)
    for dialog, kw in official_render_cases(family):
        for gp in (True, False):
            try:
                ours = render_chat_template(template, list(dialog), bos_token=hf.bos_token, eos_token=hf.eos_token,
                                            add_generation_prompt=gp, **kw)
            except Exception:  # noqa: BLE001 - then transformers must refuse the dialog too
                with pytest.raises(Exception):
                    hf.apply_chat_template(list(dialog), tokenize=False, add_generation_prompt=gp,
                                           chat_template=template, **kw)
                continue
            theirs = hf.apply_chat_template(list(dialog), tokenize=False, add_generation_prompt=gp,
                                            chat_template=template, **kw)
            assert ours == theirs, f"{dialog} {kw}: first diff at {first_diff(ours, theirs)}"
            # the judge renders with its own copy (tokenizer_chat.render_template): same rules
            judge = render_template(template, list(dialog), bos_token=hf.bos_token, eos_token=hf.eos_token,
                                    add_generation_prompt=gp, **kw)
            assert judge == theirs, f"judge: {dialog} {kw}: first diff at {first_diff(judge, theirs)}"
