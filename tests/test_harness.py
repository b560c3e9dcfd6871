"""lm-evaluation-harness: keenlm's model class in-process against the harness' own
``local-completions`` client talking to ``keenlm serve`` -- the same items, the same figures --
and the shipped task files."""
import copy
import json
import os
import types

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'keenlm[eval]')")
pytest.importorskip("fastapi", reason="the serve extra is not installed")
pytest.importorskip("tenacity", reason="lm-eval's api extra is not installed")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from keenlm.config import ModelConfig  # noqa: E402
from keenlm.data.tokenizer import train_bpe  # noqa: E402
from keenlm.harness import TASK_NAMES, TASKS  # noqa: E402
from keenlm.harness.build_tasks import addition_items  # noqa: E402
from keenlm.harness.model import KeenLM  # noqa: E402
from keenlm.model import build_model  # noqa: E402
from keenlm.quant.q4 import quantize_q4_model  # noqa: E402
from keenlm.serve.app import create_app  # noqa: E402
from keenlm.serve.scheduler import Scheduler  # noqa: E402
from test_serve import Live  # noqa: E402

MAX_LEN = 400  # positions the in-process model scores; the client's max_length counts one more


@pytest.fixture(scope="module")
def fp32(small_corpus):
    tok = train_bpe([p.read_text() for p in sorted(small_corpus.iterdir())], 400)
    torch.manual_seed(0)
    net = build_model(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, d_model=128, n_head=4,
                                  n_kv_head=2, d_ff=256, max_seq_len=1024)).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return types.SimpleNamespace(net=net, tokenizer=tok)


@pytest.fixture(scope="module")
def model(fp32):
    """The q4 model (the C decode step serves it)."""
    return types.SimpleNamespace(net=quantize_q4_model(copy.deepcopy(fp32.net)),
                                 tokenizer=fp32.tokenizer)


@pytest.fixture(scope="module")
def server(model):
    sched = Scheduler(model.net, model.tokenizer, max_batch=8, max_len=512).start()
    live = Live(create_app(sched, "tiny"))
    yield live
    live.close()
    sched.stop()


def run(lm, tasks, limit=12, **kw):
    return simple_evaluate(model=lm, tasks=list(tasks),
                           task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),
                           limit=limit, log_samples=True, **kw)


def test_local_completions_against_keenlm_serve_equals_the_in_process_model(model, server):
    mine = run(KeenLM(model=model, batch_size=1, max_length=MAX_LEN), TASK_NAMES)
    theirs = run("local-completions", TASK_NAMES, model_args=(
        f"base_url={server.url}/v1/completions,model=tiny,tokenizer_backend=remote,"
        f"max_length={MAX_LEN + 1},num_concurrent=4,max_retries=1"))
    for task in TASK_NAMES:
        a, b = mine["samples"][task], theirs["samples"][task]
        assert len(a) == len(b) == 12
        for x, y in zip(sorted(a, key=lambda s: s["doc_id"]), sorted(b, key=lambda s: s["doc_id"])):
            if task == "keenlm_addition":  # greedy text, character for character
                assert x["resps"] == y["resps"]
            else:  # log-likelihoods: one forward pass over the same ids on both sides (the
                # server's reads a KV cache, whose attention rounds differently in the last bits)
                lx = [r[0][0] if isinstance(r[0], (list, tuple)) else r[0] for r in x["resps"]]
                ly = [r[0][0] if isinstance(r[0], (list, tuple)) else r[0] for r in y["resps"]]
                assert lx == pytest.approx(ly, rel=1e-5, abs=1e-5)
        ra, rb = mine["results"][task], theirs["results"][task]
        for metric in ("acc,none", "acc_norm,none", "exact_match,first-number"):
            if metric in ra:
                assert ra[metric] == rb[metric]
        if "bits_per_byte,none" in ra:
            assert ra["bits_per_byte,none"] == pytest.approx(rb["bits_per_byte,none"], rel=1e-6)
    texts = [s["resps"][0][0] for s in mine["samples"]["keenlm_addition"]]
    assert any(texts)  # the generations compared above are not all empty


def test_batched_scoring_equals_one_sequence_at_a_time(fp32):
    # fp32: the q4 model's prefill rounds activations by batch shape (keenlm.quant.q4)
    model = fp32
    lm = KeenLM(model=model, batch_size=4, max_length=MAX_LEN)
    one = KeenLM(model=model, batch_size=1, max_length=MAX_LEN)
    g = torch.Generator().manual_seed(1)
    reqs = [(None, torch.randint(0, 400, (int(n),), generator=g).tolist(),
             torch.randint(0, 400, (int(m),), generator=g).tolist())
            for n, m in torch.randint(1, 40, (7, 2), generator=g)]
    padded, alone = lm._loglikelihood_tokens(reqs), one._loglikelihood_tokens(reqs)
    assert [p[1] for p in padded] == [a[1] for a in alone]
    assert [p[0] for p in padded] == pytest.approx([a[0] for a in alone], rel=1e-5, abs=1e-5)
    # against the reference: log-softmax of the model's logits, summed over the continuation
    _, ctx, cont = reqs[0]
    with torch.no_grad():
        logp = torch.log_softmax(model.net(torch.tensor([ctx + cont])).float(), -1)[0]
    ref = sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
    assert alone[0][0] == pytest.approx(ref, rel=1e-5, abs=1e-5)


