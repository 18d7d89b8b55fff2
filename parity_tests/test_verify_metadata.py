"""verify trusts nothing in the HF folder, and follows the tool's own hints without false failures.

Metadata mutations are in test_mutations.py (the catalog); here the user paths of issue 8: a
declared dtype change judged against its rounding, `--no-tokenizer` and `--instruct/--base`
carried from convert's printed next step to verify, a folder of another model named as such.
"""

from __future__ import annotations

import json
import shlex

import pytest
import torch

from llama_parity.cli import main
from llama_parity.converter.convert import ConvertOptions, convert_meta_to_hf
from llama_parity.verify import verify


def _next_command(out: str) -> list[str]:
    line = next(ln for ln in out.splitlines() if ln.startswith("next: llama-parity "))
    return shlex.split(line[len("next: llama-parity "):])


@pytest.mark.parametrize("memory", ["full", "streaming"])
def test_declared_dtype_change_passes(tiny, tmp_path, memory):
    """Bug class: a faithful `--dtype bfloat16` conversion of an fp32 checkpoint failed as if the
    layout were wrong (the rounding compared with the fp32 bound against unrounded weights), in
    either memory mode (a 70B converted to another dtype can only be judged streamed)."""
    meta = tiny.meta("llama3.1-8b")  # tiny checkpoints are fp32
    out = tmp_path / "bf16"
    convert_meta_to_hf(meta, out, ConvertOptions(dtype=torch.bfloat16, progress=False))
    rep = verify(meta, out, tokenizer=False, memory=memory)
    assert rep.ok, rep.render()
    assert any("rounded to bfloat16" in n for n in rep.notes)
    assert {"logits (fp32)", "kv-cache decode", "greedy generation", "logits (bf16)"} <= {c.name for c in rep.checks}


def test_dtype_change_with_lost_bits_fails(tiny, tmp_path):
    """Bug class: the rounding allowance hiding a conversion that rounds to a coarser dtype than it
    declares (bf16 values relabelled float16: the exact-copy check must see it)."""
    from llama_parity.mutations import edit_config, edit_tensors

    meta = tiny.meta("llama3.1-8b")
    out = tmp_path / "fp16"
    convert_meta_to_hf(meta, out, ConvertOptions(dtype=torch.float16, progress=False))
    edit_tensors(out, lambda k, v, c: v.to(torch.bfloat16).to(torch.float16))
    rep = verify(meta, out, tokenizer=False, checks="metadata")
    assert {c.name for c in rep.checks if not c.ok} == {"weights: exact copies"}, rep.render()
    edit_config(out, lambda c: c.__setitem__("torch_dtype", "bfloat16"))
    assert "config: dtype label" in {c.name for c in verify(meta, out, tokenizer=False, checks="metadata").checks
                                     if not c.ok}


def test_no_tokenizer_hint_and_verify_agree(tiny, tmp_path, capsys):
    """Bug class: convert's printed next step failing on what convert was told to leave out."""
    meta = tiny.meta("llama3.2-1b-instruct")
    assert main(["convert", "--input-dir", str(meta), "--output-dir", str(tmp_path / "hf"), "--no-tokenizer",
                 "--no-progress"]) == 0
    cmd = _next_command(capsys.readouterr().out)
    assert "--no-tokenizer" in cmd
    assert main(cmd + ["--metadata-only"]) == 0
    out = capsys.readouterr().out
    assert "tokenizer not checked" in out and "METADATA OK (models not run)" in out and "PARITY OK" not in out


@pytest.mark.parametrize("flag,variant_id", [("--instruct", "llama3.1-8b"), ("--base", "llama3.2-1b-instruct")])
def test_instruct_and_base_set_the_chat_metadata(tiny, tmp_path, capsys, flag, variant_id):
    """Bug class: `--instruct` on a base download keeping the base eos (generation never stops at
    <|eot_id|>), `--base` keeping instruct sampling defaults; the next step judging the other twin; and
    verify without the flag assuming the twin the folder names (a false failure)."""
    from llama_parity.converter.hf_config import official_file

    meta = tiny.meta(variant_id)
    hf = tmp_path / "hf"
    assert main(["convert", "--input-dir", str(meta), "--output-dir", str(hf), flag, "--no-progress"]) == 0
    cmd = _next_command(capsys.readouterr().out)
    assert flag in cmd
    twin = {"--instruct": "llama3.1-8b-instruct", "--base": "llama3.2-1b"}[flag]
    gen, official = json.loads((hf / "generation_config.json").read_text()), official_file(twin, "generation_config.json")
    assert isinstance(gen["eos_token_id"], list) == isinstance(official["eos_token_id"], list)
    assert {k: gen.get(k) for k in ("do_sample", "temperature", "top_p")} == \
        {k: official.get(k) for k in ("do_sample", "temperature", "top_p")}
    tok = json.loads((hf / "tokenizer_config.json").read_text())
    assert ("chat_template" in tok) == (flag == "--instruct")
    assert main(cmd + ["--metadata-only", "--no-tokenizer"]) == 0, capsys.readouterr().out
    capsys.readouterr()
    plain = [a for a in cmd if a != flag]
    code = main(plain + ["--metadata-only", "--no-tokenizer"])
    out = capsys.readouterr().out
    if flag == "--instruct":
        # Llama3.1-8B says neither twin: the HF folder's own metadata names it (every telling fact
        # the same one), never the base twin the folder's release is; the report says which and why.
        assert code == 0 and f"metadata expected ({twin}'s official files): the HF folder's own metadata" in out, out
    else:
        # Llama3.2-1B-Instruct says instruct: without --base that twin is judged, and the eos list differs.
        assert code == 1 and "FAIL generation_config: eos_token_id" in out, out


def test_other_model_is_a_parity_failure(tiny, capsys):
    """Bug class: an HF folder of another model (shapes differ) crashing verify with a traceback
    and exit 1 as if parity had been measured: it is a parity failure naming the tensors."""
    code = main(["verify", "--meta-dir", str(tiny.meta("llama3.1-8b")), "--hf-dir", str(tiny.hf("llama3.2-1b-instruct")),
                 "--no-tokenizer"])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL tensors: shapes: model.layers.0.mlp.down_proj.weight" in out
    assert "model checks not run" in out


def test_tokenizer_proven_beside_the_byte_check_keeps_its_result_and_errors(tiny, monkeypatch):
    """Bug class: the tokenizer check run in a thread beside the byte check (verify.py) losing its
    result (the report without a tokenizer verdict) or what it raised (a tokenizer file that cannot
    be read would then pass unjudged)."""
    from llama_parity import tokenizer_check
    from llama_parity.errors import InputError

    meta, hf = tiny.meta("llama3.2-1b-instruct"), tiny.hf("llama3.2-1b-instruct")
    report = verify(meta, hf, checks="metadata")
    assert report.tokenizer is not None and report.tokenizer.ok and report.ok

    def broken(*_a, **_k):
        raise InputError("tokenizer.model unreadable")
    monkeypatch.setattr(tokenizer_check, "check_tokenizer", broken)
    with pytest.raises(InputError, match="unreadable"):
        verify(meta, hf, checks="metadata")
