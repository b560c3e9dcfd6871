"""``keenlm report FOLDER...``: one self-contained HTML page of runs, sweeps and studies
(keenlm.report)."""
from __future__ import annotations

from keenlm.report import build_report


def add_parser(sub, fmt):
    rp = sub.add_parser("report", help="one self-contained HTML page of runs, sweeps and studies",
                        formatter_class=fmt)
    rp.add_argument("folders", nargs="+", help="run, scaling sweep or study folders")
    rp.add_argument("--out", default="report.html", help="the page (charts go next to it)")
    return rp


def run(args) -> int:
    page = build_report(args.folders, args.out)
    print(f"wrote {page} (charts as SVG and PNG in {page.stem}_files/)")
    return 0
