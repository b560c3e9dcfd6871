"""``keenlm report RUN_OR_SWEEP... --out report.html``: one self-contained HTML page.

Each argument is a folder; what it holds decides its section:

- a training run (``config.json`` + ``metrics.jsonl``): its loss curves (training loss by step,
  validation loss where evaluated), its ledger (parameters, FLOPs, tokens, time), and the
  run's own charts (``*.svg``: RL curves, ...);
- a scaling sweep (``trials/*/trial.json``): the trials, the fit of L(N) or L(N, D) with
  bootstrap intervals (``keenlm.scaling``), and the data points with the fitted curve and its
  90% band;
- a study (``results.md``: low-bit frontier, PTQ, RL, test-time compute, the prediction
  check): its tables and charts.

Every chart is inlined as SVG (no script, no network, nothing outside the file) and also
written as SVG and PNG next to the page (``<page>_files/``).
"""
from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from keenlm.plot import line_chart
from keenlm.runs import atomic_write_text, read_jsonl
from keenlm.scaling.fit import Law, interval
from keenlm.scaling.sweep import finished, fit_trials

STYLE = """body{font-family:sans-serif;max-width:960px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:1em 0;font-size:.9em}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}th{background:#f4f4f4}
.chart{margin:1em 0}code{background:#f4f4f4;padding:0 .2em}"""


def markdown(text: str) -> str:
    """The Markdown the studies write (headings, bullet lists, pipe tables, paragraphs,
    **bold**, `code`) as HTML; everything else is escaped text."""
    out, para, table, items = [], [], [], []

    def inline(s: str) -> str:
        s = html.escape(s)
        s = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", s)
        return re.sub(r"`(.+?)`", r"<code>\1</code>", s)

    def flush():
        if para:
            out.append(f"<p>{inline(' '.join(para))}</p>")
            para.clear()
        if items:
            out.append("<ul>" + "".join(f"<li>{inline(i)}</li>" for i in items) + "</ul>")
            items.clear()
        if table:
            rows = [r for r in table if not re.fullmatch(r"\|[\s:|-]+\|", r)]
            cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
            head = "".join(f"<th>{inline(c)}</th>" for c in cells[0])
            body = "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>"
                           for r in cells[1:])
            out.append(f"<table><tr>{head}</tr>{body}</table>")
            table.clear()

    for line in text.splitlines():
        s = line.strip()
        if s.startswith("|"):
            if para or items:
                flush()
            table.append(s)
        elif s.startswith("- "):
            if para or table:
                flush()
            items.append(s[2:])
        elif s.startswith("#"):
            flush()
            level = min(4, len(s) - len(s.lstrip("#")) + 2)
            out.append(f"<h{level}>{inline(s.lstrip('#').strip())}</h{level}>")
        elif not s:
            flush()
        else:
            if table or items:
                flush()
            para.append(s)
    flush()
    return "\n".join(out)


def _svg(path: Path) -> str:
    text = path.read_text()
    if "<script" in text.lower():  # only our own charts are inlined
        raise ValueError(f"{path}: an SVG with a script is not inlined in a report")
    return f'<div class="chart">{text}</div>'


def _table(rows: list[dict], keys: list[str]) -> str:
    def fmt(v):
        return f"{v:,}" if isinstance(v, int) else f"{v:.4g}" if isinstance(v, float) else str(v)

    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(r.get(k, '')))}</td>" for k in keys)
                   + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _run_section(folder: Path, files: Path, tag: str) -> str:
    recs = read_jsonl(folder / "metrics.jsonl")
    train = [(r["step"], r["loss"]) for r in recs if r.get("kind") == "train" and "loss" in r]
    evals = [(r["step"], r["loss"]) for r in recs if r.get("kind") == "eval" and "loss" in r]
    parts = []
    if train or evals:
        chart = line_chart({"training loss": train, "validation loss": evals},
                           files / f"{tag}_loss.svg", x_label="step", y_label="loss (nats/token)")
        parts.append(_svg(chart))
    ledger = folder / "ledger.json"
    if ledger.exists():
        led = json.loads(ledger.read_text())
        rows = [{"item": f"parameters ({k})", "value": v} for k, v in led.get("params", {}).items()]
        rows += [{"item": k.replace("_", " "), "value": led[k]} for k in
                 ("tokens_seen", "flops_total", "wall_time_s", "tokens_per_s",
                  "achieved_flops_per_s") if k in led]
        parts.append("<h3>Ledger</h3>" + _table(rows, ["item", "value"]))
    for svg in sorted(folder.glob("*.svg")):
        parts.append(f"<h3>{html.escape(svg.stem)}</h3>" + _svg(svg))
    return "\n".join(parts)


