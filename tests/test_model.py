"""Model numerics: causality, attention backends against the reference, KV cache invariances."""

import pytest
import torch

from keenlm.config import ATTENTION_BACKENDS, FFN_KINDS, LINEAR_KINDS, ModelConfig, SpikeConfig
from keenlm.model import ATTENTION, FFN, LINEAR, Transformer, build_model
from keenlm.model.attention import naive_attention, sdpa_attention
from keenlm.presets import PRESETS, preset_dict, resolve
from keenlm.config import from_dict


def tiny_cfg(**kw):
    base = dict(vocab_size=97, n_layer=2, d_model=32, n_head=4, n_kv_head=2, d_ff=64,
                max_seq_len=64, attention="naive")
    base.update(kw)
    return ModelConfig(**base)


def test_registries_match_config_names():
    # invariant: the names config validation accepts are exactly the registered parts
    assert set(ATTENTION) == set(ATTENTION_BACKENDS)
    assert set(LINEAR) == set(LINEAR_KINDS)
    # spiking is not a model.ffn value: model.spike.steps > 0 picks it (ModelConfig.ffn_kind)
    assert set(FFN) == set(FFN_KINDS) | {"spiking"}
    assert ModelConfig(spike=SpikeConfig(steps=4)).ffn_kind == "spiking"


@pytest.mark.parametrize("backend", ["naive", "sdpa"])
def test_causality(backend):
    # invariant: changing future tokens never changes the logits of earlier positions
    torch.manual_seed(0)
    model = build_model(tiny_cfg(attention=backend)).eval()
    x = torch.randint(0, 97, (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


@pytest.mark.parametrize("H,Hk,with_mask", [(4, 4, False), (4, 2, False), (6, 1, False),
                                            (4, 2, True), (4, 4, True)])
def test_sdpa_matches_naive_forward_backward(H, Hk, with_mask):
    # against our reference: fused SDPA == explicit softmax attention, fp32, fresh random inputs
    g = torch.Generator().manual_seed(H * 10 + Hk)
    B, T, S, D = 2, 7, 11 if with_mask else 7, 16
    q = torch.randn(B, H, T, D, generator=g, requires_grad=True)
    k = torch.randn(B, Hk, S, D, generator=g, requires_grad=True)
    v = torch.randn(B, Hk, S, D, generator=g, requires_grad=True)
    mask = None
    if with_mask:  # cache-style causal offset plus left padding on row 1
        mask = torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T).expand(B, 1, T, S).clone()
        mask[1, :, :, :3] = False
    outs, grads = [], []
    for fn in (naive_attention, sdpa_attention):
        out = fn(q, k, v, mask)
        go = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
        gq, gk, gv = torch.autograd.grad(out, (q, k, v), go)
        outs.append(out)
        grads.append((gq, gk, gv))
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-5)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_model_sdpa_matches_naive_logits_and_grads():
    torch.manual_seed(1)
    m1 = build_model(tiny_cfg(attention="naive"))
    m2 = build_model(tiny_cfg(attention="sdpa"))
    m2.load_state_dict(m1.state_dict())
    x = torch.randint(0, 97, (3, 24))
    l1, l2 = m1.loss(m1(x[:, :-1]), x[:, 1:]), m2.loss(m2(x[:, :-1]), x[:, 1:])
    l1.backward()
    l2.backward()
    torch.testing.assert_close(l2, l1, rtol=0, atol=1e-5)
    for (n, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(p2.grad, p1.grad, rtol=0, atol=1e-5, msg=n)


@pytest.mark.parametrize("backend", ["naive", "sdpa"])
def test_kv_cache_equals_full_recompute_greedy(backend):
    # invariant: cached decoding == recomputing the whole sequence each step, token for token
    from keenlm.config import GenerateConfig
    from keenlm.infer import generate_tokens

    torch.manual_seed(2)
    model = build_model(tiny_cfg(attention=backend)).eval()
    prompt = torch.randint(0, 97, (9,)).tolist()
    cached = generate_tokens(model, [prompt], GenerateConfig(max_new_tokens=20, temperature=0))[0]
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(20):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert cached == seq[len(prompt):]


def test_cached_logits_match_full_forward():
    torch.manual_seed(3)
    model = build_model(tiny_cfg(attention="sdpa")).eval()
    x = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2, 16)
        parts = [model(x[:, :10], cache=cache), model(x[:, 10:13], cache=cache),
                 model(x[:, 13:14], cache=cache), model(x[:, 14:], cache=cache)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-5)


def test_left_padded_batch_equals_single_generation():
    # invariant: a prompt generates the same tokens alone or left-padded in a batch
    from keenlm.config import GenerateConfig
    from keenlm.infer import generate_tokens

    torch.manual_seed(4)
    model = build_model(tiny_cfg(attention="sdpa")).eval()
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (3, 11, 7)]
    cfg = GenerateConfig(max_new_tokens=12, temperature=0)
    batched = generate_tokens(model, prompts, cfg)
    for p, b in zip(prompts, batched):
        assert generate_tokens(model, [p], cfg)[0] == b


def test_tied_and_untied_embeddings():
    tied = build_model(tiny_cfg(tie_embeddings=True))
    untied = build_model(tiny_cfg(tie_embeddings=False))
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert untied.lm_head.weight is not untied.embed_tokens.weight
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731  (parameters() dedups)
    assert n(untied) - n(tied) == 97 * 32


def test_sequence_longer_than_context_is_an_error():
    model = build_model(tiny_cfg(max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_resolves_and_builds(name):
    cfg = from_dict(preset_dict(name))
    cfg = resolve(cfg, vocab_size=257 if cfg.data.tokenizer == "byte" else cfg.data.vocab_size)
    with torch.device("meta"):  # the large preset has ~0.7B parameters: count, don't allocate
        model = Transformer(cfg.model)
    n = sum(p.numel() for p in model.parameters())
    assert n > 10_000
    if name == "tiny":
        assert n < 200_000
    if name == "large":
        assert n > 500_000_000


def test_rope_theta_changes_outputs():
    torch.manual_seed(5)
    a = build_model(tiny_cfg(rope_theta=10000.0))
    b = build_model(tiny_cfg(rope_theta=500.0))
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 97, (1, 12))
    assert not torch.allclose(a(x), b(x))
