"""Line charts as plain SVG (no plotting library, no network, readable in any browser) and,
where matplotlib is installed, the same chart as a PNG file beside it.

``line_chart({name: [(x, y), ...]}, path)`` draws each series as a polyline with points, axes
with ticks, and a legend. Used for run curves (RL reward and pass@1), study results and
scaling fits; the report page (``keenlm.report``) inlines the SVGs.
"""
from __future__ import annotations

import html
import io
import math
from pathlib import Path

from keenlm.runs import atomic_write_bytes, atomic_write_text

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#222222", "#8c564b",
          "#e377c2", "#17becf", "#bcbd22")
_said = []


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    return [lo + (hi - lo) * i / n for i in range(n + 1)]


def line_chart(series: dict[str, list[tuple[float, float]]], path, *, x_label: str = "",
               y_label: str = "", y_range: tuple[float, float] | None = None,
               log_x: bool = False, width: int = 640, height: int = 400, png: bool = True) -> Path:
    """Write an SVG chart of ``series`` to ``path`` (atomically); empty series are skipped.
    ``log_x``: x on a log10 scale (positive x only), ticks labelled with the values. ``png``:
    also ``path`` with the suffix .png (matplotlib; skipped, said once, when not installed)."""
    if png:
        _png(series, Path(path).with_suffix(".png"), x_label, y_label, y_range, log_x)

    if log_x:
        series = {k: [(math.log10(x), y) for x, y in s if x > 0] for k, s in series.items()}
    pts = [(x, y) for s in series.values() for x, y in s if y is not None]
    names = [n for n, s in series.items() if s]
    legend = 14 + 7 * max((len(n) for n in names), default=0)  # legend column, right of the plot
    W, H, L, B, R, TOP = width + legend, height, 60, 45, 20 + legend, 20
    xs = [x for x, _ in pts] or [0.0, 1.0]
    ys = [y for _, y in pts] or [0.0, 1.0]
    x0, x1 = min(xs), max(xs)
    if x1 == x0:
        x1 = x0 + 1
    y0, y1 = y_range if y_range else (min(ys), max(ys))
    if y1 == y0:
        y1 = y0 + 1
    X = lambda v: L + (v - x0) / (x1 - x0) * (W - L - R)  # noqa: E731
    Y = lambda v: TOP + (y1 - v) / (y1 - y0) * (H - TOP - B)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
             f'font-family="sans-serif" font-size="12">',
             f'<rect width="{W}" height="{H}" fill="white"/>',
             f'<line x1="{L}" y1="{H - B}" x2="{W - R}" y2="{H - B}" stroke="black"/>',
             f'<line x1="{L}" y1="{TOP}" x2="{L}" y2="{H - B}" stroke="black"/>',
             f'<text x="{(W + L) / 2}" y="{H - 8}" text-anchor="middle">{html.escape(x_label)}</text>',
             f'<text x="14" y="{H / 2}" transform="rotate(-90 14 {H / 2})" '
             f'text-anchor="middle">{html.escape(y_label)}</text>']
    decades = list(range(math.ceil(x0), math.floor(x1) + 1)) if log_x else []
    for v in decades if len(decades) >= 2 else _ticks(x0, x1):
        parts.append(f'<line x1="{X(v):.1f}" y1="{H - B}" x2="{X(v):.1f}" y2="{H - B + 5}" '
                     f'stroke="black"/><text x="{X(v):.1f}" y="{H - B + 18}" '
                     f'text-anchor="middle">{10 ** v if log_x else v:.4g}</text>')
    for v in _ticks(y0, y1):
        parts.append(f'<line x1="{L}" y1="{Y(v):.1f}" x2="{W - R}" y2="{Y(v):.1f}" stroke="#eeeeee"/>'
                     f'<text x="{L - 6}" y="{Y(v) + 4:.1f}" text-anchor="end">{v:.3g}</text>')
    shown = [(name, s) for name, s in series.items() if s]
    for k, (name, s) in enumerate(shown):
        color, name = COLORS[k % len(COLORS)], html.escape(name)
        dash = ' stroke-dasharray="6 3"' if k >= len(COLORS) else ""
        s = sorted((x, y) for x, y in s if y is not None)
        line = " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in s)
        parts.append(f'<polyline points="{line}" fill="none" stroke="{color}" stroke-width="1.5"{dash}/>')
        if len(s) <= 60:
            parts += [f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="3" fill="{color}">'
                      f'<title>{name}: {x:g}, {y:.4g}</title></circle>' for x, y in s]
        parts.append(f'<rect x="{W - R + 12}" y="{TOP + 6 + 18 * k}" width="12" height="12" '
                     f'fill="{color}"/><text x="{W - R + 28}" y="{TOP + 16 + 18 * k}">{name}</text>')
    parts.append("</svg>")
    path = Path(path)
    atomic_write_text(path, "\n".join(parts) + "\n")
    return path


def _png(series, path: Path, x_label, y_label, y_range, log_x) -> None:
    try:
        import matplotlib  # optional extra (pip install keenlm[report]), and slow to import
    except ImportError:
        if not _said:
            _said.append(True)
            print("PNG plots need matplotlib (pip install 'keenlm[report]'); writing SVG only")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional extra, as above

    fig, ax = plt.subplots(figsize=(8.4, 4.2), dpi=100)
    for k, (name, s) in enumerate((n, s) for n, s in series.items() if s):
        s = sorted((x, y) for x, y in s if y is not None and (x > 0 or not log_x))
        ax.plot([x for x, _ in s], [y for _, y in s], marker="o" if len(s) <= 60 else None,
                markersize=3, color=COLORS[k % len(COLORS)], label=name,
                linestyle="--" if k >= len(COLORS) else "-")
    if log_x:
        ax.set_xscale("log")
    if y_range:
        ax.set_ylim(*y_range)
    ax.set_xlabel(x_label), ax.set_ylabel(y_label)
    ax.grid(alpha=0.3), ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