def test_a_shared_context_scores_as_each_row_alone(fp32):
    """Multiple-choice items: the context runs once for all its continuations (SharedPrefix);
    the log-likelihoods and greedy flags equal the one-row-per-choice path's."""
    lm = KeenLM(model=fp32, batch_size=4, max_length=MAX_LEN)
    g = torch.Generator().manual_seed(2)
    ids = lambda n: torch.randint(0, 400, (n,), generator=g).tolist()  # noqa: E731
    reqs = []
    for n_ctx in (1, 2, 37, 90):  # a one-token context is scored the plain way
        ctx = ids(n_ctx)
        reqs += [(None, ctx, ids(int(m))) for m in torch.randint(1, 15, (4,), generator=g)]
    reqs.append((None, ids(20), ids(5)))  # a context of its own
    reqs.append((None, reqs[8][1], reqs[8][2][:1]))  # a one-token continuation in a group
    calls = []
    real = lm._score_shared
    lm._score_shared = lambda items: calls.append(sorted(len(c) for _, c in items)) or real(items)
    shared = lm._loglikelihood_tokens(reqs)
    assert calls == [[4, 4, 5]]  # the groups of 2, 37 (4 + 1) and 90 context tokens, one pass
    lm._shares_prefixes = lambda: False
    plain = lm._loglikelihood_tokens(reqs)
    assert [s[1] for s in shared] == [p[1] for p in plain]
    assert [s[0] for s in shared] == pytest.approx([p[0] for p in plain], rel=1e-5, abs=1e-5)


def test_bad_arguments_are_named(model):
    with pytest.raises(ValueError, match="pretrained=PATH"):
        KeenLM()
    with pytest.raises(ValueError, match="unknown arguments"):
        KeenLM(model=model, temperature=0)
    with pytest.raises(ValueError, match="empty continuation"):
        KeenLM(model=model)._score([([1, 2], [])])


def test_the_shipped_task_files():
    rows = [json.loads(line) for line in (TASKS / "addition.jsonl").read_text().splitlines()]
    assert rows == addition_items(200)  # the generator makes exactly what is shipped
    nextline = [json.loads(line) for line in (TASKS / "nextline.jsonl").read_text().splitlines()]
    assert len(nextline) == 200
    assert all(len(r["choices"]) == 4 and len(set(r["choices"])) == 4 and 0 <= r["label"] < 4
               and r["context"].endswith("\n") for r in nextline)
    labels = [r["label"] for r in nextline]  # the real line is not always in the same place
    assert min(labels.count(k) for k in range(4)) > 20
    text = [json.loads(line) for line in (TASKS / "stdlib_text.jsonl").read_text().splitlines()]
    assert len(text) == 40 and all(len(r["text"]) >= 500 for r in text)


def test_the_keenlm_class_equals_the_harness_hf_backend(fp32, tmp_path, capsys):
    """The same fp32 model, exported to a Hugging Face folder and read by the harness' own
    ``hf`` backend (transformers), against keenlm's class: the same figures to 4 decimals."""
    pytest.importorskip("transformers")
    from keenlm.io.hf import export_hf

    folder = export_hf(fp32.net, fp32.tokenizer, tmp_path / "hf")
    mine = run(KeenLM(model=fp32, batch_size=4), TASK_NAMES, limit=8)
    theirs = run("hf", TASK_NAMES, limit=8,
                 model_args=f"pretrained={folder},dtype=float32,device=cpu,batch_size=4")
    for task in TASK_NAMES:
        ra, rb = mine["results"][task], theirs["results"][task]
        for metric, value in ra.items():
            if "," in metric and "stderr" not in metric and isinstance(value, float):
                assert round(value, 4) == round(rb[metric], 4) or value == pytest.approx(
                    rb[metric], rel=1e-6), (task, metric, value, rb[metric])
        a = sorted(mine["samples"][task], key=lambda s: s["doc_id"])
        b = sorted(theirs["samples"][task], key=lambda s: s["doc_id"])
        for x, y in zip(a, b):
            if task == "keenlm_addition":
                assert x["resps"] == y["resps"]
            else:
                lx = [r[0][0] if isinstance(r[0], (list, tuple)) else r[0] for r in x["resps"]]
                ly = [r[0][0] if isinstance(r[0], (list, tuple)) else r[0] for r in y["resps"]]
                assert lx == pytest.approx(ly, rel=1e-4, abs=1e-4)
    # the command line gives the same figures: keenlm eval MODEL --harness TASKS
    from keenlm.cli import main

    assert main(["eval", str(folder), "--harness", "keenlm_nextline", "--limit", "8",
                 "--batch-size", "4", "--json"]) == 0
    out = capsys.readouterr().out
    printed = json.loads(out[out.rindex("\n{\n") + 1:] if "\n{\n" in out else out)
    assert printed["keenlm_nextline"]["acc"] == mine["results"]["keenlm_nextline"]["acc,none"]
