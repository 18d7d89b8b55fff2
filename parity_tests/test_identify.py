"""One identification for every command: which release, which twin (base or instruct), and why.

`releases.identify` decides for convert (detect), verify (metadata, RoPE, tokenizer release),
to-meta and diagnose. These tests hold the commands to one answer: an ambiguity is the same one
line everywhere, base or instruct is never assumed, a mix of twins fails naming the fields.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from llama_parity import releases
from llama_parity.cli import main
from llama_parity.converter.convert import ConvertOptions, convert_meta_to_hf
from llama_parity.releases import HFClaim, identify
from llama_parity.tokenizer_check import tokenizer_release
from llama_parity.verify import verify

_70B = ("llama3.1-70b", "llama3.1-70b-instruct", "llama3.3-70b-instruct")


@pytest.fixture
def finetune_70b(tiny, tmp_path, monkeypatch):
    """A tiny Llama 3.1 70B checkpoint in a folder named `my-finetune-70b`, with the registry's
    3.1 70B, 3.1 70B Instruct and 3.3 70B Instruct entries given its (tiny) params.json: a params
    file that fits Llama 3.1 70B and Llama 3.3 70B alike, as the real one does."""
    src = tiny.meta("llama3.1-70b", 1)
    meta = tmp_path / "my-finetune-70b"
    shutil.copytree(src, meta)
    params = json.loads((meta / "params.json").read_text())
    vocab = releases.tokenizer_n_words(meta / "tokenizer.model")
    table = tuple(dataclasses.replace(v, params=params, vocab_size=vocab, num_shards=1) if v.id in _70B else v
                  for v in releases.VARIANTS)
    monkeypatch.setattr(releases.rules, "VARIANTS", table)
    monkeypatch.setattr(releases.registry, "BY_ID", {v.id: v for v in table})
    return meta


def test_3_3_vs_3_1_70b_one_answer_in_convert_and_verify(finetune_70b, tmp_path, capsys):
    """Bug class: params that fit Llama 3.1 and 3.3 70B in a folder naming neither: convert refused
    while verify silently judged it as 3.1 70B (and the tokenizer check got nothing). Now both give
    the same one line; verify judges what the HF folder claims when it can tell, and says so."""
    meta, hf = finetune_70b, tmp_path / "hf"
    assert main(["convert", "--input-dir", str(meta), "--output-dir", str(hf), "--no-progress"]) == 2
    refusal = capsys.readouterr().err.strip()
    assert refusal.count("\n") == 0 and "pass --variant ID" in refusal
    assert all(v in refusal for v in _70B), refusal
    assert main(["convert", "--input-dir", str(meta), "--output-dir", str(hf), "--no-progress",
                 "--variant", "llama3.3-70b-instruct"]) == 0
    capsys.readouterr()
    # The HF folder names its release (the model card's release row): verify judges that one.
    report = verify(meta, hf, checks="metadata")
    assert report.ok, report.render()
    assert any("names llama3.3-70b-instruct" in n for n in report.notes), report.notes
    # The tokenizer check judged the same release (its template row names it).
    assert any("llama3.3-70b-instruct" in row[0] for row in report.tokenizer.rows()), report.render()
    assert tokenizer_release(meta, hf_dir=hf).label == "llama3.3-70b-instruct"
    # An HF folder that does not say: the same line as convert, exit 2, no silent pick.
    (hf / "README.md").unlink()
    assert main(["verify", "--meta-dir", str(meta), "--hf-dir", str(hf), "--metadata-only"]) == 2
    assert capsys.readouterr().err.strip() == refusal
    assert main(["diagnose", "--meta-dir", str(meta), "--hf-dir", str(hf)]) == 2
    assert capsys.readouterr().err.strip() == refusal


def test_convert_instruct_from_a_base_named_folder_verifies_without_flags(tiny, tmp_path):
    """Bug class: a correct `convert --instruct` of a folder whose name does not say Instruct
    failing verify (the judge assumed the base twin the folder names): the HF folder's own
    metadata names the twin, and the report says which and why."""
    hf = tmp_path / "hf"
    convert_meta_to_hf(tiny.meta("llama3.1-8b"), hf, ConvertOptions(progress=False, instruct=True))
    report = verify(tiny.meta("llama3.1-8b"), hf, checks="metadata")
    assert report.ok, report.render()
    twin = next(n for n in report.notes if n.startswith("instruct metadata expected"))
    assert "llama3.1-8b-instruct" in twin and "eos_token_id" in twin and "chat_template" in twin
    # --base still forces the other twin: the instruct eos list then fails.
    forced = verify(tiny.meta("llama3.1-8b"), hf, checks="metadata", instruct=False, tokenizer=False)
    assert not forced.ok and any(c.name == "generation_config: eos_token_id" and not c.ok for c in forced.checks)


def test_mixed_twins_fail_naming_the_fields(tiny, tmp_path):
    """Bug class: an HF folder with the base eos but the instruct chat template (generation never
    stops at <|eot_id|> while the template ends turns with it) passing against either twin."""
    hf = tmp_path / "hf"
    shutil.copytree(tiny.hf("llama3.2-1b-instruct"), hf)
    base_vocab_eos = json.loads((tiny.hf("llama3.2-1b-instruct") / "config.json").read_text())["bos_token_id"] + 1
    for name in ("config.json", "generation_config.json"):
        d = json.loads((hf / name).read_text())
        d["eos_token_id"] = base_vocab_eos  # <|end_of_text|> alone: the base twin's
        (hf / name).write_text(json.dumps(d))
    meta = tmp_path / "my-model"  # a name that says neither twin: the HF folder's metadata decides
    shutil.copytree(tiny.meta("llama3.2-1b-instruct"), meta)
    report = verify(meta, hf, checks="metadata", tokenizer=False)
    twin = next(c for c in report.checks if c.name.startswith("metadata: one twin"))
    assert not twin.ok and not report.ok
    assert "base: config.json eos_token_id, generation_config.json eos_token_id" in twin.detail, twin.detail
    assert "instruct: tokenizer_config.json chat_template, tokenizer_config.json eos_token" in twin.detail, twin.detail
    # A flag judges that twin; the fields of the other still fail (by value, not as a mix).
    forced = verify(meta, hf, checks="metadata", tokenizer=False, instruct=True)
    assert not forced.ok and any(c.name == "config: eos_token_id" and not c.ok for c in forced.checks)


def test_identify_tells_llama3_8b_from_guard_by_the_hf_claim():
    """Bug class: releases the Meta files cannot tell apart (Llama 3 8B, Guard 3 8B) silently
    picked; the HF folder's context length tells them apart, else the one-line refusal."""
    spec = releases.get("llama3-8b")
    kw = dict(folder_name="checkpoint", num_shards=1, tied=False, vocab_size=spec.vocab_size)
    plain = identify(spec.params, **kw)
    assert plain.release is None and "pass --variant ID" in plain.ambiguity and "llama-guard-3-8b" in plain.ambiguity
    with pytest.raises(releases.IdentifyError):
        plain.require()
    claim = HFClaim(config={"max_position_embeddings": 8192, "eos_token_id": 128001, "bos_token_id": 128000})
    told = identify(spec.params, hf_claim=claim, **kw).require()
    assert told.release.id == "llama3-8b" and any("8192" in e for e in told.evidence)
    guard = identify(spec.params, hf_claim=HFClaim(config={"max_position_embeddings": 131072}), **kw).require()
    assert guard.release.id == "llama-guard-3-8b"


