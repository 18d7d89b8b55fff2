"""llama_parity.tokenizer_check: the report `verify` prints (check, measured, bound, ok) and its details."""

from __future__ import annotations

import json
import shutil

import pytest

from llama_parity.fixtures.tokenizers import hf_tokenizer, tokenizer_cases
from llama_parity.tokenizer_check import TokenizerReport, check_tokenizer, first_diff


@pytest.fixture(scope="session")
def tok_cases(tmp_path_factory):
    return tokenizer_cases(tmp_path_factory.mktemp("tokenizers"))


def test_report_shape_and_classes(tok_cases):
    """Bug class: a report that hides measured classes inside exact ones, or cannot be printed/serialized
    by verify (rows, to_dict), or loses the mismatch details (string, both id lists, first diff)."""
    case = tok_cases["tiny-llama3.1-instruct"]
    report = check_tokenizer(case.model_path, case.hf_dir, corpus=["extra string", "\n\nextra"],
                             hf_tokenizer=hf_tokenizer(case))
    assert isinstance(report, TokenizerReport) and report.ok
    d = json.loads(json.dumps(report.to_dict()))
    assert d["ok"] is True and d["kind"] == "tiktoken"
    names = [c["name"] for c in d["checks"]]
    for expected in ("encode with bos", "encode without bos", "decode",
                     "special-token text, strict (split_special_tokens=True)",
                     "special-token text, HF default parsing", "runs longer than 25,000 chars",
                     "chat template == Meta chat format"):
        assert expected in names
    rows = report.rows()
    assert all(len(r) == 4 and isinstance(r[3], bool) for r in rows)
    boundary = next(c for c in report.checks if c.name.startswith("chat boundary"))
    assert boundary.bound is None and boundary.mismatches > 0
    ex = boundary.examples[0]
    assert ex.first_diff == first_diff(ex.meta, ex.hf) >= 0 and ex.meta != ex.hf
    assert any("first diff at" in line for line in report.mismatch_lines())


def test_report_fails_on_a_wrong_tokenizer(tok_cases, tmp_path):
    """Bug class: verify passing a directory whose tokenizer belongs to another model (here: the tiny
    Code Llama HF output judged against the tiny Llama 2 file)."""
    src = tok_cases["tiny-llama2-chat"]
    other = tok_cases["tiny-codellama-instruct"]
    shutil.copytree(other.hf_dir, tmp_path / "hf")
    report = check_tokenizer(src.model_path, tmp_path / "hf")
    assert not report.ok
    failing = [r for r in report.rows() if not r[3]]
    assert failing and all(r[2].startswith("<=") for r in failing)


def test_first_diff():
    """Bug class: an off-by-one first differing position in mismatch reports."""
    assert first_diff([1, 2, 3], [1, 2, 3]) == -1
    assert first_diff([1, 2, 3], [1, 5, 3]) == 1
    assert first_diff([1, 2], [1, 2, 3]) == 2
    assert first_diff("abc", "abd") == 2
    assert first_diff(612, 628) == 0 and first_diff(5, 5) == -1
