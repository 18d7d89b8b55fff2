"""A catalog of conversion bugs, applied to a correct HF directory, to prove the checks bite.

Each mutation reproduces a bug that has shipped (or easily would) in real conversions: weights in
the wrong layout, RoPE or norm settings of another release, and metadata that leaves the logits
alone but breaks users (context length, dtype label, tie flag, bos/eos ids, generation defaults).
The test suite applies each to a fresh conversion of the layouts where its bug class can show and
asserts that `verify` fails in every check the entry names. Each entry carries its repair (how
`diagnose` undoes it, using only facts of the Meta files), so diagnose needs no table of its own.
Tokenizer faults (a merge at another priority, a token's bytes, an added token's flags, fields that
change truncation, decoding or padding) are entries too, named by the tokenizer rows that catch them.
Benign changes (re-sharding, tensor order, an exact upcast, JSON formatting, version stamps, the
transformers 5 spelling, a pad token Meta reserves for padding, explicit tokenizer defaults) must pass.
Mutations edit the HF output (a copy), never the reference.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file


# The catalog keeps its own copies of the rotary row orders (not converter.transforms), so that a
# bug in the converter's permutation cannot make a mutation silently equal to the correct output.
def rows_meta_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    o, i = w.shape
    return w.view(n_heads, o // n_heads // 2, 2, i).transpose(1, 2).reshape(o, i)


def rows_hf_to_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    o, i = w.shape
    return w.view(n_heads, 2, o // n_heads // 2, i).transpose(1, 2).reshape(o, i)


# --- editing an HF folder ---------------------------------------------------------------------------

def _load_all(hf_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def save_tensors(hf_dir: Path, tensors: dict[str, torch.Tensor], max_per_file: int | None = None) -> None:
    """Rewrite every weight file: one file, or files of `max_per_file` tensors each (with an index)."""
    for f in list(hf_dir.glob("*.safetensors")) + list(hf_dir.glob("*.safetensors.index.json")):
        f.unlink()
    names = list(tensors)
    groups = [names] if max_per_file is None else [names[i:i + max_per_file] for i in range(0, len(names), max_per_file)]
    if len(groups) == 1:
        save_file({k: tensors[k].contiguous() for k in names}, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: tensors[k].contiguous() for k in group}, str(hf_dir / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in group})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (hf_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def edit_tensors(hf_dir: Path, edit: Callable[[str, torch.Tensor, dict], torch.Tensor | None]) -> None:
    """Replace each tensor for which `edit(name, tensor, config)` returns one; files keep their layout."""
    cfg = read_json(hf_dir, "config.json")
    for f in sorted(hf_dir.glob("*.safetensors")):
        sd = load_file(str(f))
        out = {}
        for k, v in sd.items():
            nv = edit(k, v, cfg)
            out[k] = v if nv is None else nv.contiguous()
        save_file(out, str(f), metadata={"format": "pt"})


def read_json(hf_dir: Path, name: str) -> dict:
    return json.loads((hf_dir / name).read_text())


def edit_json(hf_dir: Path, name: str, edit: Callable[[dict], None]) -> None:
    cfg = read_json(hf_dir, name)
    edit(cfg)
    (hf_dir / name).write_text(json.dumps(cfg, indent=2))


def edit_config(hf_dir: Path, edit: Callable[[dict], None]) -> None:
    edit_json(hf_dir, "config.json", edit)


def _setter(name: str, key: str, value) -> Callable[[Path], None]:
    return lambda hf: edit_json(hf, name, lambda c: c.__setitem__(key, value))


# --- bugs in the weights ----------------------------------------------------------------------------

def _permute_k(src_heads: str, dst_heads: str) -> Callable[[Path], None]:
    """k_proj rows re-permuted: undone with the heads of `src_heads`, redone with `dst_heads`."""
    def run(hf_dir: Path) -> None:
        edit_tensors(hf_dir, lambda k, v, c: rows_meta_to_hf(rows_hf_to_meta(v, c[src_heads]), c[dst_heads])
                     if k.endswith("k_proj.weight") else None)
    return run


def _unpermute(proj: str, heads_key: str, inverse: bool = False) -> Callable[[Path], None]:
    """q/k rows left in (or, inverse, restored from) Meta's interleaved rotary layout."""
    move = rows_meta_to_hf if inverse else rows_hf_to_meta

    def run(hf_dir: Path) -> None:
        edit_tensors(hf_dir, lambda k, v, c: move(v, c[heads_key]) if k.endswith(f"{proj}.weight") else None)
    return run


def _swap_pair(a: str, b: str) -> Callable[[Path], None]:
    """Exchange every tensor named *a* with its twin named *b* (same layer); its own inverse."""
    def run(hf_dir: Path) -> None:
        sd = _load_all(hf_dir)
        save_tensors(hf_dir, {k: sd[k.replace(a, b)] if a in k else sd[k.replace(b, a)] if b in k else v
                              for k, v in sd.items()})
    return run


def _tie_on_untied(hf_dir: Path) -> None:
    sd = _load_all(hf_dir)
    del sd["lm_head.weight"]
    save_tensors(hf_dir, sd)
    edit_config(hf_dir, lambda c: c.__setitem__("tie_word_embeddings", True))


def _rounded_to_bf16(hf_dir: Path) -> None:
    edit_tensors(hf_dir, lambda k, v, c: v.to(torch.bfloat16).to(v.dtype))


def _kv_heads_duplicated(hf_dir: Path) -> None:
    """405B MP16's replicated kv heads kept twice (config and tensors agree with each other)."""
    def dup(k, v, c):
        if k.endswith(("k_proj.weight", "v_proj.weight")):
            hd = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
            return v.view(-1, 1, hd, v.shape[1]).expand(-1, 2, hd, v.shape[1]).reshape(-1, v.shape[1])
    edit_tensors(hf_dir, dup)
    edit_config(hf_dir, lambda c: c.__setitem__("num_key_value_heads", 2 * c["num_key_value_heads"]))


