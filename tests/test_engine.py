"""The C decode step (keenlm.infer.engine) against the PyTorch model with the same Q4 layers
(its reference): logits and cache writes on random models for every kernel path and thread
count, padded rows and grouped-query heads; greedy generation equal with and without it; the
refusals and bad inputs."""
import copy

import pytest
import torch

from keenlm.config import GenerateConfig, ModelConfig
from keenlm.infer import engine, generate_tokens
from keenlm.infer.engine import DecodeEngine, decode_engine, unsupported
from keenlm.infer.generate import left_pad
from keenlm.model import build_model
from keenlm.quant.q4 import available_paths, quantize_q4_model

needs_step = pytest.mark.skipif(engine._step is None, reason="the C decode step is not built here")


def q4_model(seed=0, **over):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=300, n_layer=2, d_model=128, n_head=4, n_kv_head=2, d_ff=256,
               max_seq_len=64)
    net = build_model(ModelConfig(**{**cfg, **over})).eval()
    with torch.no_grad():  # weights far from the initialization's small scale: a harder test
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return quantize_q4_model(net)


def test_the_step_is_built_wherever_the_kernels_are():
    if available_paths():
        assert engine._step is not None, "keenlm.quant._qdot is built but keenlm.infer._step is not"


def rel_err(got, ref):
    """per row: max |got - ref| / max |ref|"""
    return ((got - ref).abs().amax(-1) / ref.abs().amax(-1)).tolist()


SHAPES = [  # (d_model, n_head, n_kv_head): head dims 64 and 128 (the grouped AVX-512
    # attention, 1-3 query heads per key/value head) and 32 (the per-head loop)
    (256, 4, 2), (128, 1, 1), (192, 3, 1), (192, 6, 3)]


@needs_step
@pytest.mark.parametrize("seed", range(len(SHAPES)))
def test_the_step_equals_the_pytorch_model(seed):
    # against the reference: the same Q4 layers on the same kernel path, run by PyTorch, same
    # cache, several steps; rows left-padded to different lengths; grouped-query heads.
    # Tolerance: both round activations to int8 per block, a discontinuous function: where an
    # activation lands within float rounding of a rounding boundary, the step's own float
    # order (norms, softmax) can move it one code, and that moves the logits of the row. On
    # these random models a 1-ulp change of the input alone moves a row's logits by up to
    # 1.7% (4% of rows). So: most rows to float rounding, every row within 5%.
    g = torch.Generator().manual_seed(seed)
    d_model, n_head, n_kv_head = SHAPES[seed]
    net = q4_model(seed, n_head=n_head, n_kv_head=n_kv_head, d_model=d_model)
    prompts = [torch.randint(0, 300, (int(n),), generator=g).tolist()
               for n in torch.randint(1, 9, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g)]
    idx, km = left_pad(prompts, "cpu")
    B, L = idx.shape
    pos = (km.long().cumsum(-1) - 1).clamp_min(0)
    full = torch.ones(B, 24, dtype=torch.bool)
    full[:, :L] = km
    errs, cache_errs = [], []
    for path in available_paths():
        for lin in net.modules():  # the reference on the same kernel path
            if hasattr(lin, "path"):
                lin.path = path
        for threads in (1, 2, 3):
            with torch.no_grad():
                ref_cache = net.new_cache(B, 24)
                net(idx, cache=ref_cache, positions=pos, key_mask=km)
                cache = copy.deepcopy(ref_cache)
                eng, tok, npos = DecodeEngine(net, path), torch.randint(0, 300, (B,), generator=g), pos[:, -1] + 1
                for _ in range(5):
                    ref = net(tok[:, None], cache=ref_cache, positions=npos[:, None],
                              key_mask=full[:, :ref_cache.length + 1])[:, -1]
                    got = eng.step(tok, npos, cache, full, threads)
                    assert cache.length == ref_cache.length
                    errs += rel_err(got, ref)
                    n = cache.length - 1  # the position this step wrote, every layer and row
                    for kv, ref_kv in ((cache.k, ref_cache.k), (cache.v, ref_cache.v)):
                        cache_errs += rel_err(kv[:, :, :, n].flatten(1), ref_kv[:, :, :, n].flatten(1))
                    tok, npos = ref.argmax(-1), npos + 1
    errs, cache_errs = torch.tensor(errs), torch.tensor(cache_errs)
    assert (errs < 1e-5).float().mean() >= 0.9 and errs.max() < 0.05, errs.max()
    assert (cache_errs < 1e-5).float().mean() >= 0.9 and cache_errs.max() < 0.05