def _sweep_section(folder: Path, files: Path, tag: str) -> str:
    runs = sorted(finished(folder), key=lambda r: (r["tokens"], r["params_non_embedding"]))
    parts = [_table(runs, ["name", "params_non_embedding", "params", "tokens", "val_loss",
                           "flops", "seconds"])]
    if len(runs) < 3:
        return parts[0] + "<p>Fewer than 3 finished trials: no fit yet.</p>"
    try:
        fit = fit_trials(runs, samples=100)
    except ValueError as e:
        return parts[0] + f"<p>No fit: {html.escape(str(e))}</p>"
    f, c = fit["non_embedding"]["fit"], fit["non_embedding"]["constants"]
    parts.append(f"<p>{fit['law']} fitted on {fit['runs']} runs, N without embeddings "
                 "(Chinchilla approach 3; 90% bootstrap intervals): " +
                 ", ".join(f"{k} = {f[k]:.4g} [{c[k][0]:.4g}, {c[k][1]:.4g}]" for k in c) + "</p>")
    ns = sorted({r["params_non_embedding"] for r in runs})
    grid = [ns[0] * (ns[-1] * 4 / ns[0]) ** (i / 40) for i in range(41)]  # to 4x the largest
    series, tokens = {}, sorted({r["tokens"] for r in runs})
    for d in tokens:
        series[f"trained, {d:,} tokens"] = [(r["params_non_embedding"], r["val_loss"])
                                            for r in runs if r["tokens"] == d]
        p = interval(fit["non_embedding"], grid, [d] * len(grid) if Law(**f).two_variable else None)
        series[f"fit, {d:,} tokens"] = list(zip(grid, p["loss"]))
        if d == tokens[-1]:  # the band of the most-trained curve
            series["90% interval, low"] = list(zip(grid, p["low"]))
            series["90% interval, high"] = list(zip(grid, p["high"]))
    chart = line_chart(series, files / f"{tag}_scaling.svg",
                       x_label="parameters without embeddings (log scale)",
                       y_label="validation loss (nats/token)", log_x=True)
    parts.append(_svg(chart))
    return "\n".join(parts)


def _study_section(folder: Path) -> str:
    parts = [markdown((folder / "results.md").read_text())]
    for svg in sorted(folder.glob("*.svg")):
        parts.append(f"<h3>{html.escape(svg.stem)}</h3>" + _svg(svg))
    return "\n".join(parts)


def build_report(folders, out) -> Path:
    """Write the page to ``out`` (atomically) and its charts to ``<out stem>_files/``."""
    out = Path(out)
    files = out.with_name(out.stem + "_files")
    files.mkdir(parents=True, exist_ok=True)
    if not folders:
        raise ValueError("name at least one run, sweep or study folder")
    sections = []
    for k, folder in enumerate(map(Path, folders)):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: not a folder")
        tag = f"{k}_{re.sub(r'[^A-Za-z0-9_-]', '_', folder.name)}"
        kinds = []
        if (folder / "config.json").exists() and (folder / "metrics.jsonl").exists():
            kinds.append(("training run", _run_section(folder, files, tag)))
        if list(folder.glob("trials/*/trial.json")):
            kinds.append(("scaling sweep", _sweep_section(folder, files, tag)))
        if (folder / "results.md").exists():
            kinds.append(("study", _study_section(folder)))
        if not kinds:
            raise ValueError(f"{folder}: not a run (config.json + metrics.jsonl), a sweep "
                             "(trials/*/trial.json) or a study (results.md)")
        for kind, body in kinds:
            sections.append(f"<h2>{html.escape(folder.name)} <small>({kind})</small></h2>\n{body}")
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>keenlm report</title><style>{STYLE}</style></head><body>\n"
            "<h1>keenlm report</h1>\n<p>" +
            ", ".join(f"<code>{html.escape(str(f))}</code>" for f in folders) + "</p>\n" +
            "\n".join(sections) + "\n</body></html>\n")
    atomic_write_text(out, page)
    return out


BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def screenshot(page, png, width: int = 1000, height: int = 2400, timeout: float = 60) -> list[str]:
    """Render ``page`` in headless Chromium to ``png``; returns the page's console messages
    (a page of ours has no script, so any message is a fault). Network off."""
    exe = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if exe is None:
        raise FileNotFoundError("no Chromium found: apt-get install chromium (Debian/Ubuntu)")
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             '--host-resolver-rules=MAP * ~NOTFOUND', f"--user-data-dir={profile}",
             "--enable-logging=stderr", "--v=0", f"--screenshot={png}",
             f"--window-size={width},{height}", Path(page).resolve().as_uri()],
            capture_output=True, text=True, timeout=timeout)
    if not Path(png).exists():
        raise RuntimeError(f"Chromium wrote no screenshot (exit {proc.returncode}): "
                           f"{proc.stderr[-500:]}")
    return [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
