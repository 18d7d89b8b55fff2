"""Hypothesis-fuzzed params.json over tiny checkpoints: every example converts correctly or is refused cleanly.

Each example draws an architecture (dims, heads, kv heads, layers, theta, FFN rounding, eps, scaled
RoPE, tokenizer kind, 1 or 2 shards), writes a tiny Meta checkpoint whose tensors match it, and
then possibly breaks the pair: a missing key, a value of the wrong type, zero or negative sizes,
heads that do not divide dim, tensors that do not match the params, a tokenizer of another family.
`llama-parity convert` (the CLI's own entry point, in process) must then either exit 0 with an HF
folder whose config states the drawn values and whose logits equal Meta's reference on the same
files, or exit 2 with one `llama-parity:` line and no output folder: never a traceback, never exit 0
with a wrong model.

The default (repro) profile runs a few reproducible examples; `HYPOTHESIS_PROFILE=explore` many fresh ones.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from llama_parity import releases as registry  # noqa: E402
from llama_parity.fixtures.factory import make_tokenizer, shard_state_dict  # noqa: E402

EXAMPLES = 400 if os.environ.get("HYPOTHESIS_PROFILE") == "explore" else 16
JUNK = ("7", [1], {"a": 1})


@dataclass
class Case:
    params: dict
    tensors: dict  # the architecture the tensors are written with
    kind: str  # tokenizer kind
    shards: int
    broken: list[str] = field(default_factory=list)  # why it must be refused
    maybe: list[str] = field(default_factory=list)  # changes that may or may not stay convertible


@st.composite
def cases(draw) -> Case:
    kind = draw(st.sampled_from(["tiktoken", "sentencepiece"]))
    head_dim = draw(st.sampled_from([2, 4, 8]))
    n_heads = draw(st.sampled_from([1, 2, 3, 4, 6]))
    n_kv = draw(st.sampled_from([d for d in range(1, n_heads + 1) if n_heads % d == 0]))
    p = {"dim": n_heads * head_dim, "n_layers": draw(st.integers(1, 2)), "n_heads": n_heads,
         "multiple_of": draw(st.sampled_from([1, 2, 8, 32, 256])),
         "norm_eps": draw(st.sampled_from([1e-5, 1e-6]) | st.floats(1e-7, 1e-2))}
    if n_kv != n_heads or draw(st.booleans()):
        p["n_kv_heads"] = n_kv
    if draw(st.booleans()):
        p["ffn_dim_multiplier"] = draw(st.sampled_from([1.0, 1.3, 1.5]) | st.floats(0.4, 2.5))
    if kind == "tiktoken":
        p["rope_theta"] = draw(st.sampled_from([500000.0, 500000]))
        p["use_scaled_rope"] = draw(st.booleans())
        p["vocab_size"] = 0  # filled with the tokenizer's size
    else:
        theta = draw(st.sampled_from([None, 10000.0, 1000000]) | st.floats(100.0, 1e7))
        if theta is not None:
            p["rope_theta"] = theta
        p["vocab_size"] = -1
    arch = dict(p)
    # Meta's model parallelism needs every split axis divisible by the shard count
    shards = 2 if (n_heads % 2 == 0 and n_kv % 2 == 0 and _hidden(p) % 2 == 0 and draw(st.booleans())) else 1
    case = Case(p, arch, kind, shards)
    if kind == "sentencepiece" and p.get("rope_theta") == 500000.0:
        case.maybe.append("theta 5e5 is Llama 3's: a sentencepiece tokenizer may be refused as another model's")
    # about a third valid (so conversions are checked for correctness), the rest broken one way each
    draw(st.sampled_from([_valid, _drop_key, _valid, _junk_value, _bad_number, _valid, _indivisible, _mismatch,
                          _valid, _other_tokenizer, _extra_key]))(draw, case)
    return case


def _valid(draw, case):
    pass


def _extra_key(draw, case):
    case.params[draw(st.sampled_from(["max_seq_len", "foo"]))] = draw(st.integers(0, 10) | st.text(max_size=3))


def _drop_key(draw, case):
    key = draw(st.sampled_from(["dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "ffn_dim_multiplier",
                                "norm_eps", "rope_theta", "use_scaled_rope", "vocab_size"]))
    if key in case.params:
        del case.params[key]
        (case.broken if key in ("dim", "n_layers", "n_heads") else case.maybe).append(f"no {key}")


def _junk_value(draw, case):
    key = draw(st.sampled_from(["dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "ffn_dim_multiplier",
                                "norm_eps", "rope_theta", "use_scaled_rope", "vocab_size"]))
    value = draw(st.sampled_from(JUNK + ((True,) if key != "use_scaled_rope" else ())))
    case.params[key] = value
    case.broken.append(f"{key} = {value!r}")


def _bad_number(draw, case):
    key = draw(st.sampled_from(["dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "norm_eps", "rope_theta",
                                "ffn_dim_multiplier", "vocab_size"]))
    value = draw(st.sampled_from([0, -1, -4096]))
    if key == "vocab_size" and value == -1:
        value = -2
    case.params[key] = value
    case.broken.append(f"{key} = {value}")


def _indivisible(draw, case):
    p = case.params
    p["n_heads"] = draw(st.sampled_from([n for n in (5, 7, 9) if p["dim"] % n]))
    case.broken.append(f"dim {p['dim']} not divisible by n_heads {p['n_heads']}")


def _mismatch(draw, case):
    """params.json and the tensors disagree."""
    p = case.params
    what = draw(st.sampled_from(["n_layers", "n_kv_heads", "dim", "hidden"]))
    if what == "n_layers":
        p["n_layers"] += 1
    elif what == "n_kv_heads":
        others = [d for d in range(1, p["n_heads"] + 1) if p["n_heads"] % d == 0 and d != case.tensors.get(
            "n_kv_heads", p["n_heads"])]
        if not others:
            return
        p["n_kv_heads"] = others[0]
    elif what == "dim":
        p["dim"] = 2 * p["dim"]
    else:
        p["multiple_of"] = 4096
        if _hidden(p) == _hidden(case.tensors):
            return
    case.broken.append(f"tensors do not match params.json's {what}")


def _other_tokenizer(draw, case):
    case.kind = "sentencepiece" if case.kind == "tiktoken" else "tiktoken"
    case.broken.append("tokenizer of another family")


def _hidden(p: dict) -> int:
    return registry.intermediate_size(p["dim"], p.get("multiple_of", 256), p.get("ffn_dim_multiplier"))


_SPECS = {"tiktoken": registry.get("llama3.1-8b"), "sentencepiece": registry.get("llama2-7b")}


def _write_checkpoint(case: Case, folder: Path) -> None:
    folder.mkdir(parents=True)
    tok = make_tokenizer(_SPECS[case.kind], folder / "tokenizer.model")
    vocab = registry.tokenizer_n_words(tok)
    a = case.tensors
    dim, heads, hd = a["dim"], a["n_heads"], a["dim"] // a["n_heads"]
    kv, hidden = a.get("n_kv_heads", heads), _hidden(a)
    g = torch.Generator().manual_seed(0)

    def w(*shape):
        return torch.randn(*shape, generator=g) / shape[-1] ** 0.5

    sd = {"tok_embeddings.weight": torch.randn(vocab, dim, generator=g), "norm.weight": 1 + 0.1 * w(dim),
          "output.weight": w(vocab, dim)}
    for i in range(a["n_layers"]):
        sd |= {f"layers.{i}.attention.wq.weight": w(heads * hd, dim), f"layers.{i}.attention.wk.weight": w(kv * hd, dim),
               f"layers.{i}.attention.wv.weight": w(kv * hd, dim), f"layers.{i}.attention.wo.weight": w(dim, heads * hd),
               f"layers.{i}.feed_forward.w1.weight": w(hidden, dim), f"layers.{i}.feed_forward.w2.weight": w(dim, hidden),
               f"layers.{i}.feed_forward.w3.weight": w(hidden, dim),
               f"layers.{i}.attention_norm.weight": 1 + 0.1 * w(dim), f"layers.{i}.ffn_norm.weight": 1 + 0.1 * w(dim)}
    emb_dim = 0 if case.kind == "tiktoken" else 1
    for s, shard in enumerate(shard_state_dict(sd, case.shards, emb_dim, 1)):
        torch.save(shard, folder / f"consolidated.{s:02d}.pth")
    params = dict(case.params)
    if params.get("vocab_size") == 0 and "vocab_size" not in [b.split(" ")[0] for b in case.broken]:
        params["vocab_size"] = vocab
    (folder / "params.json").write_text(json.dumps(params))


def _convert(meta: Path, out: Path) -> tuple[int, str]:
    from llama_parity.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["convert", "--input-dir", str(meta), "--output-dir", str(out), "--no-tokenizer", "--no-progress"])
    return rc, err.getvalue()


def _assert_correct(case: Case, meta: Path, out: Path) -> None:
    """The config says what params.json says, and the model computes what Meta's reference computes."""
    from llama_parity.parity import check_logits, expected_rope_scaling, load_hf_model
    from llama_parity.reference_model.model import load_meta_checkpoint

    p, a = json.loads((meta / "params.json").read_text()), case.tensors
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["intermediate_size"]) == (
        a["dim"], a["n_layers"], a["n_heads"], _hidden(a))
    assert cfg.get("num_key_value_heads", cfg["num_attention_heads"]) == a.get("n_kv_heads", a["n_heads"])
    assert cfg["rms_norm_eps"] == p.get("norm_eps", 1e-5)
    assert float(cfg.get("rope_theta", 10000.0)) == float(p.get("rope_theta", 10000.0))
    assert bool(cfg.get("rope_scaling")) == bool(p.get("use_scaled_rope"))
    ref = load_meta_checkpoint(meta, rope_scaling=expected_rope_scaling(meta), dtype=torch.float32)
    hf = load_hf_model(out)
    tokens = list(range(1, 9))
    check = check_logits(ref, hf, tokens, "cpu")
    assert check.ok, check


@settings(max_examples=EXAMPLES, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=cases())
def test_fuzzed_params_convert_correctly_or_are_refused_cleanly(case):
    """Bug class: a params.json the converter does not expect (junk types, missing keys, zero,
    negative or non-divisible sizes, tensors or tokenizer that do not match) crashing with a
    traceback, or worse, converting to a model that computes something else with exit 0."""
    root = Path(tempfile.mkdtemp(prefix="fuzz-"))
    try:
        meta, out = root / "ckpt", root / "out"
        _write_checkpoint(case, meta)
        rc, err = _convert(meta, out)
        event(f"exit {rc}" + (f": {case.broken[0].split(' ')[0]}" if case.broken else ""))
        if rc == 0:
            assert not case.broken, f"converted although {case.broken}"
            _assert_correct(case, meta, out)
        else:
            assert case.broken or case.maybe, f"refused a valid checkpoint: {err}"
            assert rc == 2, err
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("llama-parity: "), err
            assert not out.exists() and [q.name for q in root.iterdir()] == ["ckpt"], list(root.iterdir())
    finally:
        shutil.rmtree(root, ignore_errors=True)
