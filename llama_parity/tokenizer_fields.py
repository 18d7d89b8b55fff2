"""The HF folder's configuration: special tokens, BOS from the post-processor, and every
tokenizer_config.json / special_tokens_map.json field that changes behaviour in transformers 4.x or 5.x,
against the release's official files (llama_parity/releases/official/<release>/) and Meta's behaviour.

A field passes when it gives Meta's behaviour: its official value, or a value that only fills a gap the
release leaves open (a pad token Meta reserves for padding, an explicit default, a model_max_length at
or above the context), which the report says. Where the official file itself differs from Meta
(`clean_up_tokenization_spaces: true` in the official Llama 3.x repos), Meta's behaviour is the bound and
the failure says what the official repo ships.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from llama_parity import releases as variants
from llama_parity.tokenizer_report import Acc, CheckResult, Ctx

def _token_text(v: Any) -> Any:
    return v.get("content") if isinstance(v, dict) else v


def expected_special_tokens(ctx: Ctx) -> dict[str, Any]:
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


def special_token_checks(ctx: Ctx) -> list[CheckResult]:
    """tokenizer_config.json and special_tokens_map.json bos/eos/unk/pad, and the post-processor's BOS."""
    acc = Acc("special tokens in tokenizer_config.json / special_tokens_map.json", 0,
               note="bos/eos/unk/pad against the release (eos <|eot_id|> for instruct/Guard, no pad)")
    for fname, data in (("tokenizer_config.json", ctx.tokenizer_config), ("special_tokens_map.json", ctx.special_map)):
        if data is None:
            continue
        for key, want in expected_special_tokens(ctx).items():
            got = _token_text(data.get(key))
            if key == "pad_token" and got is not None and got == meta_pad_token(ctx):
                acc.accept(f"{fname} pad_token={got!r} (the token Meta reserves for padding; the release sets none)")
                continue
            ok = got in want if isinstance(want, set) else got == want
            acc.add(f"{fname} {key}", got if ok else sorted(want) if isinstance(want, set) else want, got)
    post = Acc("BOS from tokenizer.json post_processor (exactly once)", 0,
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


# --- the release's official tokenizer files ------------------------------------------------------------------

def official_release_id(release) -> str | None:
    """The registry id whose official files stand for this release (the release itself, its twin, or its
    family's representative for shapes no release has)."""
    if release is None:
        return None
    try:
        spec = variants.get(release.label)
    except Exception:  # noqa: BLE001 - a label that is no registry id: the family decides
        spec = None
    if spec is None and release.guard_categories is not None:  # Guard 3 1B (13) or 8B (14): its own template
        spec = next((v for v in variants.VARIANTS if v.guard_categories == release.guard_categories), None)
    return variants.metadata_release(spec, release.family, release.instruct).id


def official_tokenizer_file(release, name: str) -> dict | None:
    """tokenizer_config.json / special_tokens_map.json of the release's official HF repo (None: unknown)."""
    from llama_parity.metadata import official_file

    rid = official_release_id(release)
    return official_file(rid, name) if rid else None


def meta_pad_token(ctx: Ctx) -> str | None:
    """The token Meta's tokenizer reserves for padding (<|finetune_right_pad_id|> from Llama 3.1 on)."""
    pad = getattr(ctx.meta, "pad_id", -1)
    return ctx.meta.id_to_piece(pad) if isinstance(pad, int) and pad >= 0 else None


# --- behaviour-changing fields ---------------------------------------------------------------------------------

_FAST_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")
_LLAMA_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast", "CodeLlamaTokenizer", "CodeLlamaTokenizerFast")
_ABSENT = object()


@dataclass(frozen=True)
class FieldRule:
    """What a field does in transformers and which values keep Meta's behaviour.

    `bad(value, ctx)` returns why a value changes behaviour (None: it does not); `_ABSENT` stands for a
    missing field (transformers' default applies)."""

    does: str
    bad: Callable[[Any, Ctx], str | None]


def _context_len(ctx: Ctx) -> int | None:
    rel = ctx.release
    return variants.FAMILY_FACTS[rel.family].max_position_embeddings if rel is not None else None


def _max_length(v, ctx) -> str | None:
    if v is _ABSENT or v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool):
        return f"{v!r} is not a token count"
    n = _context_len(ctx)
    if n is not None and v < n:
        return f"truncation=True cuts every prompt at {v} tokens; the model's context is {n}"
    return None


