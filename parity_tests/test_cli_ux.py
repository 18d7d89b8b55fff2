"""The command line as a new user meets it: machine-readable output, help, spellings, units, the
messages that tell a user what happened, and the output folder as the official repositories ship it."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import llama_parity
from llama_parity.cli import build_parser, main
from llama_parity.tokenizer_check import CheckResult, TokenizerReport
from llama_parity.verify import VerifyReport

from .forked import Forked

VARIANT = "llama3.2-1b"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def _copy(tiny, variant_id, tmp_path) -> Path:
    """The tiny checkpoint laid out as Meta's downloads are: <root>/<model folder>/shards."""
    src = tiny.meta(variant_id)
    dst = tmp_path / "download" / src.name
    shutil.copytree(src, dst)
    if not (dst / "tokenizer.model").exists():
        shutil.copy(src.parent / "tokenizer.model", dst / "tokenizer.model")
    return dst


def test_json_dash_is_json_alone(tiny, tmp_path, capsys):
    """Bug class: `--json -` mixing the human table into stdout, so `| jq` fails."""
    meta, hf = tiny.meta(VARIANT), tiny.hf(VARIANT)
    cases = {
        "inspect": ["inspect", "--input-dir", meta],
        "convert": ["convert", "--input-dir", meta, "--output-dir", tmp_path / "hf", "--no-progress"],
        "dry-run": ["convert", "--input-dir", meta, "--output-dir", tmp_path / "x", "--dry-run"],
        "verify": ["verify", "--meta-dir", meta, "--hf-dir", hf, "--no-bf16", "--no-tokenizer"],
        "diagnose": ["diagnose", "--meta-dir", meta, "--hf-dir", hf],
    }
    for name, argv in cases.items():
        code, out, err = run(capsys, *argv, "--json", "-")
        assert code == 0, (name, err)
        data = json.loads(out)  # stdout is the JSON and nothing else
        assert isinstance(data, dict) and err.strip(), name  # the human report went to stderr
    assert json.loads(run(capsys, *cases["verify"], "--json", "-")[1])["ok"] is True


def test_demo_json_and_cleanup(capsys):
    """Bug class: the demo leaving files in /tmp silently (or saying nothing about where they were),
    and `demo --json -` not parseable."""
    code, out, err = run(capsys, "demo", "--json", "-")
    data = json.loads(out)
    assert code == 0 and data["verify"]["ok"] and data["kept"] is False
    workdir = Path(data["workdir"])
    assert not workdir.exists() and f"files were in {workdir}, now removed" in err


def _flag_actions(parser: argparse.ArgumentParser):
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def test_every_flag_has_help():
    """Bug class: flags a new user cannot learn about from --help."""
    subs = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for cmd in ("convert", "verify", "diagnose", "inspect", "to-meta", "demo"):
        for a in _flag_actions(subs[cmd]):
            if a.help == argparse.SUPPRESS and cmd == "convert":
                continue  # transformers' script flags: accepted silently as a drop-in
            assert a.help and a.help != argparse.SUPPRESS, f"{cmd} {a.option_strings[0]} has no help"


@pytest.mark.parametrize("cmd", ["verify", "diagnose"])
def test_underscore_spellings(cmd):
    """Bug class: `verify --meta_dir` refused while `convert --input_dir` is accepted."""
    args = build_parser().parse_args([cmd, "--meta_dir", "m", "--hf_dir", "h"])
    assert (args.meta_dir, args.hf_dir) == ("m", "h")


def test_version(capsys):
    """Bug class: no way to tell which converter version wrote a folder or filed a bug."""
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"llama-parity {llama_parity.__version__}"


