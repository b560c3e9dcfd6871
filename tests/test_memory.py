"""Neural long-term memory (Titans-style): a hand-checked step, the chunked update against the
token-by-token loop, the surprise gate, causality, sliding-window attention, training."""
import pytest
import torch

from keenlm.config import MemoryConfig, ModelConfig
from keenlm.model import build_model
from keenlm.model.memory import chunk_update, memory_apply, memory_reference


def test_one_write_is_a_hand_computed_gradient_step_with_momentum_and_decay():
    W0 = torch.eye(2)[None, None]  # M(k) = W k, one batch row, one head
    S0 = torch.tensor([[0.1, 0.0], [0.0, 0.0]])[None, None]
    k = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    v = torch.tensor([0.0, 1.0]).view(1, 1, 1, 2)
    eta, theta, alpha = (torch.full((1, 1, 1), x) for x in (0.9, 0.5, 0.1))
    (W1,), (S1,), loss, m = chunk_update([W0], [S0], k, v, eta, theta, alpha)
    # e = W0 k - v = (1, -1); loss 2; gradient 2 e k^T = [[2, 0], [-2, 0]]
    # S1 = 0.9 S0 - 0.5 g = [[-0.91, 0], [1, 0]];  W1 = 0.9 W0 + S1 = [[-0.01, 0], [1, 0.9]]
    assert loss.item() == pytest.approx(2.0) and m.item() == 1
    torch.testing.assert_close(S1[0, 0], torch.tensor([[-0.91, 0.0], [1.0, 0.0]]))
    torch.testing.assert_close(W1[0, 0], torch.tensor([[-0.01, 0.0], [1.0, 0.9]]))


def _random_case(depth, T=13, B=2, H=3, D=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(D, D)] if depth == 1 else [(2 * D, D), (D, 2 * D)]
    W = [torch.randn(B, H, o, i, generator=g) * 0.5 for o, i in shapes]
    S = [torch.randn(B, H, o, i, generator=g) * 0.1 for o, i in shapes]
    q, k, v = (torch.nn.functional.normalize(torch.randn(B, H, T, D, generator=g), dim=-1)
               for _ in range(3))
    eta, theta, alpha = (torch.rand(B, H, T, generator=g) * s + o
                         for s, o in ((0.5, 0.5), (0.5, 0.0), (0.2, 0.0)))
    return W, S, q, k, v, eta, theta, alpha


def _chunked(W, S, q, k, v, eta, theta, alpha, chunk, gate=0.0):
    reads, masks = [], []
    for c0 in range(0, k.shape[-2], chunk):
        sl = slice(c0, c0 + chunk)
        reads.append(memory_apply(W, q[..., sl, :]))
        W, S, _, m = chunk_update(W, S, k[..., sl, :], v[..., sl, :], eta[..., sl], theta[..., sl],
                                  alpha[..., sl], gate)
        masks.append(m)
    return torch.cat(reads, -2), W, S, torch.cat(masks, -1)


@pytest.mark.parametrize("depth,chunk,gate", [(1, 1, 0.0), (1, 4, 0.0), (2, 1, 0.0), (2, 5, 0.0),
                                              (2, 13, 0.0), (2, 4, 0.8), (1, 7, 0.8)])
def test_chunked_update_equals_the_token_by_token_loop(depth, chunk, gate):
    # float64: the two orders of summation then agree to far below 1e-5, so any difference
    # is the algorithm's; in float32 they agree to ~2e-5 relative (weights grow to ~20 here)
    case = _random_case(depth, seed=depth * 10 + chunk)
    case = [[t.double() for t in c] if isinstance(c, list) else c.double() for c in case]
    a = _chunked(*case, chunk=chunk, gate=gate)
    b = memory_reference(*case, chunk=chunk, gate=gate)
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)  # what the queries read
    for x, y in zip(a[1] + a[2], b[1] + b[2]):  # final weights and momentum
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    assert torch.equal(a[3].bool(), b[3])
    f32 = _chunked(*[[t.float() for t in c] if isinstance(c, list) else c.float() for c in case],
                   chunk=chunk, gate=gate)
    for x, y in zip(f32[1], b[1]):
        torch.testing.assert_close(x.double(), y, rtol=1e-4, atol=1e-4)
    if gate:
        assert 0 < a[3].sum() < a[3].numel()  # the gate did skip some, and not all


def test_gate_skips_exactly_the_writes_below_the_threshold():
    W, S, q, k, v, eta, theta, alpha = _random_case(2, T=10, B=1, H=1, seed=3)
    loss0 = (memory_apply(W, k) - v).pow(2).sum(-1)  # one chunk: every loss at the start memory
    gate = float(loss0.median() / loss0.mean())  # the threshold: gate x the chunk's mean loss
    Wg, Sg, _, m = chunk_update(W, S, k, v, eta, theta, alpha, gate)
    assert torch.equal(m.bool(), loss0 >= gate * loss0.mean())
    assert m.sum() == 6  # torch.median of 10 is the 5th smallest: 6 tokens are at or above it
    keep = m.bool()[0, 0]
    sub = [t[..., keep] for t in (eta, theta, alpha)]
    Wk, Sk, _, _ = chunk_update(W, S, k[..., keep, :], v[..., keep, :], *sub)
    for x, y in zip(Wg + Sg, Wk + Sk):  # as if the skipped tokens were never there
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def mem_cfg(kind="mal", window=0, **memory):
    return ModelConfig(vocab_size=61, n_layer=2, d_model=32, n_head=2, d_ff=64, max_seq_len=64,
                       attention="naive", attn_window=window,
                       memory=MemoryConfig(kind=kind, **{"chunk": 4, **memory}))


