"""Pictures of a parity result: measured against bound per check, error per layer, error per position.

Used by `diagnose --plot` (a PNG) and `verify --html` (inline SVG). matplotlib is an optional extra
(`pip install 'llama-parity[plot]'`): the converter and the checks never need it. Figures are built
with matplotlib's object API (no pyplot), so nothing touches a display or global state.

Every error axis is logarithmic: a correct conversion sits near 1e-7, the bound at 1e-4 and a layout
bug at 1e-2..1, three decades apart. Exact zeros (and, per position, anything more than 6 decades below
the lowest bound) are drawn at the axis floor.
"""

from __future__ import annotations

import io
from pathlib import Path

PASS, FAIL, INFO = "#2e7d32", "#c62828", "#757575"
REL_LABEL = "rel. diff"
EXTRA_HINT = "pip install 'llama-parity[plot]'"


class MissingExtra(Exception):
    """matplotlib is not installed (exit code 2 with the install command)."""


def require_matplotlib(flag: str) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MissingExtra(f"{flag} needs matplotlib, which is not installed: {EXTRA_HINT}") from None


def _num(x: float) -> str:
    """A bound as the report's table prints it (verify.format_value): a label rounded to 1e-04 beside a
    table saying 1.00e-04 is fine, but 3e-02 beside 2.50e-02 is not the same bound."""
    return "0" if x == 0 else f"{x:.2e}"