def step_errors(net, prompts, width: int, steps: int, threads=(2,), seed: int = 0) -> torch.Tensor:
    """rel_err of the C step's logits against the PyTorch model's (the same layers, on the
    same kernel path), after prefilling ``prompts`` (left-padded) into both caches, over
    ``steps`` greedy steps, for every kernel path and thread count."""
    g = torch.Generator().manual_seed(seed)
    idx, km = left_pad(prompts, "cpu")
    B, L = idx.shape
    pos = (km.long().cumsum(-1) - 1).clamp_min(0)
    full = torch.ones(B, width, dtype=torch.bool)
    full[:, :L] = km
    errs = []
    for path in available_paths():
        for lin in net.modules():
            if hasattr(lin, "path"):
                lin.path = path
        for threads_ in threads:
            with torch.no_grad():
                ref_cache = net.new_cache(B, width)
                net(idx, cache=ref_cache, positions=pos, key_mask=km)
                cache = copy.deepcopy(ref_cache)
                eng, tok, npos = DecodeEngine(net, path), torch.randint(0, 300, (B,), generator=g), pos[:, -1] + 1
                for _ in range(steps):
                    ref = net(tok[:, None], cache=ref_cache, positions=npos[:, None],
                              key_mask=full[:, :ref_cache.length + 1])[:, -1]
                    errs += rel_err(eng.step(tok, npos, cache, full, threads_), ref)
                    tok, npos = ref.argmax(-1), npos + 1
    return torch.tensor(errs)


@needs_step
def test_ternary_projections_decode_like_the_pytorch_model():
    # layer 0's projections in TQ2_0 blocks (keenlm.quant.tq2), layer 1's in Q4: each format's
    # kernel in one step, against the same model in PyTorch (tolerance as above)
    from keenlm.quant.tq2 import T2Linear

    net = q4_model(7, d_model=256, n_head=4, n_kv_head=2, d_ff=512)
    a, m = net.layers[0].self_attn, net.layers[0].mlp
    for parent, name in ((a, "qkv_proj"), (a, "o_proj"), (m, "gate_up_proj"), (m, "down_proj")):
        setattr(parent, name, T2Linear.from_float(getattr(parent, name).dequantized()))
    errs = step_errors(net, [[1, 2, 3, 4], [5, 6]], 16, 4, seed=7)
    assert (errs < 1e-5).float().mean() >= 0.8 and errs.max() < 0.05, errs


def qlora_model(targets, seed=11):
    """A QLoRA model as keenlm.load(RUN, quant="q4") serves it: adapters (random B, so they
    matter) over Q4 bases, Q8_0 embedding and head; projections without adapters fused."""
    from keenlm.config import LoRAConfig
    from keenlm.model.lora import add_adapters, lora_layers

    torch.manual_seed(seed)
    net = build_model(ModelConfig(vocab_size=300, n_layer=2, d_model=128, n_head=4, n_kv_head=2,
                                  d_ff=256, max_seq_len=64)).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    add_adapters(net, LoRAConfig(rank=4, alpha=8.0, base="q4", targets=targets))
    with torch.no_grad():
        for m in lora_layers(net).values():
            m.lora_B.weight.normal_(0, 0.05)
    return quantize_q4_model(net)


