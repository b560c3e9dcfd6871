"""``keenlm study real --quick`` end to end on a tiny model: every stage runs and is recorded,
a second run resumes from the records, and the report page renders in headless Chromium.
(On SmolLM2 the same command is docs/real-model.md's; here a byte-level model exported to GGUF
stands in, so the test takes seconds, not minutes.)"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'keenlm[io]')")

from keenlm.config import ModelConfig  # noqa: E402
from keenlm.data import train_bpe  # noqa: E402
from keenlm.io.gguf_export import export_gguf  # noqa: E402
from keenlm.model import build_model  # noqa: E402
from keenlm.report import BROWSERS, build_report, screenshot  # noqa: E402
from keenlm.studies import STUDIES, real  # noqa: E402
from keenlm.studies.real import Options  # noqa: E402


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    tok = train_bpe(["12 + 34 = 46\n<answer>46</answer>\ndef add(a, b):\n    return a + b\n" * 40], 300)
    torch.manual_seed(0)
    net = build_model(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, d_model=64, n_head=2,
                                  d_ff=192, max_seq_len=256)).eval()
    model = export_gguf(net, tok, root / "tiny.gguf")
    opts = Options(model=str(model), template="plain", shots=0, quick=True, max_new_tokens=8)
    logs = []
    res = real.run(root / "out", opts, log=logs.append)
    return root / "out", opts, res, logs


def test_quick_study_runs_every_stage_and_records_it(study):
    out, opts, res, logs = study
    stages = ("base", "rl_full", "rl_lora", "search_full", "search_lora", "four_bit")
    assert all((out / "stages" / s / "study.json").exists() for s in stages)
    assert res["eval_n"] == 16 and [c["k"] for c in res["base"]["curve"]] == [1, 2, 4]
    for key in ("base", "search_full", "search_lora"):
        r = res[key]
        assert 0 <= r["greedy"] <= 1 and len(r["answers"]) == 16
        flops = [c["flops"] for c in r["curve"]]
        assert flops == sorted(flops) and flops[0] > 0  # more samples, more FLOPs
        assert all(c["best_of_k"] >= c["majority"] - 1e-9 for c in r["curve"])
    assert res["rl_full"]["steps"] == 2 and res["rl_full"]["flops"] > 0
    assert res["rl_lora"]["flops"] > 0
    fb = res["four_bit"]
    assert fb["qlora"]["adapter_params"] > 0 and len(fb["qlora"]["gguf"]) == 2
    assert all(os.path.exists(p) for p in fb["full"]["gguf"] + fb["qlora"]["gguf"])
    table = (out / "results.md").read_text()
    assert "RL, QLoRA" in table and "QLoRA: Q4_1 base + adapters" in table
    assert json.loads((out / "results.json").read_text())["task"] == res["task"]
    assert {p.name for p in out.glob("*.svg")} == {"accuracy_flops.svg", "rl_pass_at_1.svg",
                                                   "accuracy_flops_amortized.svg"}
    # the QLoRA run folder reloads with its 4-bit base
    import keenlm
    from keenlm.quant.q4 import Q4Linear

    km = keenlm.load(out / "rl_lora")
    assert km.config.model.lora.base == "q4"
    assert any(isinstance(m, Q4Linear) for m in km.net.modules())


def test_a_second_run_resumes_from_the_records(study):
    assert STUDIES["real"].options is Options
    out, opts, res, _ = study
    logs = []
    again = real.run(out, opts, log=logs.append)
    assert all("finished earlier" in line for line in logs)
    assert again["base"] == res["base"]
    with pytest.raises(ValueError, match="other settings"):
        real.run(out, Options(**{**opts.__dict__, "samples": 2}), log=logs.append)


def test_the_study_report_renders_in_headless_chromium(study, tmp_path):
    out = study[0]
    page = build_report([out, out / "rl_full"], tmp_path / "real.html")
    text = page.read_text()
    assert "QLoRA: Q4_1 base + adapters" in text and text.count("<svg") >= 4
    if not any(shutil.which(b) for b in BROWSERS):
        if os.environ.get("CI"):
            pytest.fail("CI must have Chromium (.ci/run installs Debian's chromium)")
        pytest.skip("no Chromium here: apt-get install chromium")
    assert screenshot(page, tmp_path / "shot.png") == []