# --- byte faults no prompt may reach: only the byte check (every element, exact_bytes.py) sees them --

def _edit_one(name: str, change: Callable[[torch.Tensor, dict], None]) -> Callable[[Path], None]:
    """Change tensor `name` in place (a copy of it) with change(tensor, config)."""
    def edit(k, v, c):
        if k == name:
            v = v.clone()
            change(v, c)
            return v
    return lambda hf: edit_tensors(hf, edit)


def _special(c: dict, offset: int) -> int:
    """Id of Llama 3's special token `offset` (128000 + offset in the real vocabulary): special
    tokens follow the BPE ranks, 256 of them at the end of the (tiny or real) vocabulary."""
    return c["vocab_size"] - 256 + offset


def _edit_whole(name: str, change: Callable[[torch.Tensor, dict], torch.Tensor]) -> Callable[[Path], None]:
    """Replace tensor `name` by change(tensor, config)."""
    return lambda hf: edit_tensors(hf, lambda k, v, c: change(v, c) if k == name else None)


def _swap_rows(i, j) -> Callable[[torch.Tensor, dict], None]:
    def run(v, c):
        a, b = i(c), j(c)
        v[[a, b]] = v[[b, a]]
    return run


def _flip_bit(v: torch.Tensor, c: dict) -> None:
    bits = v.view({2: torch.int16, 4: torch.int32}[v.element_size()])
    bits[1, 2] ^= 1  # the lowest mantissa bit of one weight


