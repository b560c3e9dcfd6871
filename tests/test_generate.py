"""Sampling filters, stop strings, streaming, seeded determinism."""
import pytest
import torch

from keenlm.config import GenerateConfig, ModelConfig
from keenlm.data import ByteTokenizer
from keenlm.infer import generate, generate_tokens
from keenlm.infer.generate import apply_repetition_penalty, filter_top_k_top_p
from keenlm.model import build_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=257, n_layer=2, d_model=32, n_head=2, d_ff=64, max_seq_len=128)
    return build_model(cfg).eval()


def test_top_k_keeps_exactly_k():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    out = filter_top_k_top_p(logits, top_k=5, top_p=1.0)
    assert (out > float("-inf")).sum(-1).tolist() == [5, 5, 5]
    assert torch.equal(out.argmax(-1), logits.argmax(-1))


def test_top_p_keeps_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = filter_top_k_top_p(logits, top_k=0, top_p=0.75) > float("-inf")
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 + 0.3 >= 0.75
    kept = filter_top_k_top_p(logits, top_k=0, top_p=0.1) > float("-inf")
    assert kept.tolist() == [[True, False, False, False]]  # the top token always stays


def test_repetition_penalty_direction():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]


def test_seeded_sampling_is_deterministic(model):
    cfg = GenerateConfig(max_new_tokens=16, temperature=1.0, top_k=20, seed=3)
    a = generate_tokens(model, [[1, 2, 3]], cfg)
    b = generate_tokens(model, [[1, 2, 3]], cfg)
    c = generate_tokens(model, [[1, 2, 3]], GenerateConfig(max_new_tokens=16, temperature=1.0,
                                                           top_k=20, seed=4))
    assert a == b and a != c


def test_stop_strings_and_streaming(model):
    tok = ByteTokenizer()
    free = generate(model, tok, "abc", GenerateConfig(max_new_tokens=40, temperature=0))
    assert len(free) > 3
    stop = free[2:4]
    streamed = []
    cut = generate(model, tok, "abc", GenerateConfig(max_new_tokens=40, temperature=0, stop=(stop,)),
                   stream=streamed.append)
    assert cut == free[: free.find(stop)]
    assert "".join(streamed).startswith(cut)


def test_eos_ends_a_row(model):
    # force the end-of-text token by making it the only allowed one
    with torch.no_grad():
        model.lm_head.weight[256] += 100.0
    try:
        out = generate_tokens(model, [[5, 6]], GenerateConfig(max_new_tokens=10, temperature=0),
                              eos_id=256)
    finally:
        with torch.no_grad():
            model.lm_head.weight[256] -= 100.0
    assert out == [[]]


def test_bad_prompts(model):
    with pytest.raises(ValueError, match="at least one token"):
        generate_tokens(model, [[]], GenerateConfig())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate_tokens(model, [[300]], GenerateConfig())
    with pytest.raises(ValueError, match="max_seq_len"):
        generate_tokens(model, [[1] * 100], GenerateConfig(max_new_tokens=100))