def _legend(ax) -> None:
    """Beside the axes, never over the data ('best' still covered points of the far-position panel)."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=8)


def figure(rows: int, height: float, width: float = 9.0):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, [fig.add_subplot(rows, 1, i + 1) for i in range(rows)]


def _floor(values: list[float], bounds: list[float]) -> float:
    positive = [v for v in list(values) + list(bounds) if v > 0]
    return min(positive) / 10 if positive else 1e-10


def _bound_line(ax, bound: float, label: str | None = None) -> None:
    ax.axhline(bound, color=FAIL, linestyle="--", linewidth=1, label=label or f"bound {_num(bound)}")


def checks_axes(ax, rows: list[tuple[str, float, float, bool]]) -> None:
    """Horizontal bars: each numeric check's measured value (green pass, red fail), its bound a black tick."""
    rows = [r for r in rows if r[2] > 0]  # exact checks (bound 0) are pass/fail tables, not charts
    floor = _floor([r[1] for r in rows], [r[2] for r in rows])
    ys = list(range(len(rows)))[::-1]
    ax.barh(ys, [max(r[1], floor) - floor for r in rows], left=floor, color=[PASS if r[3] else FAIL for r in rows],
            height=0.6)
    ax.scatter([r[2] for r in rows], ys, marker="|", s=400, color="black", zorder=3)
    for y, r in zip(ys, rows):
        ax.annotate(f"{r[1]:.1e}", (max(r[1], floor), y), xytext=(4, 0), textcoords="offset points",
                    va="center", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlim(floor, 10 * max([r[1] for r in rows] + [r[2] for r in rows]))
    ax.set_yticks(ys, [r[0] for r in rows], fontsize=9)
    ax.set_xlabel("measured (bar; green pass, red fail) vs bound (black tick), log scale; "
                  "each check in its own unit (relative error, or KL in nats)")


def layers_axes(ax, stages: list[tuple[str, float, bool]], bound: float) -> None:
    """Error after each stage (embedding, each layer's attention/feed-forward, logits): where divergence starts."""
    floor = _floor([s[1] for s in stages], [bound])
    xs = list(range(len(stages)))
    ax.plot(xs, [max(s[1], floor) for s in stages], color=INFO, linewidth=1, zorder=1)
    ax.scatter(xs, [max(s[1], floor) for s in stages], c=[PASS if s[2] else FAIL for s in stages], s=18, zorder=2)
    _bound_line(ax, bound)
    first = next((i for i, s in enumerate(stages) if not s[2]), None)
    if first is not None:
        ax.axvline(first, color=FAIL, linewidth=0.8, alpha=0.6)
        ax.annotate(f"first divergence: {stages[first][0]}", (first, bound), xytext=(6, 8),
                    textcoords="offset points", color=FAIL, fontsize=9)
    step = max(1, len(stages) // 24)
    ax.set_xticks(xs[::step], [s[0] for s in stages][::step], rotation=60, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("rel. diff (0 at the bottom)")
    ax.set_title("error per layer (stage by stage)", fontsize=10)
    _legend(ax)


def positions_axes(ax, series: dict[str, dict], bounds: dict[str, float], ylabel: str = REL_LABEL) -> None:
    """Error per position for each check that carries one (all in one unit); RoPE bugs grow with position."""
    values = [v for s in series.values() for v in s["y"]]
    # At most 6 decades below the lowest bound: float64 KL of a correct conversion reaches 1e-25 at
    # some positions, and 20 decades of axis would flatten everything that matters.
    floor = max(_floor(values, list(bounds.values())), min(bounds.values(), default=0) * 1e-6)
    for name, s in series.items():
        ax.plot(s["x"], [max(v, floor) for v in s["y"]], marker="o", markersize=3, linewidth=1, label=name)
    for b, style in zip(sorted(set(bounds.values())), ("--", ":", "-.")):
        whose = [k for k, v in bounds.items() if v == b]
        label = f"bound {_num(b)}" + (f" ({', '.join(whose)})" if len(set(bounds.values())) > 1 else "")
        ax.axhline(b, color=FAIL, linestyle=style, linewidth=1, label=label)
    ax.set_yscale("log")
    ax.ticklabel_format(axis="x", useOffset=False, style="plain")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("position")
    ax.set_ylabel(f"{ylabel} (0 at the bottom)")
    _legend(ax)


def split_near_far(series: dict[str, dict]) -> tuple[dict, dict]:
    """Far-position checks (positions past 8192) get their own panel: one axis from 0 to 12000 would
    squeeze the 24 near positions into a line."""
    far = {k: v for k, v in series.items() if v and v["x"] and min(v["x"]) >= 8192}
    near = {k: v for k, v in series.items() if v and v["x"] and k not in far}
    return near, far


def position_figure(series: dict[str, dict], bounds: dict[str, float], title: str, ylabel: str = REL_LABEL):
    near, far = split_near_far(series)
    panels = [p for p in (near, far) if p]
    if not panels:
        return None
    fig, axes = figure(len(panels), 2.6 * len(panels))
    for ax, panel in zip(axes, panels):
        positions_axes(ax, panel, {k: bounds[k] for k in panel}, ylabel)
    axes[0].set_title(title, fontsize=10)
    if far and len(panels) == 2:
        axes[1].set_title("far positions (after a jump past the original context)", fontsize=10)
    return fig


def diagnosis_figure(diag, bound: float):
    """diagnose --plot: error per stage on top, error per position (near, far) below."""
    stages = [(s.name, s.rel_diff, s.ok) for s in diag.stages]
    near, far = split_near_far(diag.series or {})
    panels = [p for p in (near, far) if p]
    fig, axes = figure(1 + len(panels), 3.6 + 2.4 * len(panels))
    layers_axes(axes[0], stages, bound)
    verdict = "no divergence" if diag.parity else f"first divergence: {diag.first_divergence}"
    if diag.explained_by:
        verdict += f"  |  diagnosis: {'; '.join(diag.explained_by)}"
    fig.suptitle(verdict[:150], fontsize=10)
    for ax, panel in zip(axes[1:], panels):
        positions_axes(ax, panel, {k: bound for k in panel})
        ax.set_title("error per position" + (" (far)" if panel is far else ""), fontsize=10)
    return fig


def save_png(fig, path: str | Path) -> None:
    from .report_files import write_atomic

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    write_atomic(path, buf.getvalue())  # whole or not at all


def to_svg(fig) -> str:
    """Inline SVG with text kept as text (small, selectable, no fonts embedded)."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        fig.savefig(buf, format="svg")
    text = buf.getvalue()
    return text[text.index("<svg"):]
