"""`verify --html report.html`: one self-contained HTML file (inline SVG charts, inline CSS, no network).

Sections: the verdict; every check with measured value, bound and result (pass green, fail red,
measured-only grey) and a chart of measured against bound; error per layer (where divergence starts);
error and next-token KL per position (a RoPE bug grows with position; two charts: two units); the
tokenizer checks with their mismatches; notes. Charts need the `plot` extra (matplotlib).
"""

from __future__ import annotations

import datetime
import html
from pathlib import Path

from . import __version__
from . import plots
from .parity import FP32_REL_BOUND, KL_LABEL
from .verify import format_value

CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;padding:0 1.5em;max-width:70em;color:#222}
h1{font-size:1.4em} h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em;width:100%} td,th{padding:.25em .6em;border-bottom:1px solid #eee;
text-align:left;vertical-align:top} td.num{text-align:right;font-family:monospace;white-space:nowrap}
.ok{color:#2e7d32;font-weight:600} .fail{color:#c62828;font-weight:600} .measured{color:#757575}
.verdict{padding:.6em 1em;border-radius:4px;color:#fff;font-size:1.2em;font-weight:700}
.verdict.ok{background:#2e7d32} .verdict.fail{background:#c62828} .small{color:#666;font-size:.85em}
svg{max-width:100%;height:auto} code{background:#f4f4f4;padding:0 .2em}
"""


def _e(x) -> str:
    return html.escape(str(x))


def _result_cell(ok: bool, measured_only: bool = False) -> str:
    if measured_only:
        return '<td class="measured">measured, not judged</td>'
    return '<td class="ok">ok</td>' if ok else '<td class="fail">FAIL</td>'


def _checks_table(report) -> str:
    rows = ["<table><tr><th>check</th><th>measured</th><th>bound</th><th>result</th><th>catches / detail</th></tr>"]
    for c in report.checks:
        rows.append(f"<tr><td>{_e(c.name)}</td><td class=num>{_e(format_value(c.measured))}</td>"
                    f"<td class=num>{_e(format_value(c.bound))}</td>{_result_cell(c.ok)}"
                    f"<td>{_e(c.catches)}<br><span class=small>{_e(c.detail)}</span></td></tr>")
    rows.append("</table>")
    return "\n".join(rows)


def _tokenizer_section(tok) -> str:
    if tok is None:
        return "<p>tokenizer parity not checked (see notes).</p>"
    rows = [f"<p class=small>{_e(tok.tokenizer_model)} ({_e(tok.kind)}) against {_e(tok.hf_dir)}. "
            "Rows marked <em>measured</em> are known, documented differences reported with their counts, not "
            "failures: see <code>docs/tokenizers.md</code>, “What is exact and what is measured”.</p>",
            "<table><tr><th>check</th><th>mismatches</th><th>bound</th><th>result</th><th>examples</th></tr>"]
    for c in tok.checks:
        examples = "<br>".join(f"<code>{_e(repr(m.text)[:80])}</code>: meta={_e(str(m.meta)[:60])} "
                               f"hf={_e(str(m.hf)[:60])}" for m in c.examples[:3])
        bound = "none" if c.bound is None else f"≤ {c.bound}"
        counted = f"{c.mismatches}/{c.total}" + (" known differences" if c.bound is None else "")
        rows.append(f"<tr><td>{_e(c.name)}</td><td class=num>{counted}</td><td class=num>{bound}</td>"
                    f"{_result_cell(c.ok, c.bound is None)}<td class=small>{examples}</td></tr>")
    rows.append("</table>")
    return "\n".join(rows)


def layer_stages(report, variant_id: str | None = None, *,
                 measure: bool = True) -> tuple[list[tuple[str, float, bool]] | None, str]:
    """Error after each layer: from the streamed per-layer check when it ran, else one traced forward
    of both models (the same comparison `diagnose` makes). Returns (stages, how they were measured)."""
    for c in report.checks:
        if c.series and c.series.get("x_label") == "layer":
            return [(f"layer {x}", y, y <= c.bound) for x, y in zip(c.series["x"], c.series["y"])], \
                "hidden state after each layer, streamed"
    if not measure:
        return None, ("error per layer not measured in a distributed run (it would load both whole models into "
                      "one process): `llama-parity diagnose` measures it where the models fit")
    from llama_parity.reference_model.model import load_meta_checkpoint

    from .diagnose import compare_stages
    from .parity import expected_rope_scaling, load_hf_model, model_prompts

    meta_dir, hf_dir = Path(report.meta_dir), Path(report.hf_dir)
    ref = load_meta_checkpoint(meta_dir, rope_scaling=expected_rope_scaling(meta_dir, variant_id, hf_dir=hf_dir))
    hf = load_hf_model(hf_dir)
    stages = compare_stages(ref, hf, model_prompts(meta_dir, min(hf.config.vocab_size, ref.args.vocab_size)).main)
    return [(s.name, s.rel_diff, s.ok) for s in stages], "output of each stage, one fp32 forward of both models"


def _figure_block(fig, caption: str) -> str:
    if fig is None:
        return f"<p class=small>{_e(caption)}: no data.</p>"
    return f"<figure>{plots.to_svg(fig)}<figcaption class=small>{_e(caption)}</figcaption></figure>"


def _charts(report, stages, stages_how: str) -> dict[str, str]:
    numeric = [(c.name, float(c.measured), float(c.bound), c.ok) for c in report.checks if c.bound > 0]
    out = {"checks": "<p class=small>no numeric checks ran.</p>", "layers": "", "positions": ""}
    if numeric:
        fig, (ax,) = plots.figure(1, 0.45 * len(numeric) + 1.2)
        plots.checks_axes(ax, numeric)
        out["checks"] = _figure_block(fig, "numeric checks: bar = measured, black tick = bound")
    if stages:
        fig, (ax,) = plots.figure(1, 3.4)
        plots.layers_axes(ax, stages, FP32_REL_BOUND)
        out["layers"] = _figure_block(fig, f"{stages_how}; relative to the largest reference value")
    else:
        out["layers"] = f"<p class=small>{_e(stages_how)}</p>"
    out["positions"] = _position_charts(report)
    return out


def _position_charts(report) -> str:
    """Relative logit error and next-token KL per position, in two charts: nats and relative error are
    different units with different bounds (1e-6 nats vs 1e-4), one axis would misread both."""
    series = {c.name: c.series for c in report.checks if c.series and c.series.get("x_label") == "position"}
    bounds = {c.name: c.bound for c in report.checks}
    kl = {k: s for k, s in series.items() if s.get("y_label") == KL_LABEL}
    rel = {k: s for k, s in series.items() if k not in kl}
    blocks = [_figure_block(plots.position_figure(rel, bounds, "error per position"),
                            "max |diff| over the vocabulary at each position / max |logit|")]
    if kl:
        blocks.append(_figure_block(
            plots.position_figure(kl, bounds, "next-token KL per position", ylabel="KL (nats)"),
            "KL(p_Meta fp32 || p_HF) of the next-token distributions at each position, in nats (HF in fp32, "
            "and in bf16 when it ran); the check's value is the maximum over positions"))
    return "\n".join(blocks)


def render_html(report, stages=None, stages_how: str = "") -> str:
    charts = _charts(report, stages, stages_how)
    verdict = report.verdict
    failed = [c for c in report.checks if not c.ok]
    fails = "".join(f"<li><b>{_e(c.name)}</b>: {_e(c.detail)} (catches: {_e(c.catches)})</li>" for c in failed)
    notes = "".join(f"<li>{_e(n)}</li>" for n in report.notes) or "<li>none</li>"
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!doctype html>
<html lang=en><head><meta charset=utf-8><title>llama-parity verify: {_e(verdict)}</title>
<style>{CSS}</style></head><body>
<h1>llama-parity verify</h1>
<div class="verdict {'ok' if report.ok else 'fail'}">{verdict}</div>
<p class=small>Meta checkpoint <code>{_e(report.meta_dir)}</code><br>HF folder <code>{_e(report.hf_dir)}</code><br>
device {_e(report.device)} · llama-parity {_e(__version__)} · {when}</p>
{f'<ul>{fails}</ul>' if fails else ''}
<h2>Checks: measured against bound</h2>
{charts['checks']}
{_checks_table(report)}
<h2>Error per layer</h2>
{charts['layers']}
<h2>Error per position</h2>
{charts['positions']}
<h2>Tokenizer</h2>
{_tokenizer_section(report.tokenizer)}
<h2>Notes</h2>
<ul>{notes}</ul>
</body></html>
"""


def write_html(report, path: str | Path, *, variant_id: str | None = None, measure_layers: bool = True) -> Path:
    """Write the report; per-layer errors are measured here when the checks did not record them
    (unless `measure_layers` is False: a distributed run, whose models need not fit in one process)."""
    try:
        stages, how = layer_stages(report, variant_id, measure=measure_layers)
    except Exception as e:  # noqa: BLE001 - the report still shows every check; say why this part is missing
        stages, how = None, f"error per layer not measured: {type(e).__name__}: {str(e)[:200]}"
    from .report_files import write_atomic

    return write_atomic(path, render_html(report, stages, how))  # whole or not at all
