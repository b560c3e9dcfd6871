"""The report page: Markdown tables, every kind of folder, and a render in headless Chromium."""
import os
import shutil

import pytest

from keenlm.report import BROWSERS, build_report, markdown, screenshot


def test_markdown_tables_lists_and_escaping():
    h = markdown("# Title\n\nsome **bold** <b>text</b>\n\n| a | b |\n|---|---|\n| 1 | `x` |\n\n- one\n- two")
    assert "<h3>Title</h3>" in h and "<b>bold</b> &lt;b&gt;text&lt;/b&gt;" in h
    assert "<table><tr><th>a</th><th>b</th></tr><tr><td>1</td><td><code>x</code></td></tr></table>" in h
    assert "<ul><li>one</li><li>two</li></ul>" in h


@pytest.fixture(scope="module")
def folders(tmp_path_factory, small_corpus):
    from keenlm.plot import line_chart
    from keenlm.scaling.sweep import grid, run_sweep
    from keenlm import train

    root = tmp_path_factory.mktemp("report")
    base = {"data": {"corpus": str(small_corpus), "tokenizer": "byte", "cache_dir": str(root / "c")},
            "model": {"max_seq_len": 32},
            "train": {"batch_size": 2, "seq_len": 32, "eval_every": 0, "eval_batches": 2,
                      "progress": False, "log_every": 2}}
    run = train({**base, "model": {"n_layer": 1, "d_model": 32, "n_head": 1, "max_seq_len": 32},
                 "train": {**base["train"], "steps": 6, "out_dir": str(root / "run")}}).run_dir
    run_sweep(grid(base, [1, 2, 3], [640]), root / "sweep", log=None)
    study = root / "study"
    study.mkdir()
    (study / "results.md").write_text("| model | loss |\n|---|---|\n| a | 1.0 |\n")
    line_chart({"curve": [(1, 2.0), (2, 1.5), (3, 1.2)]}, study / "curve.svg")
    return run, root / "sweep", study


def test_report_has_a_section_per_folder_and_png_copies(folders, tmp_path):
    page = build_report(folders, tmp_path / "r.html")
    text = page.read_text()
    assert text.count("<h2>") == 3 and "(training run)" in text and "(scaling sweep)" in text
    assert "L(N) fitted on 3 runs" in text and "<td>a</td><td>1.0</td>" in text
    assert text.count("<svg") == 3 and "<script" not in text and "http" not in text.split("<svg")[0]
    files = {p.name for p in (tmp_path / "r_files").iterdir()}
    assert {n for n in files if n.endswith(".png")} == {"0_run_loss.png", "1_sweep_scaling.png"}
    with pytest.raises(ValueError, match="not a run"):
        build_report([tmp_path / "r_files"], tmp_path / "x.html")


def test_report_renders_in_headless_chromium_without_console_errors(folders, tmp_path):
    if not any(shutil.which(b) for b in BROWSERS):
        if os.environ.get("CI"):
            pytest.fail("CI must have Chromium (.ci/run installs Debian's chromium)")
        pytest.skip("no Chromium here: apt-get install chromium")
    from PIL import Image

    page = build_report(folders, tmp_path / "r.html")
    console = screenshot(page, tmp_path / "shot.png")
    assert console == []
    img = Image.open(tmp_path / "shot.png").convert("RGB")
    colors = img.getcolors(maxcolors=1 << 20)
    blue = sum(n for n, c in colors if abs(c[0] - 0x1f) < 30 and abs(c[1] - 0x77) < 30
               and abs(c[2] - 0xb4) < 30)  # the first series' colour: the plots are drawn
    assert len(colors) > 50 and blue > 200
    # and the check can fail: a page that logs an error is caught
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>console.error('broken')</script></body></html>")
    assert any("broken" in m for m in screenshot(bad, tmp_path / "bad.png", 300, 200))
