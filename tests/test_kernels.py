"""Fast paths against their references on fresh random inputs: RoPE, fused LM-head loss."""
import pytest
import torch

from keenlm.model.layers import apply_rope, rope_tables, rotate_reference
from keenlm.model.loss import fused_linear_cross_entropy, reference_linear_cross_entropy


@pytest.mark.parametrize("per_row", [False, True])
def test_rope_matches_reference_forward_backward(per_row):
    g = torch.Generator().manual_seed(int(per_row))
    B, T, H, D = 2, 9, 3, 16
    x = torch.randn(B, T, H, D, generator=g, requires_grad=True)
    pos = torch.randint(0, 50, (B, T), generator=g) if per_row else torch.arange(T)
    cos, sin = rope_tables(D, pos, 10000.0)
    cos, sin = cos[..., None, :], sin[..., None, :]  # (.., T, 1, D/2)
    fast, ref = apply_rope(x, cos, sin), rotate_reference(x, cos, sin)
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-6)
    go = torch.randn(fast.shape, generator=g)
    (gf,) = torch.autograd.grad(fast, x, go)
    (gr,) = torch.autograd.grad(ref, x, go)
    torch.testing.assert_close(gf, gr, rtol=0, atol=1e-6)


def test_rope_preserves_norm_and_relative_position():
    # invariants: a rotation keeps vector norms; q.k depends only on the position difference
    D = 32
    q, k = torch.randn(1, 1, 1, D), torch.randn(1, 1, 1, D)
    def at(v, p):
        c, s = rope_tables(D, torch.tensor([p]), 10000.0)
        return apply_rope(v, c[:, None], s[:, None])
    torch.testing.assert_close(at(q, 7).norm(), q.norm())
    torch.testing.assert_close((at(q, 10) * at(k, 4)).sum(), (at(q, 26) * at(k, 20)).sum(),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("N,V,chunk,weighted", [(37, 50, 8, False), (64, 300, 64, True),
                                                (100, 129, 0, True), (5, 1000, 2, False)])
def test_fused_loss_matches_reference(N, V, chunk, weighted):
    g = torch.Generator().manual_seed(N + V)
    C = 24
    h = torch.randn(N, C, generator=g, requires_grad=True)
    w = (torch.randn(V, C, generator=g) * 0.3).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    t[::7] = -100  # ignored positions
    wt = torch.rand(N, generator=g) if weighted else None
    lf, pf = fused_linear_cross_entropy(h, w, t, wt, chunk=chunk)
    lr, pr = reference_linear_cross_entropy(h, w, t, wt)
    torch.testing.assert_close(lf, lr, rtol=1e-5, atol=1e-5)
    keep = t >= 0
    torch.testing.assert_close(pf[keep], pr[keep], rtol=1e-5, atol=1e-5)
    gf = torch.autograd.grad(lf * 1.7, (h, w))
    gr = torch.autograd.grad(lr * 1.7, (h, w))
    for a, b in zip(gf, gr):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_fused_loss_through_the_model_matches_logits_loss():
    from keenlm.config import ModelConfig
    from keenlm.model import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=211, n_layer=2, d_model=32, n_head=2, d_ff=64))
    x = torch.randint(0, 211, (3, 20))
    h = model.hidden_states(x[:, :-1])
    lf, _ = fused_linear_cross_entropy(h.reshape(-1, 32), model.lm_head.weight, x[:, 1:].reshape(-1))
    lr = model.loss(model(x[:, :-1]), x[:, 1:])
    torch.testing.assert_close(lf, lr, rtol=1e-5, atol=1e-6)