def _nan_row(v: torch.Tensor, c: dict) -> None:
    v[c["vocab_size"] // 2 + 7, 0] = float("nan")


def _one_ulp(v: torch.Tensor, c: dict) -> None:
    v[3] = torch.nextafter(v[3], torch.tensor(float("inf"), dtype=v.dtype))


def _mid(c: dict) -> int:
    return c["num_hidden_layers"] // 2


def _down_proj_bit(hf: Path) -> None:
    _edit_one(f"model.layers.{_mid(read_json(hf, 'config.json'))}.mlp.down_proj.weight", _flip_bit)(hf)


def _layer_tensor(layer: Callable[[dict], int], suffix: str, change: Callable[[torch.Tensor, dict], torch.Tensor]):
    """Replace model.layers.{layer(config)}.{suffix} by change(tensor, config) (a new tensor)."""
    def run(hf: Path) -> None:
        name = f"model.layers.{layer(read_json(hf, 'config.json'))}.{suffix}"
        edit_tensors(hf, lambda k, v, c: change(v, c) if k == name else None)
    return run


def _kv_heads_exchanged(v: torch.Tensor, c: dict) -> torch.Tensor:
    """kv heads 0 and 1 exchanged (their rows in k_proj or v_proj)."""
    hd = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    heads = v.view(-1, hd, v.shape[1]).clone()
    heads[[0, 1]] = heads[[1, 0]]
    return heads.reshape(v.shape)


def _kv_heads_swapped(hf: Path) -> None:
    for proj in ("k_proj", "v_proj"):
        _layer_tensor(_mid, f"self_attn.{proj}.weight", _kv_heads_exchanged)(hf)


def _gate_up_one_layer(hf: Path) -> None:
    """Only the last layer's w1/w3 exchanged (a per-layer key table with one entry wrong)."""
    sd = _load_all(hf)
    last = read_json(hf, "config.json")["num_hidden_layers"] - 1
    g, u = (f"model.layers.{last}.mlp.{n}_proj.weight" for n in ("gate", "up"))
    sd[g], sd[u] = sd[u], sd[g]
    save_tensors(hf, sd)


def _norm_of_layer_0(hf: Path) -> None:
    """The last layer's attention norm taken from layer 0 (a layer index off in the key table)."""
    sd = _load_all(hf)
    last = read_json(hf, "config.json")["num_hidden_layers"] - 1
    sd[f"model.layers.{last}.input_layernorm.weight"] = sd["model.layers.0.input_layernorm.weight"].clone()
    save_tensors(hf, sd)


def _layers_exchanged(hf: Path) -> None:
    """Decoder layers 0 and 1 exchanged whole (a layer numbering off, or shards concatenated in the
    wrong order)."""
    sd = _load_all(hf)
    swap = {"model.layers.0.": "model.layers.1.", "model.layers.1.": "model.layers.0."}
    out = {}
    for k, v in sd.items():
        prefix = next((a for a in swap if k.startswith(a)), None)
        out[swap[prefix] + k[len(prefix):] if prefix else k] = v
    save_tensors(hf, out)


def _transposed_reshaped(v: torch.Tensor, c: dict) -> torch.Tensor:
    """The transpose of the matrix read back in the original shape (a missing .t() before a view)."""
    return v.t().contiguous().reshape(v.shape)


def _attention_bias(hf: Path) -> None:
    """q_proj biases written (and attention_bias set) for a model that has none."""
    c = read_json(hf, "config.json")
    sd = _load_all(hf)
    g = torch.Generator().manual_seed(0)
    for i in range(c["num_hidden_layers"]):
        w = sd[f"model.layers.{i}.self_attn.q_proj.weight"]
        sd[f"model.layers.{i}.self_attn.q_proj.bias"] = torch.randn(w.shape[0], generator=g).to(w.dtype)
    save_tensors(hf, sd)
    edit_config(hf, lambda cfg: cfg.__setitem__("attention_bias", True))


def _extra_layer(hf: Path) -> None:
    """A decoder layer's tensor beyond num_hidden_layers (a leftover of a deeper model): from_pretrained
    ignores it with a warning, the folder is not the release."""
    c = read_json(hf, "config.json")
    sd = _load_all(hf)
    n = c["num_hidden_layers"]
    sd[f"model.layers.{n}.mlp.down_proj.weight"] = sd[f"model.layers.{n - 1}.mlp.down_proj.weight"].clone()
    save_tensors(hf, sd)


def _stored_half_labelled_bf16(hf: Path) -> None:
    """fp32 weights rounded to float16 and stored so, the label saying bfloat16 (the dtype a loader
    would then cast them to: another rounding than the one declared)."""
    edit_tensors(hf, lambda k, v, c: v.half())
    edit_config(hf, lambda c: c.__setitem__("torch_dtype", "bfloat16"))


# --- bugs in config.json and generation_config.json -------------------------------------------------

def _rope_field(key: str, value) -> Callable[[Path], None]:
    def edit(c):
        if value is None:
            c["rope_scaling"].pop(key)
        else:
            c["rope_scaling"][key] = value
    return lambda hf: edit_config(hf, edit)


def _to_transformers5(c: dict) -> None:
    """The transformers 5 spelling of the same config: rope_parameters (theta inside) and dtype."""
    rope = dict(c.pop("rope_scaling", None) or {"rope_type": "default"})
    rope["rope_theta"] = c.pop("rope_theta", 10000.0)
    c["rope_parameters"] = rope
    c["dtype"] = c.pop("torch_dtype")


def _theta_10000_in_rope_parameters(c: dict) -> None:
    _to_transformers5(c)
    c["rope_parameters"]["rope_theta"] = 10000.0


def _eos_ids(hf_dir: Path, ids: Callable[[object], object]) -> None:
    for name in ("config.json", "generation_config.json"):
        edit_json(hf_dir, name, lambda c: c.__setitem__("eos_token_id", ids(c["eos_token_id"])))


def _base_eos(hf_dir: Path) -> None:
    _eos_ids(hf_dir, lambda e: e[0] if isinstance(e, list) else e)  # <|end_of_text|> alone


def _instruct_eos(hf_dir: Path) -> None:
    _eos_ids(hf_dir, lambda e: [e, e + 7, e + 8])  # + <|eom_id|>, <|eot_id|> on a base model


def _greedy_defaults(c: dict) -> None:
    c["do_sample"] = False
    c.pop("temperature", None)
    c.pop("top_p", None)


# --- repairs: how diagnose undoes a bug, from the Meta files' facts alone -----------------------------

# --- bugs in the tokenizer files (tokenizer.json, tokenizer_config.json, special_tokens_map.json) ------

def _tokenizer_json(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def run(hf: Path) -> None:
        t = read_json(hf, "tokenizer.json")
        change(t)
        (hf / "tokenizer.json").write_text(json.dumps(t, ensure_ascii=False))
    return run


def _tokenizer_config(**fields) -> Callable[[Path], None]:
    """tokenizer_config.json fields set (a value None: the field removed)."""
    def change(c: dict) -> None:
        for k, v in fields.items():
            c.pop(k) if v is None else c.__setitem__(k, v)
    return lambda hf: edit_json(hf, "tokenizer_config.json", change)


def _merge_moved(t: dict) -> None:
    """A merge from the middle of the list (rarely used) moved to the lowest priority: it still
    exists, so a corpus encodes the same almost everywhere."""
    merges = t["model"]["merges"]
    merges.append(merges.pop(len(merges) // 2))


def _merge_dropped(t: dict) -> None:
    """Every merge that forms one token (the middle merge's) removed."""
    merges = t["model"]["merges"]
    joined = "".join(merges[len(merges) // 2])
    merges[:] = [m for m in merges if "".join(m) != joined]


def _token_ids_exchanged(t: dict) -> None:
    """Two ordinary tokens exchange ids: each of the two ids decodes to other bytes."""
    vocab = t["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]


def _added_flag(content: str, key: str, value: bool, where: str) -> Callable[[Path], None]:
    """One added token's flag (special, normalized, ...) changed in tokenizer.json's added_tokens
    ("json") or tokenizer_config.json's added_tokens_decoder ("config")."""
    def flip(tokens) -> None:
        for tok in tokens:
            if tok["content"] == content:
                tok[key] = value
    if where == "json":
        return _tokenizer_json(lambda t: flip(t["added_tokens"]))
    return lambda hf: edit_json(hf, "tokenizer_config.json", lambda c: flip(c["added_tokens_decoder"].values()))


def _pad_token(token: str) -> Callable[[Path], None]:
    """pad_token set in tokenizer_config.json and special_tokens_map.json alike."""
    def run(hf: Path) -> None:
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            edit_json(hf, name, lambda c: c.__setitem__("pad_token", token))
    return run


def _meta_params(meta_dir: Path) -> dict:
    return json.loads((Path(meta_dir) / "params.json").read_text())


def _set_theta(hf: Path, meta: Path, rope) -> None:
    theta = float(_meta_params(meta).get("rope_theta", 10000.0))

    def edit(c):
        c["rope_theta"] = theta
        if isinstance(c.get("rope_parameters"), dict):
            c["rope_parameters"]["rope_theta"] = theta
    edit_config(hf, edit)


def _set_scaling(hf: Path, meta: Path, rope) -> None:
    def edit(c):
        want = None if rope is None else {
            "factor": rope.factor, "low_freq_factor": rope.low_freq_factor, "high_freq_factor": rope.high_freq_factor,
            "original_max_position_embeddings": rope.original_max_position_embeddings, "rope_type": "llama3"}
        if isinstance(c.get("rope_parameters"), dict):
            c["rope_parameters"] = {"rope_theta": c["rope_parameters"].get("rope_theta", 10000.0),
                                    **(want or {"rope_type": "default"})}
        else:
            c["rope_scaling"] = want
    edit_config(hf, edit)


def _set_eps(hf: Path, meta: Path, rope) -> None:
    edit_config(hf, lambda c: c.__setitem__("rms_norm_eps", float(_meta_params(meta).get("norm_eps", 1e-5))))


def _restore_output(hf: Path, meta: Path, rope) -> None:
    """lm_head from Meta's output.weight (merged on dim 0, as Meta's column-parallel output is)."""
    shards = sorted(Path(meta).glob("consolidated.*.pth"), key=lambda p: int(p.name.split(".")[1]))
    out = torch.cat([torch.load(p, map_location="cpu", mmap=True, weights_only=True)["output.weight"] for p in shards])
    sd = _load_all(hf)
    sd["lm_head.weight"] = out.to(sd["model.embed_tokens.weight"].dtype)
    save_tensors(hf, sd)
    edit_config(hf, lambda c: c.__setitem__("tie_word_embeddings", False))


def _always(cfg: dict) -> bool:
    return True


def _gqa(c: dict) -> bool:
    # A silent bug only where the wrong head count still divides k's rows (else it crashes loudly).
    heads, kv = c["num_attention_heads"], c["num_key_value_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    return kv != heads and (kv * head_dim) % (2 * heads) == 0


def _names(cfg: dict) -> set:
    return cfg.get("__tensor_names__", set())


@dataclass(frozen=True)
class Repair:
    diagnosis: str  # what diagnose reports when this repair restores parity
    fix: Callable[[Path, Path, object], None]  # (HF scratch copy, Meta dir, expected RoPE scaling)
    applies: Callable[[dict], bool] = _always  # on the HF config (+ "__tensor_names__")
    # Where this bug first shows in diagnose's stage comparison ("attention", "feed-forward",
    # "logits", "far"): a repair is only tried where its bug could have made the first divergence.
    shows_in: tuple[str, ...] = ("attention", "feed-forward", "logits", "far")


def _tensor_fix(run: Callable[[Path], None]) -> Callable[[Path, Path, object], None]:
    return lambda hf, meta, rope: run(hf)


FIX_K_HEADS = Repair("wk permuted with n_heads instead of n_kv_heads",
                     _tensor_fix(_permute_k("num_attention_heads", "num_key_value_heads")), _gqa, ("attention",))
FIX_Q = Repair("wq left in Meta's interleaved rotary layout (not permuted)",
               _tensor_fix(_unpermute("q_proj", "num_attention_heads", inverse=True)), shows_in=("attention",))
FIX_K = Repair("wk left in Meta's interleaved rotary layout (not permuted)",
               _tensor_fix(_unpermute("k_proj", "num_key_value_heads", inverse=True)), shows_in=("attention",))
FIX_GATE_UP = Repair("w1/w3 (gate/up) swapped", _tensor_fix(_swap_pair("mlp.gate_proj", "mlp.up_proj")),
                     shows_in=("feed-forward",))
FIX_NORMS = Repair("attention_norm/ffn_norm swapped",
                   _tensor_fix(_swap_pair(".input_layernorm", ".post_attention_layernorm")),
                   shows_in=("attention", "feed-forward"))
FIX_THETA = Repair("rope_theta differs from params.json", _set_theta, shows_in=("attention", "far"))
FIX_SCALING = Repair("RoPE scaling missing or with the wrong factor for this release", _set_scaling,
                     shows_in=("attention", "far"))
FIX_EPS = Repair("rms_norm_eps differs from params.json", _set_eps)
FIX_TIE = Repair("tie_word_embeddings lost (lm_head not the embedding)",
                 lambda hf, meta, rope: edit_config(hf, lambda c: c.__setitem__("tie_word_embeddings", True)),
                 lambda c: "lm_head.weight" not in _names(c), ("logits",))
FIX_UNTIE = Repair("tie_word_embeddings set on an untied model (lm_head must be Meta's output.weight)",
                   _restore_output, lambda c: "lm_head.weight" not in _names(c) and bool(c.get("tie_word_embeddings")),
                   ("logits",))


# --- the catalog ------------------------------------------------------------------------------------

# Tiny layouts where the bug classes show: Llama 3.2 (tied, RoPE factor 32, GQA, instruct metadata)
# and Llama 3.1 (untied, factor 8, GQA, base metadata). MHA, sharding and Llama 1/2 specifics are
# the converter's (test_sharding, test_model_parity): a mutation edits the HF output, where they
# leave no trace of their own.
L32, L31 = "llama3.2-1b-instruct", "llama3.1-8b"
# Checks that need the models run; the others read files only.
MODEL_CHECKS = ("logits (fp32)", "far positions", "kv-cache decode", "greedy generation", "model checks")


@dataclass(frozen=True)
class Mutation:
    name: str
    bug: str
    apply: Callable[[Path], None]
    caught_by: tuple[str, ...]  # every one of these checks must fail
    layouts: tuple[str, ...]  # tiny releases where the bug class shows
    repair: Repair | None = None  # None: the failing metadata check names the field and its value

    @property
    def needs_model(self) -> bool:
        return any(c in MODEL_CHECKS for c in self.caught_by)

    @property
    def tokenizer(self) -> bool:
        """The fault is in the tokenizer files: judged with the tokenizer check on."""
        return any(c.startswith(TOKENIZER_PREFIX) for c in self.caught_by)

    @property
    def in_weights(self) -> bool:
        """The weight files are changed: their bytes, names or shapes."""
        return any(c in (_EXACT, "weights: finite", "tensors: names", "tensors: shapes") for c in self.caught_by)

    @property
    def in_metadata(self) -> bool:
        """The weights are Meta's (exact copies would pass): the fault is in what the HF folder says
        about them (config, generation_config, names), which each model path reads its own way
        (transformers' from_pretrained, the streamed layers)."""
        return _EXACT not in self.caught_by

    def applies(self, cfg: dict) -> bool:
        """Whether this HF config is one where the bug can show (its repair's condition, e.g. GQA)."""
        return self.repair is None or self.repair.applies(cfg)


def _m(name, bug, apply, caught_by, layouts, repair=None) -> Mutation:
    return Mutation(name, bug, apply, tuple(caught_by), tuple(layouts), repair)


_LOGITS, _FAR = "logits (fp32)", "far positions"
_RS = "config: rope scaling factor"
_EXACT = "weights: exact copies"
_GEN_EOS, _CFG_EOS = "generation_config: eos_token_id", "config: eos_token_id"
# tokenizer checks, as verify's table names them (tokenizer_check.py)
_MERGES, _VOCAB = "tokenizer: every merge at its priority (tokenizer.json merges)", \
    "tokenizer: whole vocabulary (every id's bytes / piece)"
_FLAGS, _BOS = "tokenizer: added tokens: special flags", "tokenizer: BOS from tokenizer.json post_processor (exactly once)"
_SPECIAL = "tokenizer: special tokens in tokenizer_config.json / special_tokens_map.json"
_FIELDS = "tokenizer: tokenizer_config.json / special_tokens_map.json fields"
TOKENIZER_PREFIX = "tokenizer: "

CATALOG: tuple[Mutation, ...] = (
    # weights
    _m("k_permuted_with_n_heads", "wk permuted with n_heads instead of n_kv_heads (GQA models)",
       _permute_k("num_key_value_heads", "num_attention_heads"), [_LOGITS, _EXACT], [L31], FIX_K_HEADS),
    _m("q_not_permuted", "wq left in Meta's interleaved rotary layout", _unpermute("q_proj", "num_attention_heads"),
       [_LOGITS, _EXACT], [L32], FIX_Q),
    _m("k_not_permuted", "wk left in Meta's interleaved rotary layout", _unpermute("k_proj", "num_key_value_heads"),
       [_LOGITS, _EXACT], [L31], FIX_K),
    _m("gate_up_swapped", "w1/w3 mapped to up/gate the wrong way round", _swap_pair("mlp.gate_proj", "mlp.up_proj"),
       [_LOGITS, _EXACT], [L31], FIX_GATE_UP),
    _m("norms_swapped", "attention_norm/ffn_norm mapped to the wrong HF norm",
       _swap_pair(".input_layernorm", ".post_attention_layernorm"), [_LOGITS, "weights: exact copies"], [L32],
       FIX_NORMS),
    _m("tied_on_untied", "tie_word_embeddings set and lm_head dropped on an untied model (Guard 3 1B as a 3.2 1B)",
       _tie_on_untied, [_LOGITS, "config: tie_word_embeddings", "tensors: names"], [L31], FIX_UNTIE),
    _m("rounded_to_bf16", "weights rounded through bf16 but stored and labelled float32",
       _rounded_to_bf16, [_LOGITS, "weights: exact copies"], [L31]),
    _m("kv_heads_duplicated", "replicated kv heads of the 405B MP16 layout kept twice",
       _kv_heads_duplicated, ["tensors: shapes", "config: num_key_value_heads"], [L31]),
    # byte faults in rows and elements no prompt reaches (two ordinary tokens, reserved special tokens)
    _m("embedding_rows_swapped", "two ordinary tokens' embedding rows exchanged",
       _edit_one("model.embed_tokens.weight", _swap_rows(lambda c: c["vocab_size"] // 3, lambda c: c["vocab_size"] // 3 + 1)),
       [_EXACT], [L31, L32]),
    _m("reserved_special_row_zeroed", "a reserved special token's embedding row zeroed",
       _edit_one("model.embed_tokens.weight", lambda v, c: v[_special(c, 250)].zero_()), [_EXACT], [L31]),
    _m("nan_in_unused_row", "a NaN in an embedding row no prompt uses",
       _edit_one("model.embed_tokens.weight", _nan_row), [_EXACT, "weights: finite"], [L32]),
    _m("special_rows_exchanged", "two special tokens' embedding rows exchanged (<|reserved_special_token_0|>, _1)",
       _edit_one("model.embed_tokens.weight", _swap_rows(lambda c: _special(c, 2), lambda c: _special(c, 3))),
       [_EXACT], [L31]),
    _m("bit_flipped_in_down_proj", "one bit flipped in one weight of a middle layer's w2 (down_proj)",
       _down_proj_bit, [_EXACT], [L31]),
    _m("output_rows_swapped", "two rows of the output matrix (lm_head) exchanged",
       _edit_one("lm_head.weight", _swap_rows(lambda c: c["vocab_size"] // 3, lambda c: c["vocab_size"] // 3 + 1)),
       [_EXACT], [L31]),
    _m("q_rows_permuted_in_head", "two q rows of one head exchanged (layer 0, head 0)",
       _edit_one("model.layers.0.self_attn.q_proj.weight", _swap_rows(lambda c: 0, lambda c: 1)), [_EXACT], [L32]),
    _m("norm_off_by_one_ulp", "one element of the final norm changed by 1 ulp",
       _edit_one("model.norm.weight", _one_ulp), [_EXACT], [L31]),
    _m("kept_fp32_norm_off_by_one_ulp", "bf16 matrices with float32 norms kept, one norm element 1 ulp off "
       "(float32's ulp: no model check can see it)",
       lambda hf: (_bf16_norms_kept_fp32(hf), _edit_one("model.norm.weight", _one_ulp)(hf)), [_EXACT], [L31]),
    # weights at the wrong place: a head, a layer, a matrix's orientation
    _m("kv_heads_exchanged", "kv heads 0 and 1 exchanged in a middle layer's wk and wv (heads regrouped)",
       _kv_heads_swapped, [_LOGITS, _EXACT], [L31]),
    _m("gate_up_swapped_in_one_layer", "w1/w3 exchanged in the last layer only (one key-table entry wrong)",
       _gate_up_one_layer, [_LOGITS, _EXACT], [L32]),
    _m("norm_from_another_layer", "the last layer's attention norm taken from layer 0",
       _norm_of_layer_0, [_LOGITS, _EXACT], [L31]),
    _m("layers_exchanged", "decoder layers 0 and 1 exchanged whole", _layers_exchanged, [_LOGITS, _EXACT], [L32]),
    _m("output_transposed_reshaped", "lm_head's transpose read back in lm_head's shape (a .t() lost before a view)",
       _edit_whole("lm_head.weight", _transposed_reshaped), [_LOGITS, _EXACT], [L31]),
    _m("o_proj_transposed", "a middle layer's wo transposed (square: the shapes cannot tell)",
       _layer_tensor(_mid, "self_attn.o_proj.weight", lambda v, c: v.t().contiguous()), [_LOGITS, _EXACT], [L31]),
    _m("attention_bias_added", "q_proj biases added and attention_bias set on a model without biases",
       _attention_bias, ["tensors: names"], [L32]),
    _m("extra_tensor_of_a_deeper_model", "a tensor of a layer beyond num_hidden_layers (ignored by loaders)",
       _extra_layer, ["tensors: names"], [L31]),
    _m("float16_labelled_bfloat16", "weights stored float16, the label bfloat16", _stored_half_labelled_bf16,
       ["config: dtype label"], [L31]),
    # RoPE and norms: they change the function
    _m("rope_factor_8_not_32", "Llama 3.2 rope scaling factor 8 instead of 32 (llama-models' hard-coded value)",
       _rope_field("factor", 8.0), [_FAR, _RS], [L32], FIX_SCALING),
    _m("rope_factor_32_not_8", "Llama 3.1 rope scaling factor 32 instead of 8", _rope_field("factor", 32.0),
       [_FAR, _RS], [L31], FIX_SCALING),
    _m("rope_scaling_dropped", "rope_scaling missing on a 3.1+ model", _setter("config.json", "rope_scaling", None),
       [_FAR, _RS], [L31], FIX_SCALING),
    _m("low_freq_factor_wrong", "rope_scaling low_freq_factor 2 instead of 1", _rope_field("low_freq_factor", 2.0),
       [_FAR, "config: rope_scaling.low_freq_factor"], [L31], FIX_SCALING),
    _m("high_freq_factor_wrong", "rope_scaling high_freq_factor 2 instead of 4", _rope_field("high_freq_factor", 2.0),
       [_FAR, "config: rope_scaling.high_freq_factor"], [L32], FIX_SCALING),
    _m("original_context_wrong", "rope_scaling original_max_position_embeddings 4096 instead of 8192",
       _rope_field("original_max_position_embeddings", 4096), [_FAR, "config: rope_scaling.original_max_position_embeddings"],
       [L31], FIX_SCALING),
    _m("low_freq_factor_missing", "rope_scaling without low_freq_factor (transformers cannot build the rope)",
       _rope_field("low_freq_factor", None), ["config: rope_scaling.low_freq_factor"], [L31], FIX_SCALING),
    _m("rope_theta_of_code_llama", "rope_theta 1e6 (Code Llama's) on a Llama 3.1 model",
       _setter("config.json", "rope_theta", 1000000.0), [_LOGITS, "config: rope_theta"], [L31], FIX_THETA),
    _m("rope_type_linear", "rope_scaling with rope_type linear instead of llama3 (another frequency rule)",
       _rope_field("rope_type", "linear"), [_LOGITS, _FAR, "config: rope_scaling.rope_type"], [L32], FIX_SCALING),
    _m("rope_theta_dropped", "rope_theta missing (falls back to 10000)",
       lambda hf: edit_config(hf, lambda c: c.pop("rope_theta")), [_LOGITS, "config: rope_theta"], [L31], FIX_THETA),
    _m("rope_parameters_theta_10000", "transformers 5 spelling (rope_parameters) with the default theta",
       lambda hf: edit_config(hf, _theta_10000_in_rope_parameters), [_LOGITS, "config: rope_theta"], [L32], FIX_THETA),
    _m("wrong_norm_eps", "rms_norm_eps of another Llama version", _setter("config.json", "rms_norm_eps", 1e-6),
       ["config: rms_norm_eps"], [L31], FIX_EPS),
    _m("untied_without_lm_head", "tie_word_embeddings lost on a tied model (random lm_head)",
       _setter("config.json", "tie_word_embeddings", False), [_LOGITS, "config: tie_word_embeddings"], [L32], FIX_TIE),
    # metadata that leaves the logits alone but breaks users
    _m("max_position_embeddings_of_llama3", "max_position_embeddings 8192 (Llama 3's) on a 3.1 model",
       _setter("config.json", "max_position_embeddings", 8192), ["config: max_position_embeddings"], [L31]),
    _m("dtype_label_float16", "torch_dtype float16 while the weights are float32 (transformers' script's label)",
       _setter("config.json", "torch_dtype", "float16"), ["config: dtype label"], [L31]),
    _m("base_eos_on_instruct", "an instruct model with the base eos (never stops at <|eot_id|>)", _base_eos,
       [_GEN_EOS, _CFG_EOS], [L32]),
    _m("instruct_eos_on_base", "a base model with the instruct eos list", _instruct_eos, [_GEN_EOS, _CFG_EOS], [L31]),
    _m("generation_eos_missing", "generation_config.json without eos_token_id",
       lambda hf: edit_json(hf, "generation_config.json", lambda c: c.pop("eos_token_id")), [_GEN_EOS], [L32]),
    _m("generation_eos_of_llama2", "generation_config eos_token_id 2 (Llama 2's </s>) on a Llama 3 model",
       _setter("generation_config.json", "eos_token_id", 2), [_GEN_EOS], [L31]),
    _m("generation_config_missing", "no generation_config.json where the official repo has one",
       lambda hf: (hf / "generation_config.json").unlink(), ["generation_config.json"], [L32]),
    _m("wrong_bos_id", "bos_token_id 1 (Llama 2's) on a Llama 3 model", _setter("config.json", "bos_token_id", 1),
       ["config: bos_token_id"], [L31]),
    _m("greedy_defaults_on_instruct", "instruct sampling defaults (temperature 0.6, top_p 0.9) dropped",
       lambda hf: edit_json(hf, "generation_config.json", _greedy_defaults),
       ["generation_config: do_sample", "generation_config: temperature", "generation_config: top_p"], [L32]),
    # the tokenizer (every token, merge, flag and behaviour-changing field against Meta's file and the
    # official repos' files: tokenizer_check.py); each passes a corpus or most of one
    _m("tokenizer_rare_merge_moved", "a rarely used BPE merge at another priority (encodes a few strings otherwise)",
       _tokenizer_json(_merge_moved), [_MERGES], [L31]),
    _m("tokenizer_merge_dropped", "a BPE merge missing from tokenizer.json", _tokenizer_json(_merge_dropped),
       [_MERGES], [L32]),
    _m("tokenizer_token_bytes_changed", "two ordinary tokens' ids exchanged in tokenizer.json (each id's bytes "
       "changed)", _tokenizer_json(_token_ids_exchanged), [_VOCAB], [L31]),
    _m("tokenizer_eot_not_special", "<|eot_id|> added as a non-special token (decode keeps it, "
       "skip_special_tokens does not drop it)", _added_flag("<|eot_id|>", "special", False, "json"), [_FLAGS], [L32]),
    _m("tokenizer_bos_normalized", "<|begin_of_text|> flagged normalized in tokenizer_config.json",
       _added_flag("<|begin_of_text|>", "normalized", True, "config"), [_FLAGS], [L31]),
    _m("tokenizer_bos_dropped", "tokenizer.json without its post_processor (no BOS added on encode)",
       _tokenizer_json(lambda t: t.__setitem__("post_processor", None)), [_BOS, "tokenizer: encode with bos"],
       [L31]),
    _m("tokenizer_base_eos_on_instruct", "an instruct tokenizer_config with the base eos_token <|end_of_text|>",
       _tokenizer_config(eos_token="<|end_of_text|>"), [_SPECIAL], [L32]),
    _m("tokenizer_model_max_length_2048", "model_max_length 2048 on a 128k-context model (truncation=True cuts "
       "prompts)", _tokenizer_config(model_max_length=2048), [_FIELDS], [L31]),
    _m("tokenizer_clean_up_spaces", "clean_up_tokenization_spaces true (decode drops spaces before punctuation)",
       _tokenizer_config(clean_up_tokenization_spaces=True), [_FIELDS], [L32]),
    _m("tokenizer_clean_up_field_missing", "clean_up_tokenization_spaces absent (transformers 4.x then cleans up)",
       _tokenizer_config(clean_up_tokenization_spaces=None), [_FIELDS], [L31]),
    _m("tokenizer_padding_left", "padding_side left (batched prompts padded on the other side)",
       _tokenizer_config(padding_side="left"), [_FIELDS], [L32]),
    _m("tokenizer_split_special_tokens", "split_special_tokens true (special-token text encoded as plain text)",
       _tokenizer_config(split_special_tokens=True), [_FIELDS], [L31]),
    _m("tokenizer_pad_is_eot", "pad_token <|eot_id|> (masked padding hides every end of turn)",
       _pad_token("<|eot_id|>"), [_SPECIAL], [L32]),
)

BY_NAME = {m.name: m for m in CATALOG}


def repairs() -> list[Repair]:
    """Every distinct repair in the catalog, in catalog order (what diagnose tries)."""
    seen: list[Repair] = []
    for m in CATALOG:
        if m.repair is not None and m.repair not in seen:
            seen.append(m.repair)
    return seen


def mutate_copy(hf_dir: Path, dst: Path, mutation) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(hf_dir, dst)
    mutation.apply(dst)
    return dst


# --- changes that do not change the release: verify must pass them -------------------------------------

@dataclass(frozen=True)
class Benign:
    name: str
    change: str
    apply: Callable[[Path], None]
    layouts: tuple[str, ...]
    meta_dtype: torch.dtype = torch.float32  # the tiny Meta checkpoint's dtype this change starts from
    tokenizer: bool = False  # a change of the tokenizer files: judged with the tokenizer check on


def _reshard(per_file: int, reverse: bool = False) -> Callable[[Path], None]:
    def run(hf: Path) -> None:
        sd = _load_all(hf)
        names = sorted(sd, reverse=reverse)
        save_tensors(hf, {k: sd[k] for k in names}, max_per_file=per_file)
    return run


def _upcast(hf: Path) -> None:
    edit_tensors(hf, lambda k, v, c: v.float())
    edit_config(hf, lambda c: c.__setitem__("torch_dtype", "float32"))


def _reserialise(hf: Path) -> None:
    for name in ("config.json", "generation_config.json"):
        data = read_json(hf, name)
        (hf / name).write_text(json.dumps(dict(reversed(list(data.items()))), indent=4, separators=(",", " : ")))


def _restamp(hf: Path) -> None:
    for name in ("config.json", "generation_config.json"):
        edit_json(hf, name, lambda c: c.update(transformers_version="4.99.0.dev0", _name_or_path="someone/mirror"))


def _inv_freq_buffers(hf: Path) -> None:
    sd = _load_all(hf)
    c = read_json(hf, "config.json")
    hd = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    inv = 1.0 / (float(c["rope_theta"]) ** (torch.arange(0, hd, 2).float() / hd))
    sd.update({f"model.layers.{i}.self_attn.rotary_emb.inv_freq": inv.clone() for i in range(c["num_hidden_layers"])})
    save_tensors(hf, sd)


def _hub_cache(hf: Path) -> None:
    """The Hub cache's layout: the snapshot's files are relative symlinks to blobs named by digest."""
    import hashlib

    blobs = hf.parent / f"{hf.name}-blobs"
    blobs.mkdir(exist_ok=True)
    for f in sorted(p for p in hf.iterdir() if p.is_file()):
        blob = blobs / hashlib.sha256(f.read_bytes()).hexdigest()
        if not blob.exists():
            shutil.move(f, blob)
        else:
            f.unlink()
        f.symlink_to(Path("..") / blobs.name / blob.name)


def _original_folder(hf: Path) -> None:
    """An official repo's original/ sub-folder (Meta's files beside the HF weights)."""
    (hf / "original").mkdir()
    torch.save({"tok_embeddings.weight": torch.zeros(4, 4)}, hf / "original" / "consolidated.00.pth")
    (hf / "original" / "params.json").write_text(json.dumps({"dim": 4}))


def _one_file_indexed(hf: Path) -> None:
    sd = _load_all(hf)
    save_tensors(hf, sd)
    total = sum(t.numel() * t.element_size() for t in sd.values())
    (hf / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": {k: "model.safetensors" for k in sd}}, indent=2))


def _read_only(hf: Path) -> None:
    for f in hf.iterdir():
        f.chmod(0o444)
    hf.chmod(0o555)


def _norms_fp32(hf: Path) -> None:
    """Norms kept in float32 beside bf16 matrices, label bf16 (exact upcasts of Meta's bf16 norms)."""
    edit_tensors(hf, lambda k, v, c: v.float() if v.dim() == 1 else None)


def _bf16_norms_kept_fp32(hf: Path) -> None:
    """`convert --dtype bfloat16` of a float32 checkpoint keeping the norms in float32 (exactly Meta's),
    label bf16: exactly stored mixed precision (the reference must not round those norms)."""
    edit_tensors(hf, lambda k, v, c: v.to(torch.bfloat16) if v.dim() >= 2 else None)
    edit_config(hf, lambda c: c.__setitem__("torch_dtype", "bfloat16"))


def _float16_official(hf: Path) -> None:
    """As Meta's official Llama 2 HF repos: float16 storage and label (bf16 values rounded to float16)."""
    edit_tensors(hf, lambda k, v, c: v.half())
    edit_config(hf, lambda c: c.__setitem__("torch_dtype", "float16"))


BENIGN: tuple[Benign, ...] = (
    Benign("resharded", "weights re-saved as files of 5 tensors (another max shard size)", _reshard(5), (L31,)),
    Benign("reordered", "tensors in reverse order across files", _reshard(7, reverse=True), (L32,)),
    Benign("bf16_upcast_to_fp32", "bf16 weights upcast exactly to float32, config says float32", _upcast, (L31,),
           torch.bfloat16),
    Benign("json_reserialised", "config and generation_config with other key order, indent and separators",
           _reserialise, (L32,)),
    Benign("version_stamps", "transformers_version and _name_or_path changed", _restamp, (L31,)),
    Benign("transformers5_spelling", "config in transformers 5's spelling (rope_parameters, dtype)",
           lambda hf: edit_config(hf, _to_transformers5), (L32,)),
    Benign("inv_freq_buffers", "rotary inv_freq buffers beside the weights (transformers <= 4.31 saves)",
           _inv_freq_buffers, (L31,)),
    Benign("one_file_without_index", "all weights in one model.safetensors, no index (files of 5 tensors first, "
           "then joined)", lambda hf: (_reshard(5)(hf), save_tensors(hf, _load_all(hf))), (L31,)),
    Benign("one_file_with_index", "one model.safetensors with an index naming it", _one_file_indexed, (L32,)),
    Benign("hub_cache_symlinks", "files as relative symlinks to digest-named blobs (the Hub cache's snapshot)",
           _hub_cache, (L32,)),
    Benign("original_folder", "an original/ folder with Meta's files beside the weights (official repos)",
           _original_folder, (L31,)),
    Benign("norms_fp32_beside_bf16", "norms stored in float32 beside bf16 matrices, label bf16", _norms_fp32, (L31,),
           torch.bfloat16),
    Benign("float16_official_style", "bf16 weights stored and labelled float16 (as Meta's Llama 2 HF repos)",
           _float16_official, (L32,), torch.bfloat16),
    Benign("read_only", "every file and the folder read-only", _read_only, (L31,)),
    Benign("fp32_to_bf16_norms_kept_fp32", "a float32 checkpoint converted to bf16 matrices, norms kept float32 "
           "(exactly Meta's), label bf16", _bf16_norms_kept_fp32, (L31,)),
    Benign("tokenizer_pad_reserved_for_padding", "pad_token <|finetune_right_pad_id|>, the one Meta reserves for "
           "padding", _pad_token("<|finetune_right_pad_id|>"), (L31,), tokenizer=True),
    Benign("tokenizer_explicit_defaults", "tokenizer_config with explicit defaults (padding and truncation on the "
           "right, no length limit) and a field of another tool", _tokenizer_config(
               padding_side="right", truncation_side="right", model_max_length=10**30, my_tool_version="1.2"),
           (L32,), tokenizer=True),
)
