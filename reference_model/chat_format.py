"""Meta's chat formats, as token ids: the judge for converted chat templates.

- Llama 2 chat (and Code Llama Instruct): `[INST] <<SYS>>` dialogs exactly as Meta's llama repo
  `chat_completion` builds them: each (user, assistant) pair encoded as
  `encode(f"[INST] {user.strip()} [/INST] {answer.strip()} ", bos=True, eos=True)`, the final user turn as
  `encode(f"[INST] {user.strip()} [/INST]", bos=True, eos=False)`; a leading system message is folded into
  the first user turn as `<<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user}`.
- Llama 3 / 3.x: Meta's ChatFormat: `<|begin_of_text|>` then per message
  `<|start_header_id|>` encode(role) `<|end_header_id|>` encode("\\n\\n") encode(content) `<|eot_id|>`, each
  piece encoded separately; the assistant header last when a generation prompt is wanted.
- 3.1+: role "tool" is written "ipython"; an assistant message may start with `<|python_tag|>` and end with
  `<|eom_id|>`; Meta's builtin tool calls are written `name.call(query="...")` (code_interpreter: the code);
  `system_prompt_with_tools` builds Meta's "Environment: ipython" system header; other (custom) tool calls
  are Meta's JSON (`json.dumps({"type": "function", "name": ..., "parameters": ...})`).
- Llama Guard 3 (1B, 8B): the conversation is written into Meta's moderation prompt (task line, unsafe
  content categories, conversation as "User: ..." / "Agent: ..." turns, instructions), sent as one user turn
  of the Llama 3 chat format followed by the assistant header (`llama_guard3_dialog_tokens`).

Content is encoded as plain text: special-token text inside a message is not a control token (Meta's rule).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .tokenizer import SentencePieceTokenizer, TiktokenTokenizer

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"

BUILTIN_QUERY_TOOLS = ("brave_search", "wolfram_alpha", "photogen")


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: Mapping[str, Any]


@dataclass(frozen=True)
class Message:
    role: str  # system | user | assistant | tool | ipython
    content: str
    python_tag: bool = False  # assistant: <|python_tag|> before the content
    end_of_message: bool = False  # assistant: <|eom_id|> instead of <|eot_id|>
    tool_calls: tuple[ToolCall, ...] = field(default_factory=tuple)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Message":
        calls = []
        for c in d.get("tool_calls") or ():
            fn = c.get("function", c)
            calls.append(ToolCall(fn["name"], dict(fn["arguments"])))
        return cls(
            role=d["role"],
            content=d["content"],
            python_tag=bool(d.get("python_tag", False)),
            end_of_message=bool(d.get("end_of_message", False)),
            tool_calls=tuple(calls),
        )

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.python_tag:
            d["python_tag"] = True
        if self.end_of_message:
            d["end_of_message"] = True
        if self.tool_calls:
            d["tool_calls"] = [{"function": {"name": c.name, "arguments": dict(c.arguments)}} for c in self.tool_calls]
        return d


def _as_messages(dialog: Sequence[Message | Mapping[str, Any]]) -> list[Message]:
    return [m if isinstance(m, Message) else Message.from_dict(m) for m in dialog]


# --- Llama 2 -------------------------------------------------------------------------------------------

def llama2_dialog_tokens(tokenizer: SentencePieceTokenizer, dialog: Sequence[Message | Mapping[str, Any]]) -> list[int]:
    """Token ids of a Llama 2 chat dialog, as Meta's chat_completion builds them.

    Meta requires the dialog to end with a user turn (the model answers next). A dialog that ends with an
    assistant turn (training data) is accepted here too: it is every complete (user, answer) pair.
    """
    msgs = _as_messages(dialog)
    if msgs and msgs[0].role == "system":
        if len(msgs) < 2:
            raise ValueError("a system message must be followed by a user message")
        msgs = [Message(msgs[1].role, B_SYS + msgs[0].content + E_SYS + msgs[1].content)] + msgs[2:]
    for i, m in enumerate(msgs):
        want = "user" if i % 2 == 0 else "assistant"
        if m.role != want:
            raise ValueError("roles must alternate user/assistant/user/... (after an optional system message)")
    tokens: list[int] = []
    for prompt, answer in zip(msgs[::2], msgs[1::2]):
        tokens += tokenizer.encode(
            f"{B_INST} {prompt.content.strip()} {E_INST} {answer.content.strip()} ", bos=True, eos=True
        )
    if msgs and msgs[-1].role == "user":
        tokens += tokenizer.encode(f"{B_INST} {msgs[-1].content.strip()} {E_INST}", bos=True, eos=False)
    return tokens


# --- Llama 3.x -----------------------------------------------------------------------------------------

def system_prompt_with_tools(
    builtin_tools: Sequence[str],
    *,
    instructions: str = "",
    today: str | None = None,
    knowledge_date: str = "December 2023",
) -> str:
    """Meta's Llama 3.1 system prompt header for builtin tools ("Environment: ipython" ...)."""
    text = "Environment: ipython\n"
    shown = [t for t in builtin_tools if t != "code_interpreter"]
    if shown:
        text += "Tools: " + ", ".join(shown) + "\n"
    text += f"Cutting Knowledge Date: {knowledge_date}\n"
    if today is not None:
        text += f"Today Date: {today}\n"
    return text + "\n" + instructions