def test_rmsnorm_matches_reference_forward_backward():
    from keenlm.model.layers import RMSNorm, rms_norm_reference

    g = torch.Generator().manual_seed(3)
    norm = RMSNorm(24, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(24, generator=g))
    x = torch.randn(2, 5, 24, generator=g, requires_grad=True)
    fast, ref = norm(x), rms_norm_reference(x, norm.weight, 1e-5)
    torch.testing.assert_close(fast, ref, rtol=1e-6, atol=1e-6)
    go = torch.randn(fast.shape, generator=g)
    gf = torch.autograd.grad(fast, (x, norm.weight), go)
    gr = torch.autograd.grad(ref, (x, norm.weight), go)
    for a, b in zip(gf, gr):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_swiglu_matches_reference_forward_backward():
    from keenlm.model.layers import _SwiGLU, swiglu_reference

    g = torch.Generator().manual_seed(4)
    x = (torch.randn(3, 7, 40, generator=g) * 3).requires_grad_()
    fast, ref = _SwiGLU.apply(x), swiglu_reference(x)
    torch.testing.assert_close(fast, ref, rtol=1e-6, atol=1e-6)
    go = torch.randn(fast.shape, generator=g)
    (gf,) = torch.autograd.grad(fast, x, go)
    (gr,) = torch.autograd.grad(ref, x, go)
    torch.testing.assert_close(gf, gr, rtol=1e-5, atol=1e-5)


def test_inference_paths_match_autograd_paths():
    # the no-grad shortcuts (generation) compute what the autograd.Functions compute
    from keenlm.config import ModelConfig
    from keenlm.model import build_model

    torch.manual_seed(5)
    model = build_model(ModelConfig(vocab_size=97, n_layer=2, d_model=32, n_head=4, n_kv_head=2,
                                    d_ff=64))
    x = torch.randint(0, 97, (2, 15))
    with torch.no_grad():
        fast = model(x)
    slow = model(x).detach()
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-5)


def test_int8_kernel_matches_its_reference():
    from keenlm.quant.int8 import Int8Linear

    g = torch.Generator().manual_seed(6)
    lin = Int8Linear(torch.randn(48, 64, generator=g))
    for rows in (1, 5, 40):  # 40 rows takes the prefill (bf16 GEMM) path
        x = torch.randn(rows, 64, generator=g)
        fast, ref = lin(x), lin.reference(x)
        # the kernel multiplies in bf16: compare with a bf16-sized tolerance
        assert (fast - ref).abs().max() <= 2e-2 * ref.abs().max()


def test_int8_model_stays_close_to_fp32():
    from keenlm.config import ModelConfig
    from keenlm.quant.int8 import Int8Linear, quantize_int8
    from keenlm.model import build_model

    torch.manual_seed(7)
    model = build_model(ModelConfig(vocab_size=97, n_layer=2, d_model=64, n_head=4, d_ff=128)).eval()
    x = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        ref = model(x)
        quantize_int8(model)
        got = model(x)
    assert isinstance(model.lm_head, Int8Linear)
    assert isinstance(model.layers[0].self_attn.qkv_proj, Int8Linear)
    assert isinstance(model.layers[0].mlp.gate_up_proj, Int8Linear)
    with torch.no_grad():  # a fused projection's slice stands in for the original layer
        h = torch.randn(3, 64)
        torch.testing.assert_close(model.layers[0].mlp.up_proj(h),
                                   model.layers[0].mlp.gate_up_proj(h)[:, 128:])
    snr = 10 * torch.log10(ref.pow(2).mean() / (got - ref).pow(2).mean())
    assert snr > 25, f"signal-to-quantization-noise {snr:.1f} dB"


def test_int4_kernel_matches_its_reference_and_recovers_a_q4_grid():
    from keenlm.quant.int4 import Int4Linear

    g = torch.Generator().manual_seed(8)
    # weights already on a 16-level grid per block of 32 (what a Q4_1 file holds)
    lo = torch.randn(48, 4, 1, generator=g)
    d = torch.rand(48, 4, 1, generator=g) * 0.1 + 0.01
    q = torch.randint(0, 16, (48, 4, 32), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15  # every block spans its full range, as Q4_1 quantizes
    w = (lo + d * q).view(48, 128)
    lin = Int4Linear(w, group_size=32)
    assert (lin.dequantized() - w).abs().max() < 1e-2 * w.abs().max()  # bf16 scales: ~3 digits
    for rows in (1, 3, 20):
        x = torch.randn(rows, 128, generator=g)
        fast, ref = lin(x), lin.reference(x)
        assert (fast - ref).abs().max() <= 2e-2 * ref.abs().max()