def test_shard_size_needs_a_unit(tiny, tmp_path, capsys):
    """Bug class: `--max-shard-size 5` read as 5 bytes (one file per tensor) instead of refused."""
    with pytest.raises(SystemExit) as e:
        main(["convert", "--input-dir", str(tiny.meta(VARIANT)), "--output-dir", str(tmp_path / "hf"),
              "--max-shard-size", "5"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no unit" in err and "5GB" in err and not (tmp_path / "hf").exists()
    assert build_parser().parse_args(["convert", "--input-dir", "i", "--output-dir", "o",
                                      "--max-shard-size", "500B"]).max_shard_size == 500


def test_verify_md5_says_sums_match(tiny, tmp_path, capsys):
    """Bug class: --verify-md5 silent on success, so a user cannot tell the check ran."""
    src = _copy(tiny, VARIANT, tmp_path)
    names = ["params.json", "consolidated.00.pth", "tokenizer.model"]
    (src / "checklist.chk").write_text("".join(f"{hashlib.md5((src / n).read_bytes()).hexdigest()}  {n}\n"
                                               for n in names))
    code, out, _ = run(capsys, "convert", "--input-dir", src, "--output-dir", tmp_path / "hf", "--verify-md5")
    assert code == 0 and "md5 sums match checklist.chk (3 file(s))" in out


def test_llama2_chat_is_labelled_chat(tiny, capsys):
    """Bug class: Llama 2's chat models shown as "Instruct", a name Meta never gave them."""
    _, out, _ = run(capsys, "inspect", "--input-dir", tiny.meta("llama2-7b-chat"))
    assert "Llama 2 7B Chat" in out and "Instruct" not in out
    _, out, _ = run(capsys, "inspect", "--input-dir", tiny.meta("llama3.2-1b-instruct"))
    assert "Llama 3.2 1B Instruct" in out


def test_measured_rows_read_as_measurements():
    """Bug class: a measured, documented difference ("70/70 mismatches") printed as "ok", which
    reads as a pass of a bound that does not exist."""
    tok = TokenizerReport("tokenizer.model", "hf", "tiktoken", [
        CheckResult("special-token text, HF default parsing", 70, 70, None),
        CheckResult("encode with bos", 129, 0, 0)])
    text = VerifyReport("m", "h", "cpu", tokenizer=tok).render()
    measured = next(l for l in text.splitlines() if "HF default parsing" in l)
    exact = next(l for l in text.splitlines() if "encode with bos" in l)
    assert measured.rstrip().endswith("measured, not judged") and "70/70 differ (known)" in measured, measured
    assert exact.rstrip().endswith("ok") and "docs/tokenizers.md" in text


def test_report_wording():
    """Bug class: the far-position row saying "worst at 131056: at 131056", and chart bound labels
    rounded away from the table's value (a label 3e-02 beside a table's 2.50e-02)."""
    from llama_parity import plots
    from llama_parity.parity import Check, far_check
    from llama_parity.verify import format_value

    subs = [(p, Check("far", "", m, 1e-4, True, f"at {p}: max |diff| {m:.1e}")) for p, m in ((8192, 1e-6), (131056, 2e-6))]
    detail = far_check(subs).detail
    assert "worst at 131056: max |diff|" in detail and "131056: at 131056" not in detail, detail
    for b in (1e-4, 2.5e-2, 1e-6):
        assert plots._num(b) == format_value(b)


def test_parent_folder_mistake_names_the_subfolder(tiny, tmp_path, capsys):
    """Bug class: pointing --input-dir at the download root (which holds model folders) answered with
    "no shards" and no hint where they are."""
    src = _copy(tiny, VARIANT, tmp_path)
    code, _, err = run(capsys, "convert", "--input-dir", src.parent, "--output-dir", tmp_path / "hf")
    assert code == 2 and f"pass {src}" in err
    code, _, err = run(capsys, "verify", "--meta-dir", src.parent, "--hf-dir", tiny.hf(VARIANT))
    assert code == 2 and f"pass {src}" in err


def test_pytest_bad_meta_dir_is_one_error(tmp_path):
    """Bug class: `pytest --meta-dir <typo>` failing every parametrized test (hundreds of errors)
    instead of one usage error before collection."""
    repo = Path(llama_parity.__file__).resolve().parent.parent
    tests = Path(__file__).resolve().parent / "test_transforms.py"
    proc = subprocess.run([sys.executable, "-m", "pytest", str(tests), "-p", "no:cacheprovider", "-q",
                           "--meta-dir", str(tmp_path / "typo")],
                          cwd=repo if (repo / "conftest.py").is_file() else tmp_path, capture_output=True,
                          text=True, env=os.environ.copy(), timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR, out
    assert out.count("llama-parity: --meta-dir") == 1 and "no such folder" in out and "passed" not in out


def test_pytest_meta_dir_judges_that_checkpoint_and_writes_nothing_here(tiny, tmp_path):
    """Bug class: `pytest --pyargs llama_parity.parity_tests --meta-dir DIR` running the ~800 tests about
    the tool (7.5 minutes) when the user wants their checkpoint judged, and leaving .pytest_cache/ and
    .hypothesis/ in the user's folder. Run from an empty folder on a module with no checkpoint test:
    everything is deselected (the rest needs --all-tests) and the folder stays empty (this module
    draws Hypothesis examples, which made .hypothesis/ there)."""
    from importlib.metadata import entry_points

    cwd = tmp_path / "user"
    cwd.mkdir()
    plugin = [] if any(ep.value == "llama_parity.pytest_plugin" for ep in entry_points(group="pytest11")) \
        else ["-p", "llama_parity.pytest_plugin"]  # a source checkout without an install
    base = [sys.executable, "-m", "pytest", *plugin, "--pyargs", "llama_parity.parity_tests.test_transforms",
            "-q", "--meta-dir", str(tiny.meta(VARIANT)), "--hf-dir", str(tiny.hf(VARIANT))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run(base, cwd=cwd, capture_output=True, text=True, env=env, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == pytest.ExitCode.NO_TESTS_COLLECTED and " deselected" in out, out
    assert os.listdir(cwd) == [], os.listdir(cwd)


def test_model_card_license_and_original(tiny, tmp_path, capsys):
    """Bug class: an output folder that does not say where its weights came from, drops Meta's license
    texts, or whose original/ copies differ from the download."""
    src = _copy(tiny, VARIANT, tmp_path)
    (src.parent / "LICENSE").write_text("Meta license text\n")  # Meta's downloads put these at the root
    (src.parent / "USE_POLICY.md").write_text("use policy\n")
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    code, out, _ = run(capsys, "convert", "--input-dir", src, "--output-dir", tmp_path / "hf", "--keep-original",
                       "--verify")
    hf = tmp_path / "hf"
    card = (hf / "README.md").read_text()
    assert code == 0 and f"verify result recorded in {hf / 'README.md'}" in out
    for fact in (src.name, VARIANT, "Llama 3.2 1B", f"llama-parity {llama_parity.__version__}", "PARITY OK",
                 "| logits (fp32) |"):
        assert fact in card, fact
    assert (hf / "LICENSE").read_text() == "Meta license text\n" and (hf / "USE_POLICY.md").is_file()
    for name in ("params.json", "consolidated.00.pth", "tokenizer.model"):
        assert (hf / "original" / name).read_bytes() == (src / name).read_bytes()
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before  # the download untouched


def test_model_card_without_verify(tiny, tmp_path, capsys):
    """Bug class: a card claiming a verify result that was never run, or license files invented."""
    code, _, _ = run(capsys, "convert", "--input-dir", tiny.meta(VARIANT), "--output-dir", tmp_path / "hf")
    card = (tmp_path / "hf" / "README.md").read_text()
    assert code == 0 and "Not verified yet" in card and "PARITY" not in card
    assert not (tmp_path / "hf" / "LICENSE").exists() and not (tmp_path / "hf" / "original").exists()


def test_greedy_tokens_sets_the_check_and_says_its_cost(tiny, capsys, monkeypatch):
    """Bug class: --greedy-tokens ignored in either memory mode (a user trading greedy's extra passes
    over a 70B's disk-resident weights for time gets the default anyway), a nonsense count accepted,
    or the streamed report hiding that those passes go to the disk when the weights cannot be cached."""
    from llama_parity import verify as verify_mod

    meta, hf = tiny.meta(VARIANT), tiny.hf(VARIANT)
    for bad in ("0", "-3", "two"):
        with pytest.raises(SystemExit) as e:
            main(["verify", "--meta-dir", str(meta), "--hf-dir", str(hf), "--greedy-tokens", bad])
        assert e.value.code == 2 and "positive whole number" in capsys.readouterr().err
    for memory, n in (("full", 3), ("streaming", 2)):
        code, out, _ = run(capsys, "verify", "--meta-dir", meta, "--hf-dir", hf, "--no-bf16", "--no-tokenizer",
                           "--memory", memory, "--greedy-tokens", n, "--json", "-")
        greedy = next(c for c in json.loads(out)["checks"] if c["name"] == "greedy generation")
        assert code == 0 and greedy["detail"].startswith(f"{n} new tokens"), greedy
    assert "1 more time (one per new token), from the page cache" in " ".join(json.loads(out)["notes"])
    monkeypatch.setattr(verify_mod, "available_memory", lambda: 1000)  # the shards cannot stay cached
    assert "from disk" in verify_mod._greedy_cost(meta, 8) and "--greedy-tokens" in verify_mod._greedy_cost(meta, 8)


def test_closed_pipe_stops_quietly(tiny):
    """Bug class: `llama-parity inspect ... | head` printing `llama-parity: Broken pipe` and exiting 2
    (bad input) when the reader simply went away: quiet, exit 141 (128 + SIGPIPE) as shell tools do."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line is written
    try:  # `python -m llama_parity.cli inspect ...`, forked from here (its imports already done)
        p = Forked("import sys\nfrom llama_parity.cli import main\nsys.exit(main())",
                   ["inspect", "--input-dir", str(tiny.meta(VARIANT))], stdout_fd=write)
    finally:
        os.close(write)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 141 and err == "", err
