"""Which release a checkpoint is, and which twin (base or instruct): one decision for convert,
verify, the tokenizer check, to-meta and diagnose.

`identify()` takes what the Meta files say (params.json, shard count, tying, vocab, tokenizer kind),
the folder's name, the user's `--variant` / `--instruct` / `--base`, and optionally what an HF
folder claims about itself (`HFClaim`: its config, generation_config, tokenizer_config, names).
It answers with an `Identification`: the release (or none, for a shape no release has), every
candidate, the family, the RoPE scaling, the twin and why, and the evidence for each.

Nothing is picked silently:
- releases that convert differently (Llama 1 vs 2 7B, Llama 3.1 vs 3.3 70B) are told apart by the
  folder's name, else by what the HF folder claims (judge only), else `ambiguity` holds the one
  line every command prints ("pass --variant ID ...");
- the twin comes from --instruct/--base, else a folder name saying "instruct"/"chat"/"base", else
  the HF folder's own metadata (every fact that differs between the twins must name the same one:
  a mix is reported in `twin_mix`), else (convert, no HF folder yet) the release's own.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from .params import DEFAULT_ROPE_THETA, Arch, ParamsError, implied_arch
from .registry import FAMILY_FACTS, LLAMA3_VOCAB, LLAMA31_SCALING, RopeScaling, VariantSpec, get
from .rules import (family_by_traits, hf_rope_scaling, metadata_release, name_tokens, output_facts,
                    releases_matching, releases_named_by, rope_scaling_for)


class IdentifyError(ValueError):
    """A release question the files cannot answer (unknown --variant, releases that convert differently)."""


@dataclass(frozen=True)
class HFClaim:
    """What an HF folder says about itself, none of it trusted: it only chooses among answers the
    Meta files allow (which of several fitting releases, which twin), and the choice is reported."""

    config: Mapping
    generation: Mapping | None = None
    tokenizer_config: Mapping | None = None
    names: tuple[tuple[str, str], ...] = ()  # (where, text) that may name a release

    @classmethod
    def read(cls, hf_dir: Path) -> "HFClaim":
        """Read from a folder; OSError / json.JSONDecodeError are the caller's bad input."""
        hf_dir = Path(hf_dir)
        cfg = json.loads((hf_dir / "config.json").read_text())
        gen = _json_or_none(hf_dir / "generation_config.json")
        tok = _json_or_none(hf_dir / "tokenizer_config.json")
        names = []
        if isinstance(cfg.get("_name_or_path"), str) and cfg["_name_or_path"]:
            names.append(("config.json _name_or_path", cfg["_name_or_path"]))
        card = hf_dir / "README.md"
        if card.is_file():
            text = card.read_text(errors="replace")
            row = re.search(r"^\| release \| `([^`]+)`", text, re.M)  # llama-parity's model card
            if row:
                names.append(("README.md release row", row.group(1)))
            title = re.search(r"^# (.+)$", text, re.M)
            if title:
                names.append(("README.md title", title.group(1)))
        return cls(cfg, gen, tok, tuple(names))


