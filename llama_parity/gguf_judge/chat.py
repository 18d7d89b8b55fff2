"""The GGUF's chat template (`tokenizer.chat_template`) judged as tokenizer_check judges an HF folder's:
rendered on fixed dialogs (system, multi-turn, tools) against the release's official template, and for
Llama 2 / Code Llama / Llama Guard 3 tokenized against Meta's own chat format. The template is
rendered here with jinja2 the way chat runtimes do (trim_blocks, lstrip_blocks, sandboxed,
raise_exception, strftime_now, tojson keeping key order and non-ASCII); the rendering is tokenized
with Meta's tokenizer reading special-token text as the control tokens (what llama.cpp and
transformers do with a rendered template)."""

from __future__ import annotations

import datetime
import functools
import json

from llama_parity.tokenizer_check import CheckResult

from .vocab import Acc, memo, tokenizer_digest


def _raise_exception(message):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


@functools.lru_cache(maxsize=8)
def _compiled(template: str):
    """The template compiled once (compiling a Llama 3.1 template costs ~0.1 s; the checks render ~50 dialogs)."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template)


def render(template: str, messages: list[dict], *, bos_token: str, eos_token: str, add_generation_prompt: bool,
           **kwargs) -> str:
    return _compiled(template).render(messages=messages, bos_token=bos_token, eos_token=eos_token,
                                      add_generation_prompt=add_generation_prompt, **kwargs)


class GGUFChat:
    """The little of a transformers tokenizer that tokenizer_check's chat steps use, served by the GGUF's
    template and special-token names and Meta's tokenizer."""

    def __init__(self, gf, meta):
        self.chat_template = gf.get("tokenizer.chat_template")
        tokens = gf.get("tokenizer.ggml.tokens") or []
        name = lambda key: tokens[i] if isinstance(i := gf.get(f"tokenizer.ggml.{key}_token_id"), int) and \
            0 <= i < len(tokens) else ""
        self.bos, self.eos, self.meta = name("bos"), name("eos"), meta

    def apply_chat_template(self, messages, tokenize: bool = True, add_generation_prompt: bool = False, **kw):
        text = render(self.chat_template, list(messages), bos_token=self.bos, eos_token=self.eos,
                      add_generation_prompt=add_generation_prompt, **kw)
        return self.meta.encode(text, bos=False, eos=False, allowed_special="all") if tokenize else text


def chat_template_checks(gf, meta, release) -> list[CheckResult]:
    """Memoised by all they read: the template, the bos/eos token names, Meta's tokenizer, the release."""
    chat = GGUFChat(gf, meta)
    key = ("chat", chat.chat_template, chat.bos, chat.eos, tokenizer_digest(meta), repr(release))
    return memo(key, lambda: _chat_template_checks(gf, meta, release))


def _chat_template_checks(gf, meta, release) -> list[CheckResult]:
    from llama_parity.tokenizer_chat import meta_format_checks, official_template_checks
    from llama_parity.tokenizer_report import Ctx as _Ctx

    template = gf.get("tokenizer.chat_template")
    wants = release is not None and (release.instruct or release.family == "llama-guard-3")
    present = Acc("chat template present", note="an instruct release's GGUF without its template formats no "
                  "dialog right in llama.cpp's chat mode")
    if wants:
        present.add("tokenizer.chat_template", "the release's template", "the release's template" if template else None)
    if not template:
        return [present.r] if wants else []
    ctx = _Ctx(meta.path, gf.path, meta, GGUFChat(gf, meta), getattr(meta, "kind", "") != "tiktoken", release,
               None, None, None)
    out = [present.r] if wants else []
    for r in (official_template_checks(ctx) if release is not None else []) + meta_format_checks(ctx):
        r.name = r.name.replace("tokenizer_config.json", "tokenizer.chat_template")
        for m in r.examples:
            m.text = m.text.replace("tokenizer_config.json chat_template", "tokenizer.chat_template")
        out.append(r)
    return out