@needs_step
@pytest.mark.parametrize("targets", [("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                      "up_proj", "down_proj"), ("q_proj", "v_proj", "up_proj")])
def test_lora_adapters_over_q4_bases_decode_like_the_pytorch_model(targets):
    # the adapters in the step (a group's projections joined, zeros where one has none)
    # against the PyTorch model with the same LoRALinear layers; tolerance as above
    net = qlora_model(targets)
    assert unsupported(net) is None
    errs = step_errors(net, [[1, 2, 3, 4], [5, 6]], 16, 4, threads=(1, 2), seed=5)
    assert (errs < 1e-5).float().mean() >= 0.8 and errs.max() < 0.05, errs
    # and the adapters matter: the same model without them gives other logits
    from keenlm.model.lora import lora_layers

    idx, km = left_pad([[1, 2, 3, 4], [5, 6]], "cpu")
    pos = (km.long().cumsum(-1) - 1).clamp_min(0)
    full = torch.ones(2, 16, dtype=torch.bool)
    full[:, :4] = km

    def first_step():
        with torch.no_grad():
            cache = net.new_cache(2, 16)
            net(idx, cache=cache, positions=pos, key_mask=km)
            return DecodeEngine(net).step(torch.tensor([7, 8]), pos[:, -1] + 1, cache, full, 1)

    adapted = first_step()
    with torch.no_grad():
        for m in lora_layers(net).values():
            m.lora_B.weight.zero_()
    assert min(rel_err(first_step(), adapted)) > 0.05


@needs_step
def test_generation_is_the_same_with_and_without_the_engine(monkeypatch):
    # an invariance: greedy tokens (padded rows, several samples per prompt) and seeded sampling
    net = q4_model(3)
    prompts = [[1, 2, 3, 7, 8], [4, 5], [9]]
    for cfg, repeat in ((GenerateConfig(max_new_tokens=24, temperature=0), 1),
                        (GenerateConfig(max_new_tokens=16, temperature=0.8, top_k=40, seed=3), 2)):
        on = generate_tokens(net, prompts, cfg, repeat=repeat)
        monkeypatch.setattr(engine, "ENABLED", False)
        off = generate_tokens(net, prompts, cfg, repeat=repeat)
        monkeypatch.setattr(engine, "ENABLED", True)
        assert on == off
        assert len({tuple(r) for r in on}) > 1  # the rows differ: a real test of the masking


@needs_step
def test_models_it_cannot_run_are_refused_with_a_reason():
    dense = build_model(ModelConfig(vocab_size=300, n_layer=1, d_model=64, n_head=2, d_ff=128))
    assert "Q8_0" in unsupported(dense)
    assert decode_engine(dense, 1) is None
    with pytest.raises(ValueError, match="cannot run this model"):
        DecodeEngine(dense)
    windowed = q4_model(attn_window=4)
    assert "window" in unsupported(windowed)
    net = q4_model()
    assert decode_engine(net, 16) is not None and decode_engine(net, 17) is None  # 16 rows at most


@needs_step
def test_bad_inputs_are_clear_errors():
    net = q4_model()
    eng = DecodeEngine(net)
    cache = net.new_cache(1, 4)
    mask = torch.ones(1, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="token 300"):
        eng.step(torch.tensor([300]), torch.tensor([0]), cache, mask)
    with pytest.raises(ValueError, match="position 64"):
        eng.step(torch.tensor([1]), torch.tensor([64]), cache, mask)
    with pytest.raises(ValueError, match="cache"):
        eng.step(torch.tensor([1, 2]), torch.tensor([0, 0]), cache, torch.ones(2, 4, dtype=torch.bool))
    for t in range(4):
        eng.step(torch.tensor([1]), torch.tensor([t]), cache, mask)
    with pytest.raises(ValueError, match="KV cache full"):
        eng.step(torch.tensor([1]), torch.tensor([4]), cache, mask)


@needs_step
def test_rows_at_different_lengths_in_any_cache_rows_decode_as_if_alone():
    # an invariance (continuous batching): two sequences of different lengths, in cache rows 2
    # and 0 of a 3-row pool, stepped together, against each stepped alone in its own cache
    net = q4_model(9)
    eng = DecodeEngine(net)
    seqs, slots = [[3, 1, 4, 1, 5, 9, 2], [6, 5, 3]], [2, 0]
    L, Hk, D = net.cfg.n_layer, net.cfg.kv_heads, net.cfg.head_dim
    pool_k, pool_v = torch.zeros(L, 3, Hk, 16, D), torch.zeros(L, 3, Hk, 16, D)
    alone, caches = [], []
    with torch.no_grad():
        for seq, slot in zip(seqs, slots):
            c = net.new_cache(1, 16)
            net(torch.tensor([seq[:-1]]), cache=c)  # prefill all but the last token
            n = len(seq) - 1
            pool_k[:, slot, :, :n], pool_v[:, slot, :, :n] = c.k[:, 0, :, :n], c.v[:, 0, :, :n]
            alone.append(eng.step(torch.tensor(seq[-1:]), torch.tensor([n]), c,
                                  torch.ones(1, 16, dtype=torch.bool))[0])
            caches.append(c)
        lengths = torch.tensor([len(s) - 1 for s in seqs])
        got = eng.step_rows(torch.tensor([s[-1] for s in seqs]), lengths, lengths,
                            torch.tensor(slots), pool_k, pool_v, torch.ones(2, 16, dtype=torch.bool))
    for r in range(2):
        torch.testing.assert_close(got[r], alone[r], rtol=1e-5, atol=1e-5)  # same arithmetic
        n = int(lengths[r]) + 1
        torch.testing.assert_close(pool_k[:, slots[r], :, :n], caches[r].k[:, 0, :, :n])
    assert pool_k[:, 1].abs().sum() == 0  # the unused row is untouched
    with pytest.raises(ValueError, match="share cache row"):
        eng.step_rows(torch.tensor([1, 2]), lengths, lengths, torch.tensor([0, 0]), pool_k,
                      pool_v, torch.ones(2, 16, dtype=torch.bool))
