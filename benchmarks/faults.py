"""Kill -9 at random moments, across every job that writes (issue: reliability you can quote).

Each job runs once uninterrupted (the reference), then again under fire: the child process is
killed with SIGKILL, either at a random time within the job's measured span or the moment a
write is under way (a temporary file or folder of that job's appears; killed 0-2 ms later), and
started again with the same command, until it finishes. After every kill the suite checks what
the job left: every output it can see is complete, equal to the reference's output of the same
name, and loads; a checkpoint that was ``latest`` never goes back. When the job finishes, its
result must equal the reference's, bit for bit (train and RL weights, token caches, tokenizers,
quantized folders, GGUF and HF files, sweep trials' losses).

Jobs (a tiny model on a few stdlib files, so that many kills fit in minutes on 2 cores):

- ``prepare``: ``keenlm train`` on a fresh cache (4 MB of the stdlib): BPE tokenizer training and
  the token cache build
- ``train``: ``keenlm train``, a checkpoint every 10 steps
- ``rl``: ``keenlm rl`` from the trained model, a checkpoint every 2 steps
- ``quantize``: ``keenlm quantize --bits 4 --method gptq``
- ``convert``: ``keenlm convert --to gguf`` and ``--to hf``
- ``sweep``: ``keenlm scale sweep`` over two depths

Usage: python benchmarks/faults.py [--quick] [--kills N] [--seed S] [--work DIR]
Ends with one line per target: BENCH <name> <value> target <op><target> PASS|MISS
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import bench_line  # noqa: E402

STDLIB = Path(sysconfig.get_paths()["stdlib"])
CORPUS_FILES = ("argparse.py", "textwrap.py", "shlex.py", "fnmatch.py", "glob.py", "bisect.py",
                "heapq.py", "keyword.py", "colorsys.py", "copy.py", "queue.py", "sched.py")
WRITE_DELAY_S = 0.002  # a kill "inside a write" lands 0-2 ms after its temporary path appears
POLL_S = {"time": 0.002, "write": 0.0005}


@dataclass
class Job:
    """One command that writes ``outputs`` (paths relative to the job's folder). Each round of
    kills starts in an empty folder; the shared inputs (corpus, cache, policy) are read only."""

    name: str
    argv: list[str]  # keenlm's arguments; "{dir}" is the job's folder, "{ref}" the shared inputs
    temp_globs: dict[str, str]  # what is being written -> where that shows while under way
    kills: int  # kills to deliver (more rounds from scratch if a round finishes first)
    outputs: list[str] = field(default_factory=list)  # compared with the reference, file by file
    run_dirs: list[str] = field(default_factory=list)  # run folders: checkpoints checked
    caches: bool = False  # each output is a folder of entries, each one complete on its own


def keenlm(argv) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "keenlm.cli", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def jobs(shared: Path, quick: bool) -> list[Job]:
    """The jobs, their commands and what each writes."""
    k = (lambda full, q: q if quick else full)
    tiny = ["--preset", "tiny", "--data.val_fraction", "0.2", "--train.progress", "false"]
    corpus = ["--data.corpus", str(shared / "corpus"), "--data.cache_dir", str(shared / "cache")]
    sweep_cfg = shared / "sweep_base.json"
    return [
        Job("prepare", ["train", *tiny, "--data.corpus", "stdlib", "--data.max_bytes", "4000000",
                        "--data.tokenizer", "bpe", "--data.vocab_size", "4096",
                        "--data.tokenizer_train_bytes", "2000000",
                        "--data.cache_dir", "{dir}/cache", "--train.steps", "1",
                        "--train.out_dir", "{dir}/run"],
            {"tokenizer": "cache/tokenizers/.*.tmp-*", "token cache": "cache/tokens/.*.tmp-*",
             "checkpoint": "run/checkpoints/.tmp-*"},
            k(8, 1), outputs=["cache/tokenizers", "cache/tokens"], run_dirs=["run"], caches=True),
        Job("train", ["train", *tiny, *corpus,
                      "--train.steps", k(300, 120), "--train.checkpoint.every", "10",
                      "--train.checkpoint.keep", "1000", "--train.out_dir", "{dir}/run"],
            {"checkpoint": "run/checkpoints/.tmp-*"}, k(12, 2), run_dirs=["run"]),
        Job("rl", ["rl", str(shared / "policy"), "--task", "addition", "--difficulty", "1",
                   "--steps", k(24, 8), "--group", "4", "--prompts", "4", "--max-new-tokens", "6",
                   "--save-every", "2", "--eval-every", "0", "--eval-n", "8",
                   "--progress", "false", "--out-dir", "{dir}/run"],
            {"checkpoint": "run/checkpoints/.tmp-*"}, k(10, 1), run_dirs=["run"]),
        Job("quantize", ["quantize", str(shared / "policy"), "{dir}/q4", "--bits", "4",
                         "--method", "gptq"],
            {"quantized folder": ".q4.tmp-*"}, k(5, 1), outputs=["q4"]),
        Job("convert", ["convert", str(shared / "policy"), "{dir}/model.gguf", "--to", "gguf"],
            {"GGUF file": ".model.gguf.tmp-*"}, k(4, 1), outputs=["model.gguf"]),
        Job("convert-hf", ["convert", str(shared / "policy"), "{dir}/hf", "--to", "hf"],
            {"HF folder": ".hf.tmp-*"}, k(3, 0), outputs=["hf"]),
        Job("sweep", ["scale", "sweep", "{dir}/sweep", "--depths", "1,2",
                      "--tokens", k("6e4", "2e4"), "--seq-len", "64", "--batch-size", "8",
                      "--config", str(sweep_cfg)],
            {"checkpoint": "sweep/trials/*/checkpoints/.tmp-*",
             "trial record": "sweep/trials/*/.trial.json.tmp-*"}, k(8, 1),
            run_dirs=["sweep/trials/d1-t*", "sweep/trials/d2-t*"]),
    ]


def prepare_shared(shared: Path) -> None:
    """The inputs every job reads: a corpus, its byte-level token cache and a trained policy."""
    (shared / "corpus").mkdir(parents=True)
    for name in CORPUS_FILES:
        shutil.copy(STDLIB / name, shared / "corpus" / name)
    (shared / "sweep_base.json").write_text(json.dumps(
        {"data": {"corpus": str(shared / "corpus"), "tokenizer": "byte", "val_fraction": 0.2,
                  "cache_dir": str(shared / "cache")},
         "train": {"checkpoint": {"every": 20}, "progress": False}}))
    p = keenlm(["train", "--preset", "tiny", "--data.corpus", str(shared / "corpus"),
                "--data.val_fraction", "0.2", "--data.cache_dir", str(shared / "cache"),
                "--train.steps", "60", "--train.progress", "false",
                "--train.out_dir", str(shared / "policy")])
    out, _ = p.communicate()
    if p.returncode:
        sys.exit(f"faults: could not train the shared policy:\n{out}")


def expand(argv, folder: Path) -> list[str]:
    return [str(a).replace("{dir}", str(folder)) for a in argv]


# ------------------------------------------------------------------------------ checks

def same_tree(a: Path, b: Path) -> str | None:
    """None when ``a`` (a file or folder) has the files of ``b`` with the same bytes; the
    temporary and lock files a writer leaves beside its outputs (names starting with a dot)
    are not outputs."""
    if a.is_file() or b.is_file():
        return None if a.is_file() and b.is_file() and a.read_bytes() == b.read_bytes() \
            else f"{a} differs from the uninterrupted run's {b}"

    def names(d: Path) -> list[str]:
        rel = (p.relative_to(d) for p in d.rglob("*") if p.is_file())
        return sorted(str(r) for r in rel if not any(s.startswith(".") for s in r.parts))

    if names(a) != names(b):
        return f"{a} holds {names(a)}, the uninterrupted run's {names(b)}"
    for n in names(a):
        if (a / n).read_bytes() != (b / n).read_bytes():
            return f"{a / n} differs from the uninterrupted run's"
    return None


def check_outputs(job: Job, folder: Path, ref: Path) -> list[str]:
    """What a kill may leave: each named output absent or complete (the reference's bytes;
    inside a folder of outputs such as a cache, every visible entry complete)."""
    problems = []
    for out in job.outputs:
        mine, theirs = folder / out, ref / out
        if not mine.exists():
            continue
        if job.caches:  # each visible entry is one complete output
            for entry in mine.iterdir():
                if not entry.name.startswith("."):
                    problems.append(same_tree(entry, theirs / entry.name))
        else:
            problems.append(same_tree(mine, theirs))
    return [p for p in problems if p]


def check_runs(job: Job, folder: Path, ref: Path, latest_seen: dict) -> list[str]:
    """Every visible checkpoint loads and holds the uninterrupted run's weights for its step;
    ``latest`` names a complete one and never goes back; the folder loads as a model."""
    import keenlm
    from keenlm import runs

    problems = []
    for pattern in job.run_dirs:
        for run in sorted(folder.glob(pattern)):
            ck = run / "checkpoints"
            if not ck.is_dir():
                continue
            for step in sorted(ck.glob("step-*")):
                try:
                    runs.load_trainer_state(step)
                    theirs = ref / run.relative_to(folder) / "checkpoints" / step.name
                    if theirs.exists() and (step / "model.safetensors").read_bytes() != \
                            (theirs / "model.safetensors").read_bytes():
                        problems.append(f"{step}: weights differ from the uninterrupted run's")
                    runs.load_model_state(step)
                except Exception as e:
                    problems.append(f"{step}: {type(e).__name__}: {e}")
            if not (ck / "latest").exists():
                continue
            latest = runs.latest_checkpoint(run)
            if latest is None:
                problems.append(f"{run}: latest names no checkpoint")
                continue
            if latest.name < latest_seen.get(str(run), ""):
                problems.append(f"{run}: latest went back from {latest_seen[str(run)]} to "
                                f"{latest.name}")
            latest_seen[str(run)] = latest.name
            try:
                keenlm.load(run)
            except Exception as e:
                problems.append(f"{run}: does not load: {type(e).__name__}: {e}")
    return problems


def check_finished(job: Job, folder: Path, ref: Path) -> list[str]:
    """The finished job's results against the uninterrupted run's, bit for bit."""
    from keenlm import runs

    problems = [p for out in job.outputs if (p := same_tree(folder / out, ref / out))]
    for pattern in job.run_dirs:
        for run in sorted(ref.glob(pattern)):
            mine = folder / run.relative_to(ref)
            a, b = runs.latest_checkpoint(mine), runs.latest_checkpoint(run)
            if a is None or a.name != b.name:
                problems.append(f"{mine}: ends at {a and a.name}, the uninterrupted run at "
                                f"{b.name}")
            elif (a / "model.safetensors").read_bytes() != (b / "model.safetensors").read_bytes():
                problems.append(f"{mine}: final weights differ from the uninterrupted run's")
            done = run / "trial.json"
            if done.exists():
                x, y = (json.loads((d / "trial.json").read_text()) for d in (mine, run))
                if [x[k] for k in ("val_loss", "flops", "params")] != \
                        [y[k] for k in ("val_loss", "flops", "params")]:
                    problems.append(f"{mine}/trial.json: {x['val_loss']} vs {y['val_loss']}")
    return problems


# ------------------------------------------------------------------------------ the runs

def run_reference(job: Job, folder: Path) -> float:
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    p = keenlm(expand(job.argv, folder))
    out, _ = p.communicate()
    if p.returncode:
        sys.exit(f"faults: the uninterrupted {job.name} run failed:\n{out}")
    return time.perf_counter() - t0


def temp_paths(job: Job, folder: Path) -> set[tuple[str, Path]]:
    return {(what, p) for what, g in job.temp_globs.items() for p in folder.glob(g)}


def kill_at(p: subprocess.Popen, job: Job, folder: Path, mode: str, at_s: float,
            rng: random.Random) -> tuple[float, list[str]] | None:
    """Kill ``p`` with SIGKILL (``mode`` time: ``at_s`` after its start; write: as soon as a
    temporary path of one kind of the job's writes, drawn at random, appears, plus 0-2 ms).
    Seconds from the start to the kill and what was being written then (the temporary paths
    still there); None when the process ended first."""
    t0 = time.perf_counter()
    before = temp_paths(job, folder)  # left by earlier kills: not a write of this process
    target = rng.choice(sorted(job.temp_globs))  # which kind of write to kill inside
    while p.poll() is None:
        now = time.perf_counter() - t0
        if mode == "time" and now >= at_s or \
                mode == "write" and any(w == target for w, _ in temp_paths(job, folder) - before):
            if mode == "write":
                time.sleep(rng.uniform(0, WRITE_DELAY_S))
            if p.poll() is not None:
                break
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
            p.stdout.close()
            cut = sorted({w for w, _ in temp_paths(job, folder) - before})
            return time.perf_counter() - t0, cut
        time.sleep(POLL_S[mode])
    p.communicate()
    return None


def under_fire(job: Job, work: Path, ref: Path, span: float, import_s: float,
               rng: random.Random, modes: list[str], log) -> tuple[list[dict], list[str]]:
    """Run ``job`` to the end while delivering its kills; each kill's record and every problem."""
    records, problems, rounds = [], [], 0
    while len([r for r in records if r["job"] == job.name]) < job.kills or rounds == 0:
        rounds += 1
        folder = work / f"{job.name}-{rounds}"
        folder.mkdir(parents=True)
        latest_seen: dict = {}
        while True:
            delivered = len(records)
            mode = modes[rng.randrange(len(modes))]
            at = rng.uniform(import_s, span)
            p = keenlm(expand(job.argv, folder))
            if delivered >= job.kills:  # enough kills: let it finish
                out, _ = p.communicate()
                if p.returncode:
                    problems.append(f"{job.name}: the last resume failed:\n{out[-2000:]}")
                break
            killed = kill_at(p, job, folder, mode, at, rng)
            if killed is None:  # it finished before the kill
                if p.returncode:
                    problems.append(f"{job.name}: a resume failed (exit {p.returncode})")
                break
            when, inside = killed
            found = check_outputs(job, folder, ref) + check_runs(job, folder, ref, latest_seen)
            records.append({"job": job.name, "round": rounds, "mode": mode, "at_s": round(when, 3),
                            "inside": inside, "problems": found})
            problems += found
            log(f"  kill {len(records)} ({mode}, {when:.2f} s{', inside: ' if inside else ''}"
                f"{', '.join(inside)}): {'ok' if not found else '; '.join(found)}")
            if not job.caches and job.outputs and \
                    all((folder / o).exists() for o in job.outputs):
                break  # killed after its output was in place: the job is done (a rerun refuses)
        problems += check_finished(job, folder, ref)
        if rounds >= 5:  # a job that finishes before every kill cannot take more
            break
    return records, problems


def leftovers(work: Path) -> list[Path]:
    """Temporary files and folders of killed writes still on disk (litter, not outputs)."""
    return [p for p in work.rglob("*") if ".tmp" in p.name and "-ref" not in str(p)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="shorter jobs, one or two kills each")
    ap.add_argument("--jobs", default="", help="comma list of jobs (default: all)")
    ap.add_argument("--mode", choices=("mixed", "time", "write"), default="mixed",
                    help="kill at random times, inside writes, or half and half")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="", help="folder for the runs (default: a temporary one)")
    ap.add_argument("--json", default="", help="write every kill's record here")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    modes = ["time", "write"] if args.mode == "mixed" else [args.mode]
    work = Path(args.work or tempfile.mkdtemp(prefix="keenlm-faults-"))
    print(f"faults: {os.cpu_count()} cores, seed {args.seed}, kills {args.mode}, "
          f"{time.strftime('%Y-%m-%d')}, work folder {work}", flush=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import keenlm.cli"], check=True)
    import_s = time.perf_counter() - t0  # a kill before this lands in Python's start-up
    prepare_shared(work / "shared")
    chosen = [j for j in jobs(work / "shared", args.quick)
              if not args.jobs or j.name in args.jobs.split(",")]
    records, problems = [], []
    for job in chosen:
        ref = work / f"{job.name}-ref"
        span = run_reference(job, ref)
        print(f"{job.name}: uninterrupted {span:.1f} s; {job.kills} kills", flush=True)
        recs, probs = under_fire(job, work, ref, span, import_s, rng, modes,
                                 lambda s: print(s, flush=True))
        records += recs
        problems += probs
        print(f"{job.name}: {len(recs)} kills, {len(probs)} problems"
              + "".join(f"\n  {p}" for p in probs), flush=True)
    litter = leftovers(work)
    if args.json:
        Path(args.json).write_text(json.dumps({"kills": records, "problems": problems,
                                               "leftovers": [str(p) for p in litter]}, indent=1))
    inside: dict[str, int] = {}
    for r in records:
        for what in r["inside"]:
            inside[what] = inside.get(what, 0) + 1
    print(f"faults: {len(records)} kills over {len(chosen)} jobs in "
          f"{time.perf_counter() - t0:.0f} s; inside a write: "
          f"{', '.join(f'{k} {v}' for k, v in sorted(inside.items())) or 'none'}; "
          f"problems: {len(problems)}; temporary leftovers: {len(litter)}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    print(bench_line("faults_kills", len(records), ">=", 6 if args.quick else 20))
    print(bench_line("faults_lost_or_corrupt", len(problems), "<=", 0))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