def encode_tool_call(call: ToolCall) -> str:
    """Meta's text for a tool call (llama-models `ToolUtils.encode_tool_call`, json tool-prompt format):
    builtin tools as `name.call(query="...")` (code_interpreter: the code itself), any other tool as
    `json.dumps({"type": "function", "name": ..., "parameters": ...})` with json.dumps' defaults."""
    if call.name == "code_interpreter":
        return str(call.arguments["code"])
    if call.name in BUILTIN_QUERY_TOOLS:
        return f'{call.name}.call(query="{call.arguments["query"]}")'
    return json.dumps({"type": "function", "name": call.name, "parameters": call.arguments})


class Llama3ChatFormat:
    def __init__(self, tokenizer: TiktokenTokenizer):
        self.tokenizer = tokenizer
        self.special = tokenizer.special_tokens

    def _text(self, s: str) -> list[int]:
        return self.tokenizer.encode(s, bos=False, eos=False)

    def encode_header(self, role: str) -> list[int]:
        role = "ipython" if role == "tool" else role
        return [self.special["<|start_header_id|>"], *self._text(role), self.special["<|end_header_id|>"],
                *self._text("\n\n")]

    def encode_message(self, message: Message | Mapping[str, Any]) -> list[int]:
        m = message if isinstance(message, Message) else Message.from_dict(message)
        if self.tokenizer.version == "3.0" and (m.python_tag or m.end_of_message or m.tool_calls or m.role in ("tool", "ipython")):
            raise ValueError("Llama 3.0 has no ipython role, <|python_tag|> or <|eom_id|>")
        tokens = self.encode_header(m.role)
        if m.python_tag:
            tokens.append(self.special["<|python_tag|>"])
        tokens += self._text(m.content)
        for call in m.tool_calls:
            tokens += self._text(encode_tool_call(call))
        eom = m.end_of_message or bool(m.tool_calls)
        tokens.append(self.special["<|eom_id|>" if eom else "<|eot_id|>"])
        return tokens

    def encode_dialog_prompt(
        self,
        dialog: Sequence[Message | Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        builtin_tools: Sequence[str] | None = None,
        today: str | None = None,
    ) -> list[int]:
        msgs = _as_messages(dialog)
        if builtin_tools:
            if msgs and msgs[0].role == "system":
                header = system_prompt_with_tools(builtin_tools, instructions=msgs[0].content, today=today)
                msgs = [Message("system", header)] + msgs[1:]
            else:
                msgs = [Message("system", system_prompt_with_tools(builtin_tools, today=today))] + msgs
        tokens = [self.special["<|begin_of_text|>"]]
        for m in msgs:
            tokens += self.encode_message(m)
        if add_generation_prompt:
            tokens += self.encode_header("assistant")
        return tokens


def dialog_tokens(
    tokenizer: SentencePieceTokenizer | TiktokenTokenizer,
    dialog: Sequence[Message | Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    **kwargs: Any,
) -> list[int]:
    """Meta's chat-format ids for any Llama tokenizer (Llama 2 ignores `add_generation_prompt`)."""
    if isinstance(tokenizer, TiktokenTokenizer):
        return Llama3ChatFormat(tokenizer).encode_dialog_prompt(dialog, add_generation_prompt=add_generation_prompt, **kwargs)
    return llama2_dialog_tokens(tokenizer, dialog)


# --- Llama Guard 3 -------------------------------------------------------------------------------------
# Text as in Meta's reference implementation (llama-stack's llama_guard safety provider, llama-recipes'
# prompt_format_utils.py) and Meta's official HF chat templates; sources in docs/tokenizers.md.

LLAMA_GUARD3_CATEGORIES = (
    "Violent Crimes", "Non-Violent Crimes", "Sex Crimes", "Child Exploitation", "Defamation",
    "Specialized Advice", "Privacy", "Intellectual Property", "Indiscriminate Weapons", "Hate", "Self-Harm",
    "Sexual Content", "Elections", "Code Interpreter Abuse",
)
# Guard 3 8B: S1-S14; Guard 3 1B has no S14 (Code Interpreter Abuse). Which release has which count is a
# release fact: llama_parity.releases.guard_categories; callers pass it.


def _guard_role(role: str) -> str:
    return {"user": "User", "assistant": "Agent"}[role]


def llama_guard3_prompt(
    dialog: Sequence[Message | Mapping[str, Any]],
    *,
    n_categories: int,
    excluded_categories: Sequence[str] = (),
) -> str:
    """Meta's Llama Guard 3 moderation prompt (the user-turn content) for a conversation.

    Roles must be user/assistant, alternating, starting with user (as Meta's official templates require).
    The last turn's role decides what is assessed: 'User' (prompt classification) or 'Agent' (response
    classification). Contents are not trimmed (Meta's Python prompt builders do not trim them).
    `excluded_categories` drops codes such as "S6"; the others keep their numbers.
    """
    if n_categories not in (13, 14):
        raise ValueError(f"Llama Guard 3 has 13 (1B) or 14 (8B) categories, not {n_categories}")
    msgs = _as_messages(dialog)
    if not msgs:
        raise ValueError("a Llama Guard 3 conversation needs at least one message")
    for i, m in enumerate(msgs):
        if m.role != ("user" if i % 2 == 0 else "assistant"):
            raise ValueError("Llama Guard 3 roles must alternate user/assistant/user/... starting with user")
    categories = [f"S{i}: {name}." for i, name in enumerate(LLAMA_GUARD3_CATEGORIES[:n_categories], start=1)
                  if f"S{i}" not in excluded_categories]
    if not categories:
        raise ValueError("every category is excluded")
    role = _guard_role(msgs[-1].role)
    conversation = "\n\n".join(f"{_guard_role(m.role)}: {m.content}" for m in msgs)
    return (
        f"Task: Check if there is unsafe content in '{role}' messages in conversations according our safety "
        "policy with the below categories.\n\n"
        "<BEGIN UNSAFE CONTENT CATEGORIES>\n" + "\n".join(categories) + "\n<END UNSAFE CONTENT CATEGORIES>\n\n"
        "<BEGIN CONVERSATION>\n\n" + conversation + "\n\n<END CONVERSATION>\n\n"
        f"Provide your safety assessment for ONLY THE LAST {role} message in the above conversation:\n"
        " - First line must read 'safe' or 'unsafe'.\n"
        " - If unsafe, a second line must include a comma-separated list of violated categories."
    )


def llama_guard3_dialog_tokens(
    tokenizer: TiktokenTokenizer,
    dialog: Sequence[Message | Mapping[str, Any]],
    *,
    n_categories: int,
    excluded_categories: Sequence[str] = (),
) -> list[int]:
    """Token ids Meta's reference inference feeds Llama Guard 3: the moderation prompt as one user message of
    the Llama 3 ChatFormat, then the assistant header (`<|begin_of_text|>`, header "\\n\\n", eot)."""
    prompt = llama_guard3_prompt(dialog, n_categories=n_categories, excluded_categories=excluded_categories)
    return Llama3ChatFormat(tokenizer).encode_dialog_prompt([Message("user", prompt)], add_generation_prompt=True)
