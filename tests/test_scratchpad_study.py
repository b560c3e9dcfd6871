"""The scratchpad study: worked against answer-only demonstrations at equal training FLOPs
(the same steps of the same windows) and at equal inference FLOPs, tiny and end to end."""

import pytest

from keenlm.studies.scratchpad import Options, scratchpad, tasks


def test_both_formats_draw_the_same_problems():
    for kind, difficulty in (("addition", 3), ("countdown", 3)):
        t = tasks(kind, difficulty)
        direct, worked = (t[f].problems("test", 20) for f in ("direct", "scratchpad"))
        assert [p.prompt for p in direct] == [p.prompt for p in worked]
        # the worked answer ends with the same tagged answer, after its steps
        for d, w in zip(direct, worked):
            assert len(w.demonstration) > len(d.demonstration)
            assert w.demonstration.endswith(d.demonstration.split("\n")[-1])


def test_scratchpad_study_runs_end_to_end_tiny(tmp_path):
    o = Options(task="addition", difficulty=2, size="64x1", sft_steps=20, every=10, eval_n=6,
                max_n=4)
    res = scratchpad(tmp_path / "sp", o, log=lambda s: None)
    for fmt in ("direct", "scratchpad"):
        assert [c["step"] for c in res["curves"][fmt]] == [10, 20]
    # equal training FLOPs: the same steps of the same windows cost the same
    assert res["policies"]["direct"]["train_flops"] == res["policies"]["scratchpad"]["train_flops"]
    assert (res["policies"]["scratchpad"]["demonstration_bytes"]
            > res["policies"]["direct"]["demonstration_bytes"])
    for row in res["equal_inference"]:
        for fmt in ("direct", "scratchpad"):
            assert row[fmt] is None or row[fmt]["flops"] <= row["budget"] * 1.001
    text = (tmp_path / "sp" / "results.md").read_text()
    assert "Equal training FLOPs" in text and "| scratchpad | majority | 4 |" in text
    assert (tmp_path / "sp" / "accuracy_vs_training_flops.svg").exists()
    again = scratchpad(tmp_path / "sp", o, log=lambda s: None)  # resumes: everything cached
    assert again["points"] == res["points"]
    with pytest.raises(ValueError, match="other settings"):
        scratchpad(tmp_path / "sp", Options(**{**o.__dict__, "max_n": 2}), log=lambda s: None)
