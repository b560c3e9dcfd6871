"""The ternary TQ2_0 x int8 kernel (keenlm.quant.tq2, C in keenlm/quant/csrc/qdot.c): every
compiled path against the kernel's arithmetic in torch on random shapes, the layer against its
dequantize-then-F.linear definition, the packing against gguf-py's TQ2_0 (llama.cpp's layout)."""
import pytest
import torch

from keenlm.quant import q4
from keenlm.quant.q4 import available_paths
from keenlm.quant.tq2 import (T2Linear, dequantize_t2, pack_t2, quantize_t2, t2_matmul,
                              t2_matmul_reference, unpack_t2)

needs_kernel = pytest.mark.skipif(not available_paths(), reason="the C kernel is not built here")


def test_packing_round_trips_and_a_ternary_weight_comes_back_exactly():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 3, (5, 512), generator=g)
    assert torch.equal(unpack_t2(pack_t2(codes)), codes)
    d = (torch.rand(5, 2, generator=g) + 0.1).half().float()  # scales fp16 can hold
    w = (codes.float().view(5, 2, 256) - 1) * d[..., None]
    qs, d2 = quantize_t2(w.view(5, 512))
    torch.testing.assert_close(dequantize_t2(qs, d2), w.view(5, 512))
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_t2(torch.randn(3, 300))


def test_the_layout_is_llama_cpp_tq2_0():
    gguf = pytest.importorskip("gguf", reason="the gguf package is not installed")
    import numpy as np

    g = torch.Generator().manual_seed(1)
    qs, d = quantize_t2(torch.randn(4, 512, generator=g))
    blocks = torch.cat([qs.view(4, 2, 64), d.half().view(4, 2, 1).view(torch.uint8).view(4, 2, 2)],
                       dim=-1).reshape(4, 132).numpy()
    want = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.TQ2_0).astype(np.float32)
    torch.testing.assert_close(dequantize_t2(qs, d.half().float()), torch.from_numpy(want))


@needs_kernel
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("threads", [1, 2])
def test_every_path_equals_the_kernel_arithmetic_on_random_shapes(seed, threads):
    g = torch.Generator().manual_seed(10 + seed)
    N = int(torch.randint(1, 150, (1,), generator=g))
    K = 256 * int(torch.randint(1, 5, (1,), generator=g))
    B = int(torch.randint(1, 17, (1,), generator=g))
    qs, d = quantize_t2(torch.randn(N, K, generator=g))
    x = torch.randn(B, K, generator=g) * float(torch.rand(1, generator=g) * 10)
    ref = t2_matmul_reference(x, qs, d)
    scale = ref.abs().max().clamp_min(1.0)
    for path in available_paths():  # scalar, and the AVX-512 VNNI tiles where present
        got = t2_matmul(x, qs, d, path, threads)
        assert got.shape == (B, N)
        assert ((got - ref).abs().max() / scale) < 1e-5, path


@needs_kernel
def test_the_layer_is_close_to_its_definition_for_few_and_many_rows():
    torch.manual_seed(2)
    lin = T2Linear.from_float(torch.randn(40, 512) * 0.02)
    with torch.no_grad():
        for x in (torch.randn(2, 3, 512), torch.randn(1, 20, 512)):  # kernel; bf16 prefill
            fast, ref = lin(x), lin.reference(x)
            assert fast.shape == (*x.shape[:-1], 40)
            assert ((fast - ref).norm() / ref.norm()) < 0.01
        q4.BF16_PREFILL, saved = False, q4.BF16_PREFILL
        try:
            many = torch.randn(1, 20, 512)
            torch.testing.assert_close(lin(many), lin.reference(many))
        finally:
            q4.BF16_PREFILL = saved


@needs_kernel
def test_bad_shapes_are_clear_errors():
    qs, d = quantize_t2(torch.randn(4, 256))
    with pytest.raises(ValueError, match="against codes"):
        t2_matmul(torch.randn(1, 512), qs, d)
    with pytest.raises(ValueError, match="describe one layer"):
        T2Linear(qs, d[:, :0])