def _clean_up(v, ctx) -> str | None:
    cls = (ctx.tokenizer_config or {}).get("tokenizer_class")
    on = (cls not in _LLAMA_CLASSES) if v is _ABSENT else bool(v)  # missing: true before transformers 4.45
    if not on:
        return None
    return ("decode() strips the space before . , ! ? ' n't 's ... (transformers 4.x, and 5.x up to 5.3): text "
            "differs from Meta's decode"
            + (" (missing: transformers before 4.45 default to true)" if v is _ABSENT else ""))


def _must_be(*ok, why: str):
    def bad(v, ctx):
        return None if v is _ABSENT or v in ok else why
    return bad


def _prefix_space(v, ctx) -> str | None:
    if v is _ABSENT or v is None or (v is False and not ctx.sp):
        return None
    return ("sentencepiece: the dummy prefix lives in tokenizer.json; any value makes transformers 4.x rebuild the "
            "fast tokenizer from the slow one" if ctx.sp else "a space is added before every text")


def _legacy(v, ctx) -> str | None:
    if not ctx.sp or v is _ABSENT or v is None or v is True:
        return None
    return ("Llama's slow tokenizer and transformers 5's LlamaTokenizer then drop the dummy prefix after special "
            "tokens: a template's '<s>[INST]' encodes unlike Meta's chat format")


def _tokenizer_class(v, ctx) -> str | None:
    if v is _ABSENT or v in _FAST_CLASSES or v in _LLAMA_CLASSES:
        return None
    return f"transformers builds {v!r}, not a Llama tokenizer"


def _special_list(v, ctx) -> str | None:
    if v is _ABSENT or v is None:
        return None
    items = v if isinstance(v, list) else list(v.values()) if isinstance(v, dict) else [v]
    names = [x.get("content") if isinstance(x, dict) else x for x in items]
    known = set(ctx.meta.special_tokens) | _codellama_pieces(ctx)
    odd = [n for n in names if n not in known]
    return f"{odd} become special tokens: text holding them encodes differently" if odd else None


def _codellama_pieces(ctx: Ctx) -> set[str]:
    has = ctx.sp and getattr(ctx.meta, "has_infill", False)
    return {"▁<PRE>", "▁<MID>", "▁<SUF>", "▁<EOT>"} if has else set()


def _infill_piece(piece: str):
    def bad(v, ctx):
        if v is _ABSENT or v is None or v == piece:
            return None
        return f"CodeLlamaTokenizer builds infilling prompts with {v!r}"
    return bad