@pytest.mark.parametrize("kind", ["mal", "mag"])
def test_memory_model_is_causal_at_chunk_granularity_and_learns(kind):
    torch.manual_seed(0)
    net = build_model(mem_cfg(kind, window=6))
    x = torch.randint(0, 61, (2, 24))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 61, (2, 12))  # chunks of 4: positions 0..11 must not change
    with torch.no_grad():
        a, b = net(x), net(y)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-5)
    assert not torch.allclose(a[:, 12:], b[:, 12:])
    net.train()
    net(x).sum().backward()
    mem = net.layers[0].memory
    for p in (mem.init_weights[0], mem.to_qkv.weight, mem.to_coef.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0  # learned through the writes


def test_memory_carries_what_the_window_cannot_see():
    # the 7th-to-last token is out of a 4-position window; only the memory can read it
    torch.manual_seed(0)
    x = torch.randint(0, 61, (1, 20))
    y = x.clone()
    y[0, 2] = (x[0, 2] + 1) % 61
    for kind, changes in (("none", False), ("mal", True)):
        net = build_model(mem_cfg(kind, window=4)).eval()
        with torch.no_grad():
            diff = (net(x)[0, -1] - net(y)[0, -1]).abs().max().item()
        assert (diff > 1e-6) is changes, kind


def test_sliding_window_mask():
    from keenlm.model.transformer import Transformer

    m = Transformer.build_mask(1, 5, 0, None, "cpu", window=2)[0, 0]
    assert m.int().tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0],
                                [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]
    cached = Transformer.build_mask(1, 1, 4, None, "cpu", window=2)[0, 0]  # decode step 5
    assert cached.int().tolist() == [[0, 0, 0, 1, 1]]
    assert Transformer.build_mask(1, 5, 0, None, "cpu") is None


def test_generation_with_memory_is_refused_clearly():
    net = build_model(mem_cfg("mal")).eval()
    with pytest.raises(ValueError, match="model.memory"):
        net(torch.randint(0, 61, (1, 4)), cache=net.new_cache(1))


def test_memory_statistics_are_logged_per_step():
    net = build_model(mem_cfg("mal", gate=0.5)).train()
    net(torch.randint(0, 61, (2, 16)))
    stats = net.end_step()
    assert 0 <= stats["memory_skipped"] <= 1 and stats["memory_surprise"] > 0
    assert net.end_step() == {}


def test_recall_task_puts_every_pair_beyond_the_gap():
    from keenlm.data.recall import KEY, QUERY, Recall

    task = Recall(length=40, pairs=3, gap=10)
    x, y = task.batch(16, seed=0, index=0)
    assert x.shape == y.shape == (16, 40) and torch.equal(task.batch(16, 0, 0)[0], x)
    vals = task.value_ids()
    for row, tgt in zip(x, y):
        starts = (row[:task.body] == KEY).nonzero()[:, 0]
        assert len(starts) == 3 and (starts + 2 < task.body - 10).all()  # >= gap back
        asked = (tgt != -100).nonzero()[:, 0]
        assert len(asked) == 3 and all(row[a - 1] == QUERY for a in asked.tolist())
        for a in asked.tolist():  # the target is the value stored with that key
            s = [p for p in starts.tolist() if row[p + 1] == row[a]]
            assert len(s) == 1 and row[s[0] + 2] == tgt[a] == row[a + 1] and tgt[a] in vals
    with pytest.raises(ValueError, match="gap"):
        Recall(length=30, pairs=4, gap=15)


def test_memory_study_runs_end_to_end(tmp_path):
    from keenlm.studies.memory import memory

    kw = dict(lengths=(24, 32), window=8, pairs=1, d_model=32, layers=2, steps=6, batch=4,
              gate=0.5, eval_n=8, log=lambda s: None)
    res = memory(tmp_path / "s", **kw)
    names = [r["name"] for r in res["rows"]]
    assert names[0] == "attention only" and len(names) == 4
    assert all(0 <= a <= 1 for r in res["rows"] for a in r["accuracy"].values())
    gated = res["rows"][3]["skipped"]
    assert all(v is not None and 0 <= v <= 1 for v in gated.values())
    assert (tmp_path / "s" / "results.md").exists()
    assert memory(tmp_path / "s", **kw)["rows"] == res["rows"]


def test_a_memory_run_trains_saves_and_reloads(tmp_path, small_corpus):
    import keenlm
    from keenlm.config import from_dict
    from keenlm.train import Trainer

    cfg = from_dict({"data": {"corpus": str(small_corpus), "tokenizer": "byte",
                              "cache_dir": str(tmp_path / "cache")},
                     "model": {"n_layer": 2, "d_model": 32, "n_head": 2, "max_seq_len": 32,
                               "attn_window": 8, "memory": {"kind": "mag", "chunk": 8}},
                     "train": {"steps": 3, "batch_size": 2, "seq_len": 32, "progress": False,
                               "log_every": 1, "eval_batches": 1, "out_dir": str(tmp_path / "r")}})
    tr = Trainer(cfg)
    tr.fit()
    km = keenlm.load(tmp_path / "r")
    assert km.net.cfg.memory.kind == "mag" and km.net.cfg.attn_window == 8
    x = torch.randint(0, 200, (1, 32))
    net = tr.model.to("cpu").eval()
    with torch.no_grad():
        torch.testing.assert_close(km.net(x), net(x))
