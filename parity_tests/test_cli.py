"""The command line as users meet it: exit codes, actionable errors, nothing half-written.

Exit codes: 0 success / parity; 1 parity failure; 2 bad input (one line, no traceback).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from llama_parity.cli import main
from llama_parity.mutations import BY_NAME, mutate_copy


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def _copy(tiny, variant_id, tmp_path):
    src = tiny.meta(variant_id)
    dst = tmp_path / "in" / src.name
    shutil.copytree(src, dst)
    if not (dst / "tokenizer.model").exists():
        shutil.copy(src.parent / "tokenizer.model", dst.parent / "tokenizer.model")
    return dst


def test_convert_and_verify_exit_zero(tiny, tmp_path, capsys):
    """Bug class: the documented happy path broken (flags, output layout, exit code)."""
    src = _copy(tiny, "llama3.1-8b", tmp_path)
    code, out, _ = run(capsys, "convert", "--input-dir", src, "--output-dir", tmp_path / "hf", "--json", tmp_path / "r.json")
    assert code == 0 and "Llama 3.1 8B" in out
    assert json.loads((tmp_path / "r.json").read_text())["registry_id"] == "llama3.1-8b"
    # an ordinary folder, not the private mode of temporary files
    import os

    mask = os.umask(0)
    os.umask(mask)
    for p in [tmp_path / "hf", *sorted((tmp_path / "hf").iterdir())]:
        want = (0o777 if p.is_dir() else 0o666) & ~mask
        assert p.stat().st_mode & 0o777 == want, p
    code, out, _ = run(capsys, "verify", "--meta-dir", src, "--hf-dir", tmp_path / "hf", "--json", tmp_path / "v.json")
    assert code == 0 and "PARITY OK" in out
    assert json.loads((tmp_path / "v.json").read_text())["ok"] is True


def test_verify_exits_one_on_parity_failure(tiny, tmp_path, capsys):
    """Bug class: a release gate that reports a broken model but exits 0."""
    broken = mutate_copy(tiny.hf("llama3.2-1b"), tmp_path / "broken", BY_NAME["rope_factor_8_not_32"])
    code, out, _ = run(capsys, "verify", "--meta-dir", tiny.meta("llama3.2-1b"), "--hf-dir", broken, "--no-bf16")
    assert code == 1 and "PARITY FAILED" in out and "far positions" in out


def test_transformers_script_flags_drop_in(tiny, tmp_path, capsys):
    """Bug class: trusting a wrong --llama_version (how 3.2 models got rope factor 8): the flags
    are accepted, but the files decide, and the user is told."""
    src = _copy(tiny, "llama3.2-1b", tmp_path)
    code, out, _ = run(capsys, "convert", "--input_dir", src, "--model_size", "1B", "--llama_version", "3.1",
                       "--output_dir", tmp_path / "hf")
    assert code == 0 and "--llama_version 3.1 ignored" in out
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["rope_scaling"]["factor"] == 32.0


def test_dry_run_writes_nothing(tiny, tmp_path, capsys):
    """Bug class: a dry run that writes, or a plan that is not shown."""
    code, out, _ = run(capsys, "convert", "--input-dir", tiny.meta("llama2-70b"), "--output-dir", tmp_path / "hf",
                       "--dry-run")
    assert code == 0 and "merge dim 1" in out and "permute_for_hf_rotary" in out
    assert not (tmp_path / "hf").exists()


def test_demo(capsys, tmp_path):
    """Bug class: the README's first command failing on a fresh machine."""
    code, out, _ = run(capsys, "demo", "--keep", tmp_path)
    assert code == 0 and "PARITY OK" in out


def _bad(tmp_path, src):
    return [p for p in (tmp_path / "hf", tmp_path / "hf.partial") if p.exists()] + list(tmp_path.glob(".hf.partial-*"))