def test_twin_rule_unit():
    """Bug class: the twin read from one field only (eos) so a half-converted folder passes, or a
    folder name saying nothing taken as "base"."""
    spec = releases.get("llama3.1-8b")
    kw = dict(folder_name="Llama3.1-8B", num_shards=1, tied=False, vocab_size=spec.vocab_size)
    inst = releases.official_file("llama3.1-8b-instruct", "generation_config.json")
    claim = HFClaim(config={"bos_token_id": 128000, "eos_token_id": inst["eos_token_id"]}, generation=inst,
                    tokenizer_config={"chat_template": "{{ x }}", "eos_token": "<|eot_id|>"})
    got = identify(spec.params, hf_claim=claim, **kw)
    assert got.instruct and not got.twin_mix and got.metadata_release.id == "llama3.1-8b-instruct"
    assert not identify(spec.params, **kw).instruct  # convert, no HF folder: the release's own twin
    assert identify(spec.params, **(kw | {"folder_name": "Llama3.1-8B-Instruct"})).instruct
    assert not identify(spec.params, hf_claim=claim, instruct=False, **kw).instruct  # --base forces
    mixed = dataclasses.replace(claim, tokenizer_config={"eos_token": "<|end_of_text|>"})
    got = identify(spec.params, hf_claim=mixed, **kw)
    assert dict(got.twin_mix) == {"config.json eos_token_id": "instruct", "generation_config.json eos_token_id":
                                  "instruct", "tokenizer_config.json chat_template": "base",
                                  "tokenizer_config.json eos_token": "base"}


@pytest.mark.parametrize("shards,stored,equal,want", [(16, 16, {2}, 2), (16, 16, {2, 4, 8, 16}, 2), (16, 16, set(), 1),
                                                      (16, 8, {2, 4, 8}, 1), (16, 16, {4, 8, 16}, 4)])
def test_one_kv_replication_rule(shards, stored, equal, want):
    """Bug class: detection (largest factor) and the judge (smallest) de-duplicating a different
    number of kv heads when real heads happen to be equal: one rule, the smallest allowed factor
    whose copies are equal."""
    assert releases.stored_kv_replication(shards, stored, lambda r: r in equal) == want


def test_detect_and_judge_agree_on_equal_real_kv_heads(tiny, tmp_path):
    """Bug class: the same MP16 checkpoint whose real kv heads are equal (layer 0) de-duplicated to
    one kv head by detection and to eight by verify, a false failure either way."""
    from llama_parity.converter.detect import detect
    from llama_parity.converter.meta_checkpoint import MetaCheckpoint
    from llama_parity.metadata import read_meta_side

    meta = tmp_path / "Llama3.1-405B-bf16-mp16"
    shutil.copytree(tiny.meta("llama3.1-405b-mp16"), meta)
    for p in sorted(meta.glob("consolidated.*.pth")):
        sd = torch.load(p, weights_only=True)
        for k in ("wk", "wv"):
            w = sd[f"layers.0.attention.{k}.weight"]
            sd[f"layers.0.attention.{k}.weight"] = torch.zeros_like(w) + 0.5
        torch.save(sd, p)
    assert detect(MetaCheckpoint(meta)).kv_replication == read_meta_side(meta).kv_replication == 2
