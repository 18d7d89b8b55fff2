"""Reports people look at: `verify --html` and `diagnose --plot`.

The HTML must carry every check with its measured value and bound (a report that drops a failing
check or shows another number than the table is worse than none), be self-contained (no network),
and the per-position series must be the same measurement as the check's value.
"""

from __future__ import annotations

import html
import json
import re
import sys

import pytest
import torch

from llama_parity.cli import main
from llama_parity.mutations import BY_NAME, mutate_copy
from llama_parity.parity import KL_LABEL, Check, bf16_checks, distribution_checks
from llama_parity.report_html import render_html
from llama_parity.verify import VerifyReport, format_value, verify

VARIANT = "llama3.2-1b"  # tied, GQA, RoPE factor 32: the release where RoPE bugs hide best
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def broken(tiny, tmp_path_factory):
    """A conversion with rope_theta dropped: every numeric check fails, error grows with position."""
    return mutate_copy(tiny.hf(VARIANT), tmp_path_factory.mktemp("reports") / "hf", BY_NAME["rope_theta_dropped"])


@pytest.fixture(scope="module")
def broken_report(tiny, broken):
    return verify(tiny.meta(VARIANT), broken, bf16=False, tokenizer=False)


def test_series_is_the_checks_measurement(broken_report):
    """Bug class: a per-position chart that plots another quantity than the check judged (its maximum
    must be the check's value), or positions that are not the ones the check ran."""
    with_series = [c for c in broken_report.checks if c.series]
    assert {c.name for c in with_series} >= {"logits (fp32)", "kv-cache decode", "far positions",
                                             "next-token KL (fp32)"}
    for c in with_series:
        assert max(c.series["y"]) == pytest.approx(c.measured, rel=1e-6), c.name
        assert len(c.series["x"]) == len(c.series["y"])
    far = next(c for c in with_series if c.name == "far positions")
    assert min(far.series["x"]) >= 8192
    logits = next(c for c in with_series if c.name == "logits (fp32)")
    # a RoPE theta bug: nothing at position 0 (no rotation there), large later on
    assert logits.series["y"][0] < 1e-4 < max(logits.series["y"][1:])


def test_kl_series_shows_where_the_conversion_breaks(broken_report):
    """Bug class: a KL chart with positions missing or lumped together (one mean for the prompt hides
    where a conversion breaks), KL charted in the unit of relative logit error, or a broken conversion
    whose per-position KL never crosses the bound the check failed on."""
    by_name = {c.name: c for c in broken_report.checks}
    kl, logits = by_name["next-token KL (fp32)"], by_name["logits (fp32)"]
    n = len(logits.series["x"])
    assert kl.series["x"] == list(range(n)) == logits.series["x"] and len(kl.series["y"]) == n
    assert kl.series["y_label"] == KL_LABEL and "y_label" not in logits.series
    assert not kl.ok and any(y > kl.bound for y in kl.series["y"])
    assert by_name["top-1 agreement (fp32)"].series is None  # counts flips: see distribution_checks


def test_bf16_kl_series_marks_the_broken_position():
    """Bug class: the bf16 KL series not aligned with positions (an off-by-one, a reversed order) or not
    the check's measurement: one position of HF's bf16 logits is scrambled, only it may cross the bound;
    and a top-1 detail that does not name the position where the predicted token flipped."""
    g = torch.Generator().manual_seed(0)
    ref32 = 4 * torch.randn(6, 50, generator=g)
    ref16 = ref32.bfloat16().float()
    hf16 = ref16.clone()
    hf16[3] = hf16[3].roll(1)
    by_name = {c.name: c for c in bf16_checks(ref32, ref16, hf16, hf16)}
    kl, rel = by_name["next-token KL (bf16)"], by_name["logits (bf16)"]
    for c in (kl, rel):
        assert c.series["x"] == list(range(6)) and max(c.series["y"]) == pytest.approx(c.measured, rel=1e-6)
        assert [x for x, y in zip(c.series["x"], c.series["y"]) if y > c.bound] == [3], c.name
    assert kl.series["y_label"] == KL_LABEL
    assert "differs at 1 of" in (top1 := distribution_checks(ref32, hf16, "test")[1]).detail and "(at 3)" in top1.detail


def test_html_report_has_every_check(tiny, broken, tmp_path, capsys):
    """Bug class: an HTML report missing a check, showing a different measured value or bound than
    the text report, hiding a failure, or loading anything from the network."""
    out, js = tmp_path / "report.html", tmp_path / "report.json"
    code = main(["verify", "--meta-dir", str(tiny.meta(VARIANT)), "--hf-dir", str(broken), "--no-bf16",
                 "--html", str(out), "--json", str(js)])
    assert code == 1 and f"report: {out}" in capsys.readouterr().out
    page, rep = out.read_text(), json.loads(js.read_text())
    for c in rep["checks"]:
        assert html.escape(c["name"]) in page and format_value(c["measured"]) in page and format_value(c["bound"]) in page, c["name"]
    for c in rep["tokenizer"]["checks"]:
        assert html.escape(c["name"]) in page and f"{c['mismatches']}/{c['total']}" in page, c["name"]
    assert "PARITY FAILED" in page and page.count('class="fail"') >= sum(not c["ok"] for c in rep["checks"])
    assert page.count("<svg") >= 4  # measured vs bound, per layer, error per position, KL per position
    assert "next-token KL per position" in page and "KL (nats)" in page  # KL in its own chart and unit
    assert "first divergence: layer 0" in page  # streamed (per layer) or full (per stage)
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page), "report must not load from the network"


def test_html_report_passing_conversion():
    """Bug class: a report that shows FAIL (or no verdict) for a conversion at parity."""
    rep = VerifyReport("meta", "hf", "cpu", [Check("logits (fp32)", "bugs", 3e-7, 1e-4, True),
                                               Check("greedy generation", "bugs", 0.0, 0.0, True)])
    page = render_html(rep, [("embedding", 0.0, True), ("logits", 3e-7, True)], "test")
    assert "PARITY OK" in page and 'class="fail"' not in page and "3.00e-07" in page and "<svg" in page


def test_diagnose_plot_is_a_png(tiny, tmp_path, capsys):
    """Bug class: --plot silently not written, or written in a format image viewers reject."""
    png = tmp_path / "diag.png"
    code = main(["diagnose", "--meta-dir", str(tiny.meta(VARIANT)), "--hf-dir", str(tiny.hf(VARIANT)),
                 "--plot", str(png)])
    assert code == 0 and f"plot: {png}" in capsys.readouterr().out
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 500 and height > 500


@pytest.mark.parametrize("argv", [["verify", "--html", "r.html"], ["verify", "--nproc", "2", "--html", "r.html"],
                                  ["diagnose", "--plot", "d.png"]])
def test_missing_plot_extra_exit_two(tmp_path, capsys, monkeypatch, argv):
    """Bug class: a missing optional dependency ending in a traceback (or after the long run) instead
    of one line naming the extra to install."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.chdir(tmp_path)
    code = main([argv[0], "--meta-dir", str(tmp_path / "m"), "--hf-dir", str(tmp_path / "h"), *argv[1:]])
    out, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("llama-parity: ") and "llama-parity[plot]" in err and "Traceback" not in err
    assert not (tmp_path / argv[-1]).exists()