def _json_or_none(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


@dataclass(frozen=True)
class Identification:
    release: VariantSpec | None  # None: a shape no release has (family facts from traits)
    family: str
    instruct: bool
    twin_reason: str  # why base or instruct, for the report
    rope_scaling: RopeScaling | None
    candidates: tuple[VariantSpec, ...] = ()  # releases the files fit (before the folder name chose)
    evidence: tuple[str, ...] = ()
    ambiguity: str | None = None  # the one line when releases that convert differently remain
    # Twin facts of the HF folder that disagree: ((field, "base"|"instruct"), ...), empty when one twin.
    twin_mix: tuple[tuple[str, str], ...] = ()
    tied: bool = False  # the tying the files showed (identified with it)

    def require(self) -> "Identification":
        """Self, or IdentifyError with the one line every command prints for an ambiguity."""
        if self.ambiguity:
            raise IdentifyError(self.ambiguity)
        return self

    @property
    def metadata_release(self) -> VariantSpec:
        """The release whose official files hold the chat metadata of the chosen twin."""
        return metadata_release(self.release, self.family, self.instruct)

    @property
    def label(self) -> str:
        facts = FAMILY_FACTS[self.family]
        if self.release is None:
            return facts.label
        return f"{facts.label} {self.release.size}" + (f" {facts.instruct_label}" if self.release.instruct else "")


def identify(params: Mapping, *, folder_name: str, num_shards: int, tied: bool, variant_id: str | None = None,
             instruct: bool | None = None, vocab_size: int | None = None, tokenizer_kind: str | None = None,
             hf_claim: HFClaim | None = None) -> Identification:
    """The release and twin of a checkpoint (see the module docstring for the rules)."""
    ev: list[str] = []
    arch = _arch_or_none(params)
    ambiguity = None
    if variant_id:
        try:
            spec = get(variant_id)
        except KeyError as e:
            raise IdentifyError(f"--variant: {e.args[0]}") from None
        cands: tuple[VariantSpec, ...] = (spec,)
        ev.append(f"release {variant_id} from --variant")
    else:
        spec, cands, ambiguity, named = _choose_release(arch, params, folder_name, num_shards, tied, vocab_size,
                                                        tokenizer_kind, hf_claim, ev)
    family = spec.family if spec is not None else _traits_family(params, tokenizer_kind, vocab_size, tied, ev)
    twin, why, mix = decide_twin(spec, family, folder_name, instruct, hf_claim, vocab_size,
                                 variant_given=bool(variant_id))
    if spec is not None and not variant_id and not named and spec.instruct != twin:
        # Twins with the same files (e.g. 3.1 8B and 3.1 8B Instruct): name the one chosen.
        spec = next((v for v in cands if v.instruct == twin and output_facts(v) == output_facts(spec)), spec)
    scaling = rope_scaling_for(params, spec, tied)
    if params.get("rope_scaling_factor") is not None and scaling is not None:
        ev.append(f"rope scaling factor {scaling.factor:g} from params.json")
    return Identification(spec, family, twin, why, scaling, tuple(cands), tuple(ev), ambiguity, mix, tied)


def _arch_or_none(params: Mapping) -> Arch | None:
    try:
        return implied_arch(params)
    except ParamsError:
        return None


def ambiguity_line(cands, folder_name: str) -> str:
    ids = ", ".join(v.id for v in cands)
    return (f"params.json fits several releases that convert differently ({ids}) and the folder name "
            f"{folder_name!r} names none of them: pass --variant ID (one of {ids}), or keep Meta's folder name")


def _choose_release(arch, params, folder, num_shards, tied, vocab, kind, claim, ev):
    """(release or None, candidates, ambiguity line or None, whether the folder's name chose)."""
    named = releases_named_by(folder)
    cands = releases_matching(arch, vocab) if arch is not None else []
    if not cands:
        spec = _custom_shape_release(params, named, num_shards, kind, folder, ev)
        return spec, (), None, spec is not None
    cands = [v for v in cands if v.num_shards == num_shards] or cands
    cands = [v for v in cands if v.tie_word_embeddings == tied] or cands
    by_name = [v for v in cands if v in named]
    if by_name:
        ev.append(f"params.json fits the released {by_name[0].id}; folder name {folder!r} picks it")
        return by_name[0], tuple(cands), None, True
    if len({output_facts(v) for v in cands}) > 1 and claim is not None:
        narrowed, why = _narrowed_by_claim(cands, claim)
        if narrowed and len({output_facts(v) for v in narrowed}) == 1:
            ev.append(f"params.json fits {', '.join(v.id for v in cands)}; {why}")
            return narrowed[0], tuple(narrowed), None, False
    if len({output_facts(v) for v in cands}) > 1:
        return None, tuple(cands), ambiguity_line(cands, folder), False
    others = [v.id for v in cands[1:]]
    ev.append(f"params.json fits the released {cands[0].id}" + (
        f" (also {', '.join(others)}: same files; base or instruct decides the chat metadata)" if others else ""))
    return cands[0], tuple(cands), None, False


def _narrowed_by_claim(cands, claim: HFClaim) -> tuple[list[VariantSpec], str]:
    """The candidates the HF folder claims to be: a name it carries, else its config's context length
    and RoPE scaling (Llama 3 8B vs Guard 3 8B: 8192 vs 131072)."""
    for where, text in claim.names:
        hit = [v for v in cands if v in releases_named_by(text)]
        if hit:
            return hit, f"the HF folder's {where} ({text!r}) names {hit[0].id}"
    cfg = claim.config
    hit = [v for v in cands if cfg.get("max_position_embeddings") == v.facts.max_position_embeddings
           and hf_rope_scaling(cfg) == v.rope_scaling]
    ids = ", ".join(v.id for v in hit)
    return hit, (f"the HF config's context length {cfg.get('max_position_embeddings')} and RoPE scaling fit {ids} "
                 "only")


def _custom_shape_release(params, named, num_shards, kind, folder, ev) -> VariantSpec | None:
    """A shape no release has: the folder's release lends its facts when its traits agree."""
    scaled = bool(params.get("use_scaled_rope", False))
    theta = _float(params.get("rope_theta"), DEFAULT_ROPE_THETA)
    for spec in sorted(named, key=lambda v: v.num_shards != num_shards):  # MP8 vs MP16: the shard count
        s = spec.arch
        if (kind is None or spec.facts.tokenizer == kind) and s.use_scaled_rope == scaled and s.rope_theta == theta:
            ev.append(f"shape not in the registry; folder name {folder!r} names {spec.id}, "
                      "whose facts (rope scaling, context, special tokens) are used")
            return spec
    return None


def _float(v, default: float) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else default


def _traits_family(params, kind, vocab, tied, ev) -> str:
    """The family of a shape no release has; a scaled model with tied embeddings is Llama 3.2."""
    vocab = vocab if vocab is not None else params.get("vocab_size", -1)
    fam = family_by_traits(rope_theta=_float(params.get("rope_theta"), DEFAULT_ROPE_THETA),
                           scaling=LLAMA31_SCALING if params.get("use_scaled_rope") else None,
                           norm_eps=_float(params.get("norm_eps"), 1e-5), tokenizer=kind,
                           vocab_size=vocab if isinstance(vocab, int) else -1)
    if fam == "llama3.1" and tied:
        ev.append("tied embeddings with scaled RoPE: a Llama 3.2 model (rope factor 32)")
        return "llama3.2"
    ev.append(f"shape not in the registry; {FAMILY_FACTS[fam].label} assumed from structural traits")
    return fam


# --- base or instruct --------------------------------------------------------------------------------

def rebase_official_ids(ids, vocab: int | None):
    """Official token ids (the real 128256-word tokenizer's) onto a checkpoint's vocabulary: Llama 3's
    special tokens follow the BPE ranks, so a smaller tokenizer (the tiny test ones) shifts them."""
    def one(i):
        return i + vocab - LLAMA3_VOCAB if vocab and isinstance(i, int) and i >= 128000 else i
    return [one(i) for i in ids] if isinstance(ids, list) else one(ids)


def token_ids(v):
    """Token id(s) as a sorted list: an int and a one-element list mean the same stop set."""
    if v is None:
        return None
    return sorted(v) if isinstance(v, list) else [v]


# transformers' GenerationConfig defaults: what an absent key means.
GENERATION_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_p": 1.0, "max_length": 20}


def expects_chat_template(family: str, instruct: bool) -> bool:
    """Whether a conversion carries a chat template: chat/instruct models (Llama 1 had none) and
    Llama Guard 3, whose moderation prompt is its template."""
    return family == "llama-guard-3" or (instruct and family != "llama1")


def eos_token_name(family: str, instruct: bool) -> str | None:
    """tokenizer_config.json's eos_token for Llama 3.x: <|eot_id|> for instruct and Guard, else
    <|end_of_text|>; None for the sentencepiece families (</s> either way)."""
    if FAMILY_FACTS[family].tokenizer != "tiktoken":
        return None
    return "<|eot_id|>" if instruct or family == "llama-guard-3" else "<|end_of_text|>"


def twin_facts(spec: VariantSpec | None, family: str, instruct: bool, vocab: int | None) -> dict[str, object]:
    """Every HF metadata fact that may differ between a release's base and instruct twins, as the
    official files (and the family's template and eos rules) of that twin have them."""
    rel = metadata_release(spec, family, instruct)
    from . import official_file

    cfg = official_file(rel.id, "config.json") or {}
    gen = official_file(rel.id, "generation_config.json") or {}
    out: dict[str, object] = {f"config.json {k}": token_ids(rebase_official_ids(cfg.get(k), vocab))
                              for k in ("bos_token_id", "eos_token_id")}
    out.update({f"generation_config.json {k}": token_ids(rebase_official_ids(gen.get(k), vocab))
                for k in ("bos_token_id", "eos_token_id")})
    out.update({f"generation_config.json {k}": gen.get(k, d) for k, d in GENERATION_DEFAULTS.items()})
    out["tokenizer_config.json chat_template"] = expects_chat_template(family, instruct)
    out["tokenizer_config.json eos_token"] = eos_token_name(family, instruct)
    return out


def claimed_facts(claim: HFClaim) -> dict[str, object]:
    """The same facts as the HF folder states them (absent files state nothing)."""
    cfg, gen, tok = claim.config, claim.generation, claim.tokenizer_config
    out: dict[str, object] = {f"config.json {k}": token_ids(cfg.get(k)) for k in ("bos_token_id", "eos_token_id")}
    if gen is not None:
        out.update({f"generation_config.json {k}": token_ids(gen.get(k)) for k in ("bos_token_id", "eos_token_id")})
        out.update({f"generation_config.json {k}": gen.get(k, d) for k, d in GENERATION_DEFAULTS.items()})
    if tok is not None:
        out["tokenizer_config.json chat_template"] = bool(tok.get("chat_template"))
        eos = tok.get("eos_token")
        out["tokenizer_config.json eos_token"] = eos.get("content") if isinstance(eos, Mapping) else eos
    return out


def folder_says_twin(folder_name: str) -> bool | None:
    """True when the folder's name says instruct/chat, False when it says base, else None."""
    tokens = name_tokens(folder_name)
    if any(t in ("instruct", "chat") for t in tokens):
        return True
    return False if "base" in tokens else None


def decide_twin(spec, family, folder_name, instruct, claim, vocab, *, variant_given=False) -> tuple[bool, str, tuple]:
    """(instruct, why, mix): the user's flag (--instruct/--base, or a --variant id, which names a
    twin), else the folder's name, else the HF folder's own metadata, else the release's own twin."""
    if instruct is not None:
        return bool(instruct), f"{'--instruct' if instruct else '--base'} given", ()
    if variant_given:
        return spec.instruct, f"--variant {spec.id} is {'an instruct' if spec.instruct else 'a base'} release", ()
    said = folder_says_twin(folder_name)
    if said is not None:
        return said, f"the folder name {folder_name!r} says {'instruct' if said else 'base'}", ()
    default = spec.instruct if spec is not None else False
    if claim is None:
        return default, (f"the release {spec.id} is {'an instruct' if default else 'a base'} model" if spec
                         else "no --instruct/--base and the folder name does not say: base"), ()
    return _twin_from_claim(spec, family, default, claim, vocab)


def _twin_from_claim(spec, family, default, claim, vocab) -> tuple[bool, str, tuple]:
    base, inst = twin_facts(spec, family, False, vocab), twin_facts(spec, family, True, vocab)
    got = claimed_facts(claim)
    telling = [k for k in got if base.get(k) != inst.get(k)]
    says = {k: ("instruct" if got[k] == inst.get(k) else "base")
            for k in telling if got[k] in (base.get(k), inst.get(k))}
    votes = set(says.values())
    name = {False: metadata_release(spec, family, False).id, True: metadata_release(spec, family, True).id}
    if not telling:
        return default, "base and instruct twins have the same metadata here", ()
    if len(votes) == 1:
        twin = votes == {"instruct"}
        return twin, (f"the HF folder's own metadata ({', '.join(says)}) is the "
                      f"{'instruct' if twin else 'base'} twin's ({name[twin]})"), ()
    if not votes:
        return default, (f"the HF folder's twin metadata ({', '.join(telling)}) matches neither twin: judged as "
                         f"{name[default]}"), ()
    # A mix fails (the twin check names each side's fields); the rest is judged as the release's own twin.
    return default, (f"the HF folder mixes the two twins' metadata: judged as {name[default]}, "
                     f"the {'instruct' if default else 'base'} twin of the release"), tuple(says.items())