FIELD_RULES: dict[str, FieldRule] = {
    "model_max_length": FieldRule("truncation=True cuts at it", _max_length),
    "clean_up_tokenization_spaces": FieldRule("decode clean-up", _clean_up),
    "add_bos_token": FieldRule("BOS on encode (Llama classes; 4.x)",
                               _must_be(True, why="encode() without Meta's BOS")),
    "add_eos_token": FieldRule("EOS on encode (Llama classes; 4.x)",
                               _must_be(False, why="encode() appends EOS; Meta's does not")),
    "add_prefix_space": FieldRule("leading space / slow rebuild", _prefix_space),
    "legacy": FieldRule("text after special tokens (slow / transformers 5 Llama classes)", _legacy),
    "padding_side": FieldRule("where padding goes", _must_be("right", why="batches padded on the left")),
    "truncation_side": FieldRule("which end truncation cuts", _must_be("right", why="truncation cuts the start")),
    "split_special_tokens": FieldRule("special-token text in input",
                                      _must_be(False, why="chat templates' special tokens are split into text")),
    "spaces_between_special_tokens": FieldRule("slow decode", _must_be(
        False, why="slow tokenizers put a space between special tokens on decode")),
    "model_input_names": FieldRule("what the tokenizer returns", _must_be(
        ["input_ids", "attention_mask"], why="the model is given other inputs")),
    "sp_model_kwargs": FieldRule("slow sentencepiece options", _must_be(
        {}, why="the slow tokenizer samples or changes sentencepiece's encoding")),
    "use_default_system_prompt": FieldRule("4.x default system prompt", _must_be(
        False, why="transformers 4.x inserts a default system prompt")),
    "tokenizer_class": FieldRule("which class transformers builds", _tokenizer_class),
    "additional_special_tokens": FieldRule("tokens never split", _special_list),
    "extra_special_tokens": FieldRule("tokens never split (transformers 5)", _special_list),
    "prefix_token": FieldRule("Code Llama infilling", _infill_piece("▁<PRE>")),
    "middle_token": FieldRule("Code Llama infilling", _infill_piece("▁<MID>")),
    "suffix_token": FieldRule("Code Llama infilling", _infill_piece("▁<SUF>")),
    "eot_token": FieldRule("Code Llama infilling", _infill_piece("▁<EOT>")),
    "fill_token": FieldRule("Code Llama infilling", _must_be("<FILL_ME>", why="another fill marker")),
}
# judged by their own checks (special tokens, added-token flags, chat template) or read by no tokenizer
JUDGED_ELSEWHERE = {"bos_token", "eos_token", "unk_token", "pad_token", "added_tokens_decoder", "chat_template"}
NO_EFFECT = {"name_or_path", "_name_or_path", "tokenizer_file", "special_tokens_map_file", "__type", "processor_class"}


def field_checks(ctx: Ctx) -> list[CheckResult]:
    """Every field of tokenizer_config.json and special_tokens_map.json, and the ones the official files set."""
    acc = Acc("tokenizer_config.json / special_tokens_map.json fields", 0,
              note="fields that change encoding, decoding, truncation or padding in transformers 4.x or 5.x, "
                   "against the release's official files and Meta's behaviour")
    unknown = []
    for fname, data in (("tokenizer_config.json", ctx.tokenizer_config), ("special_tokens_map.json", ctx.special_map)):
        official = official_tokenizer_file(ctx.release, fname) or {}
        if data is None:
            continue
        for key in sorted(set(data) | (set(official) & set(FIELD_RULES))):
            if key in JUDGED_ELSEWHERE or key in NO_EFFECT:
                continue
            rule = FIELD_RULES.get(key)
            if rule is None:
                unknown.append(f"{fname} {key}")
                continue
            _judge(acc, ctx, fname, key, rule, data.get(key, _ABSENT), official.get(key, _ABSENT))
    if unknown:
        acc.accept(f"{', '.join(unknown)} (unknown to this judge: no known effect on a Llama tokenizer)")
    return [acc.r]


def _shown(v) -> Any:
    return "absent" if v is _ABSENT else v


def _judge(acc: Acc, ctx: Ctx, fname: str, key: str, rule: FieldRule, value, official) -> None:
    why = rule.bad(value, ctx)
    label = f"{fname} {key}"
    if why is not None:
        off = "" if official is _ABSENT or official == value else f"; official {_shown(official)!r}"
        if official is not _ABSENT and rule.bad(official, ctx) is not None:
            off += " (the official repo ships this too; it differs from Meta all the same)"
        acc.add(f"{label} ({rule.does}): {why}{off}", "a value that keeps Meta's behaviour", _shown(value))
    elif official is _ABSENT and value is _ABSENT or official == value:
        acc.add(label, _shown(value), _shown(value))
    else:  # passes, unlike the official file: said in the report
        off_bad = official is not _ABSENT and rule.bad(official, ctx) is not None
        acc.accept(f"{label}={_shown(value)!r} (official {_shown(official)!r}"
                   + ("; the official value is the one that differs from Meta)" if off_bad else ")"))
