"""Kill -9 inside writes (benchmarks/faults.py, its short form) and what a killed write leaves."""
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

from keenlm import runs

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_a_killed_writers_leftover_is_removed_by_the_next_write_and_a_live_ones_kept(tmp_path):
    final = tmp_path / "ledger.json"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    prefix = runs.temp_sibling(final).name.rsplit("-", 2)[0]  # .ledger.json.tmp-HOST
    stale = tmp_path / f"{prefix}-{dead.pid}-0000abcd"
    stale.write_text("half")
    live = tmp_path / f"{prefix}-{os.getpid()}-0000abcd"  # this process: a write under way
    live.write_text("half")
    other_host = tmp_path / f".ledger.json.tmp-elsewhere-{dead.pid}-0000abcd"
    other_host.write_text("half")
    runs.atomic_write_text(final, "{}")
    assert final.read_text() == "{}"
    assert not stale.exists() and live.exists() and other_host.exists()
    folder = tmp_path / "cache"
    stale_dir = tmp_path / f".cache.tmp-{prefix.split('.tmp-')[1]}-{dead.pid}-0000abcd"
    stale_dir.mkdir()
    (stale_dir / "train.bin").write_bytes(b"12")
    with runs.atomic_folder(folder) as tmp:
        (tmp / "x").write_text("x")
    assert (folder / "x").exists() and not stale_dir.exists()


def test_kill_9_inside_writes_loses_nothing_and_train_resumes_bitwise(tmp_path):
    """The kill suite's short form, each kill set off by a write starting (the token cache or
    the tokenizer, a train or an RL checkpoint, a GGUF export). After each kill every visible
    output is complete and equal to an uninterrupted run's; the finished jobs end on the same
    bytes (train and RL weights too)."""
    sys.path.insert(0, str(BENCH))
    try:
        faults = importlib.import_module("faults")
        rc = faults.main(["--quick", "--mode", "write", "--jobs", "prepare,train,rl,convert",
                          "--seed", "1", "--work", str(tmp_path / "w"),
                          "--json", str(tmp_path / "kills.json")])
    finally:
        sys.path.remove(str(BENCH))
    got = json.loads((tmp_path / "kills.json").read_text())
    assert got["problems"] == [] and rc == 0
    assert len(got["kills"]) >= 4
    assert {k["job"] for k in got["kills"]} == {"prepare", "train", "rl", "convert"}
    assert got["leftovers"] == []


def test_replacing_an_output_leaves_its_name_present_at_every_moment(tmp_path):
    """``--overwrite`` (quantize, convert --to hf): the new folder is swapped in with one
    exchange, so a reader polling the name (or a kill at any moment) never finds it absent."""
    import threading

    final = tmp_path / "q4"
    with runs.atomic_folder(final) as tmp:
        (tmp / "model.safetensors").write_text("0")
    missing, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            if not (final / "model.safetensors").exists():
                missing.append(1)

    t = threading.Thread(target=watch)
    t.start()
    try:
        for i in range(1, 200):
            with runs.atomic_folder(final, replace=True) as tmp:
                (tmp / "model.safetensors").write_text(str(i))
    finally:
        stop.set()
        t.join()
    assert (final / "model.safetensors").read_text() == "199"
    assert missing == []
    assert [p.name for p in tmp_path.iterdir()] == ["q4"]  # no old copy or temporary left