@pytest.mark.parametrize("breakage,message", [
    ("no_params", "params.json missing in"),
    ("missing_shard", "consolidated.01.pth is missing"),
    ("truncated_shard", "cannot read"),
    ("bad_json", "is not valid JSON"),
    ("wrong_params", "has shape"),
    ("no_tokenizer", "tokenizer.model not found"),
    ("not_a_dir", "does not exist"),
    ("hf_dir_as_input", "Hugging Face directory"),
])
def test_bad_input_is_refused_cleanly(tiny, tmp_path, capsys, breakage, message):
    """Bug class: tracebacks, exit 0 or half-written output on bad input."""
    src = _copy(tiny, "llama3-70b", tmp_path)
    if breakage == "no_params":
        (src / "params.json").unlink()
    elif breakage == "missing_shard":
        (src / "consolidated.01.pth").unlink()
    elif breakage == "truncated_shard":
        data = (src / "consolidated.03.pth").read_bytes()
        (src / "consolidated.03.pth").write_bytes(data[: len(data) // 2])
    elif breakage == "bad_json":
        (src / "params.json").write_text("{dim: 1")
    elif breakage == "wrong_params":
        p = json.loads((src / "params.json").read_text())
        p["dim"] *= 2
        (src / "params.json").write_text(json.dumps(p))
    elif breakage == "no_tokenizer":
        (src / "tokenizer.model").unlink()
    elif breakage == "not_a_dir":
        src = tmp_path / "nowhere"
    elif breakage == "hf_dir_as_input":
        src = tiny.hf("llama3-8b")
    code, _, err = run(capsys, "convert", "--input-dir", src, "--output-dir", tmp_path / "hf")
    assert code == 2
    assert err.startswith("llama-parity: ") and message in err, err
    assert not _bad(tmp_path, src), "output left behind"


def test_refuses_to_overwrite(tiny, tmp_path, capsys):
    """Bug class: silently clobbering an existing model folder."""
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "convert", "--input-dir", tiny.meta("llama3-8b"), "--output-dir", tmp_path / "hf")
    assert code == 2 and "--overwrite" in err
    assert (tmp_path / "hf" / "keep.txt").read_text() == "mine"


def test_verify_bad_input_exit_two(tmp_path, capsys):
    """Bug class: verify crashing (or passing) when pointed at the wrong folders."""
    code, _, err = run(capsys, "verify", "--meta-dir", tmp_path / "a", "--hf-dir", tmp_path / "b")
    assert code == 2 and "does not exist" in err


def test_tokenizer_of_another_model_refused(tiny, tmp_path, capsys):
    """Bug class: a Llama 2 tokenizer.model next to Llama 3 weights (or vice versa) converted anyway."""
    src = _copy(tiny, "llama3-8b", tmp_path)
    shutil.copy(tiny.meta("llama2-7b").parent / "tokenizer.model", src / "tokenizer.model")
    code, _, err = run(capsys, "convert", "--input-dir", src, "--output-dir", tmp_path / "hf")
    assert code == 2 and not (tmp_path / "hf").exists()


def test_dtype_option(tiny, tmp_path, capsys):
    """Bug class: --dtype ignored, or bf16 silently widened."""
    code, _, _ = run(capsys, "convert", "--input-dir", tiny.meta("llama3-8b"), "--output-dir", tmp_path / "hf",
                     "--dtype", "bfloat16")
    assert code == 0
    from safetensors import safe_open

    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_multi_file_output_loads_and_verifies(tiny, tmp_path, capsys):
    """Bug class: a sharded safetensors output (index + model-0000N-of-0000M files) that
    transformers cannot load, or that loads with tensors missing."""
    code, _, _ = run(capsys, "convert", "--input-dir", tiny.meta("llama3-70b"), "--output-dir", tmp_path / "hf",
                     "--max-shard-size", "300KB")
    assert code == 0
    files = sorted(p.name for p in (tmp_path / "hf").glob("*.safetensors"))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    code, out, _ = run(capsys, "verify", "--meta-dir", tiny.meta("llama3-70b"), "--hf-dir", tmp_path / "hf",
                       "--no-bf16", "--no-tokenizer")
    assert code == 0, out


def test_overwrite_replaces_an_old_output_cleanly(tiny, tmp_path, capsys):
    """Bug class: --overwrite that leaves the old output set aside (.hf.old-PID), a staging
    folder, or a mix of old and new files."""
    out = tmp_path / "hf"
    out.mkdir()
    (out / "stale.txt").write_text("from an older conversion")
    code, _, _ = run(capsys, "convert", "--input-dir", tiny.meta("llama3-8b"), "--output-dir", out, "--overwrite",
                     "--no-progress")
    assert code == 0
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


@pytest.mark.parametrize("variant_id", ["llama3.2-1b-instruct", "llama3.1-8b"])
def test_to_meta_next_hint_passes(tiny, tmp_path, capsys, variant_id):
    """Bug class: a false failure reached by following the tool's own hint: HF -> Meta into a folder
    whose name names no release, then the printed verify command failed on an instruct model's eos
    and special tokens (Meta's files cannot tell base from instruct; the hint must say which)."""
    import shlex

    hf = tiny.hf(variant_id)
    tok = next(p for p in (tiny.meta(variant_id) / "tokenizer.model", tiny.meta(variant_id).parent / "tokenizer.model")
               if p.is_file())
    code, out, _ = run(capsys, "to-meta", "--hf-dir", hf, "--output-dir", tmp_path / "back", "--tokenizer", tok)
    assert code == 0
    hint = next(ln for ln in out.splitlines() if ln.startswith("next: llama-parity "))
    assert ("--instruct" in hint) == variant_id.endswith("instruct")
    code, out, _ = run(capsys, *shlex.split(hint[len("next: llama-parity "):]), "--memory", "full", "--no-bf16")
    assert code == 0, out
