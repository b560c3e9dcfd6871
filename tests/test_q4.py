"""The Q4 x int8 kernel (keenlm.quant.q4, C in keenlm/quant/csrc/qdot.c): every compiled path
(scalar, AVX2, AVX-512 VNNI 256- and 512-bit) against the kernel's arithmetic written in torch,
on fresh random shapes including odd row counts and odd block counts; the layer against its
dequantize-then-F.linear definition; the packing against the Q4_1 formula."""
import shutil
import subprocess
import sys

import pytest
import torch

from keenlm.quant import q4
from keenlm.quant.q4 import (Q4Linear, available_paths, dequantize_q4, q4_matmul,
                             q4_matmul_reference, quantize_activations, quantize_q4)

needs_kernel = pytest.mark.skipif(not available_paths(), reason="the C kernel is not built here")


def test_the_kernel_is_built_wherever_a_compiler_is():
    # the extension is optional at install (no compiler: the reference path, said once); where
    # a C compiler exists, a failed build must not hide behind the skipped kernel tests
    if shutil.which("cc") or shutil.which("gcc") or shutil.which("clang"):
        assert q4._qdot is not None, "a C compiler is here but keenlm.quant._qdot was not built"
        assert "scalar" in available_paths()


def test_packing_round_trips_the_q4_1_codes():
    # against the definition: 16 levels between each block's min and max
    torch.manual_seed(0)
    w = torch.randn(7, 96)
    qs, d, m = quantize_q4(w)
    assert qs.shape == (7, 48) and d.shape == m.shape == (7, 3)
    g = w.view(7, 3, 32)
    assert d.dtype == m.dtype == torch.float16  # as GGUF stores block scales
    torch.testing.assert_close(m, g.amin(-1).half())
    torch.testing.assert_close(d, ((g.amax(-1) - m.float()) / 15).half())
    deq = dequantize_q4(qs, d, m)
    # round to nearest: half a step, plus the fp16 rounding of the offset
    assert (deq - w).abs().max() <= d.float().max() / 2 + m.float().abs().max() * 2**-11 + 1e-6


@needs_kernel
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_every_path_equals_the_kernel_arithmetic_on_random_shapes(seed, threads):
    g = torch.Generator().manual_seed(seed)
    N = int(torch.randint(1, 200, (1,), generator=g))  # odd and small row counts too
    K = 32 * int(torch.randint(1, 50, (1,), generator=g))  # odd block counts too
    B = int(torch.randint(1, 17, (1,), generator=g))
    w = torch.randn(N, K, generator=g)
    x = torch.randn(B, K, generator=g) * float(torch.rand(1, generator=g) * 10)
    qs, d, m = quantize_q4(w)
    ref = q4_matmul_reference(x, qs, d, m)
    scale = ref.abs().max().clamp_min(1.0)
    for path in available_paths():
        got = q4_matmul(x, qs, d, m, path, threads)
        assert got.shape == (B, N)
        assert ((got - ref).abs().max() / scale) < 1e-5, path


@needs_kernel
def test_zero_blocks_and_extreme_values():
    torch.manual_seed(1)
    w = torch.randn(9, 128)
    w[:, 32:64] = 0  # a constant block: d = 0
    x = torch.randn(2, 128)
    x[0, :32] = 0  # an all-zero activation block: xd = 0
    x[1, 64:96] *= 1e4
    qs, d, m = quantize_q4(w)
    ref = q4_matmul_reference(x, qs, d, m)
    for path in available_paths():
        got = q4_matmul(x, qs, d, m, path)
        assert torch.isfinite(got).all()
        assert ((got - ref).abs().max() / ref.abs().max()) < 1e-5, path


@needs_kernel
def test_the_layer_is_close_to_its_definition_and_keeps_shapes():
    # int8 activations change the rounding: bounded against dequantize-then-F.linear
    torch.manual_seed(2)
    lin = Q4Linear.from_float(torch.randn(48, 576) * 0.02)
    x = torch.randn(2, 3, 576)
    with torch.no_grad():
        fast, ref = lin(x), lin.reference(x)
    assert fast.shape == (2, 3, 48)
    assert ((fast - ref).norm() / ref.norm()) < 0.01
    many = torch.randn(1, 20, 576)  # more rows than the kernel takes: the prefill GEMM
    with torch.no_grad():
        if q4.bf16_gemm_pays():  # bf16 weights, activations and outputs: bounded
            assert ((lin(many) - lin.reference(many)).norm() / lin.reference(many).norm()) < 0.01
        else:  # fp32: exactly the reference
            torch.testing.assert_close(lin(many), lin.reference(many))


@needs_kernel
@pytest.mark.parametrize("kind", ["q4", "q8", "tq2"])
def test_the_bf16_dequantization_is_the_reference_rounded(kind):
    # against the reference: dequantize to fp32 in torch, then round to bf16 (to nearest even)
    from keenlm.quant.q4 import Q8Linear
    from keenlm.quant.tq2 import T2Linear

    g = torch.Generator().manual_seed(11)
    w = torch.randn(37, 512, generator=g)
    lin = {"q4": Q4Linear, "q8": Q8Linear, "tq2": T2Linear}[kind].from_float(w)
    want = lin.reference(torch.eye(512)).T.to(torch.bfloat16)  # the weights, fp32, rounded
    got = torch.empty(37, 512, dtype=torch.bfloat16)
    codes, d, m, fmt = lin.blocks()
    for threads in (1, 2):
        q4._qdot.dequantize_bf16(codes.data_ptr(), d.data_ptr(), 0 if m is None else m.data_ptr(),
                                 got.data_ptr(), 37, 512, fmt, threads)
        assert torch.equal(got, want)


def test_activation_quantization_matches_the_kernel():
    torch.manual_seed(3)
    x = torch.randn(3, 64) * 5
    xq, xd, xs = quantize_activations(x)
    assert xq.dtype == torch.int8 and xq.abs().max() <= 127
    torch.testing.assert_close(xq.float().view(3, 2, 32) * xd[..., None], x.view(3, 2, 32),
                               atol=float(xd.max()) / 2 + 1e-6, rtol=0)
    if q4._qdot is not None:
        cq, cd, cs = torch.empty(3, 64, dtype=torch.int8), torch.empty(3, 2), torch.empty(3, 2)
        q4._qdot.quantize_q8(x.data_ptr(), cq.data_ptr(), cd.data_ptr(), cs.data_ptr(), 3, 64)
        assert torch.equal(cq, xq)
        torch.testing.assert_close(cd, xd)
        torch.testing.assert_close(cs, xs)


@needs_kernel
def test_bad_shapes_and_paths_are_clear_errors():
    qs, d, m = quantize_q4(torch.randn(4, 64))
    with pytest.raises(ValueError, match="B=17"):
        q4_matmul(torch.randn(17, 64), qs, d, m)
    with pytest.raises(ValueError, match="against codes"):  # never reads past the weights
        q4_matmul(torch.randn(1, 96), qs, d, m)
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_q4(torch.randn(4, 40))
    with pytest.raises(ValueError, match="describe one layer"):
        Q4Linear(qs, d[:, :1], m)


@needs_kernel
def test_a_converted_model_runs_the_kernel_and_stays_close_to_its_reference(monkeypatch):
    from keenlm.config import ModelConfig
    from keenlm.model import build_model
    from keenlm.quant.q4 import Q8Linear, quantize_q4_model

    torch.manual_seed(5)
    net = build_model(ModelConfig(vocab_size=300, n_layer=2, d_model=64, n_head=2, d_ff=128)).eval()
    quantize_q4_model(net)
    assert isinstance(net.layers[0].self_attn.qkv_proj, Q4Linear)
    assert isinstance(net.layers[1].mlp.gate_up_proj, Q4Linear)
    assert isinstance(net.layers[1].mlp.down_proj, Q4Linear) and isinstance(net.lm_head, Q8Linear)
    x = torch.randint(0, 300, (2, 6))
    with torch.no_grad():
        fast = net(x)
        monkeypatch.setattr(q4, "_qdot", None)  # every Q4Linear on its reference path
        ref = net(x)
    assert ((fast - ref).norm() / ref.norm()) < 0.02


@needs_kernel
def test_a_forked_child_starts_its_own_threads():
    # the parent's pool threads do not exist in a child; it must not wait for them
    code = """
import os, torch
from keenlm.quant.q4 import q4_matmul, q4_matmul_reference, quantize_q4
torch.set_num_threads(1)  # torch's own OpenMP pool is not fork-safe; keenlm's must be
qs, d, m = quantize_q4(torch.randn(300, 576))
x = torch.randn(1, 576)
ref = q4_matmul_reference(x, qs, d, m)
q4_matmul(x, qs, d, m, threads=2)
pid = os.fork()
if pid == 0:
    os._exit(0 if (q4_matmul(x, qs, d, m, threads=2) - ref).abs().max() < 1e-3 else 1)
_, status = os.waitpid(pid, 0)
raise SystemExit(os.waitstatus_to_exitcode(status))
"""
    done = subprocess.run([sys.executable, "-c", code], timeout=120)
    assert done.returncode == 0


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_gguf_blocks_are_read_as_ggml_defines_them(kind):
    # against a trusted implementation: gguf-py's own dequantization of the same raw blocks
    gguf = pytest.importorskip("gguf", reason="the gguf package is not installed")
    from keenlm.io.gguf_q4 import BLOCK_BYTES, q4_blocks

    g = torch.Generator().manual_seed(7)
    rows, blocks = 5, 3
    scales = (torch.rand(rows, blocks, 2, generator=g) - 0.5).half().numpy().view("uint8")
    codes = torch.randint(0, 256, (rows, blocks, 16), generator=g, dtype=torch.uint8).numpy()
    head = scales[..., :2] if kind == "Q4_0" else scales  # Q4_0: d only; Q4_1: d, m
    import numpy as np

    raw = np.concatenate([head, codes], axis=-1).reshape(rows, blocks * BLOCK_BYTES[kind])
    want = gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, kind))
    got = dequantize_q4(*q4_blocks(raw, kind))
    torch.testing.assert_close(got, torch.from_numpy(want.astype(np.float32)))


@needs_kernel
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("threads", [1, 2])
def test_q8_paths_equal_the_kernel_arithmetic_on_random_shapes(seed, threads):
    from keenlm.quant.q4 import q8_matmul, q8_matmul_reference, quantize_q8

    g = torch.Generator().manual_seed(100 + seed)
    N = int(torch.randint(1, 300, (1,), generator=g))
    K = 32 * int(torch.randint(1, 40, (1,), generator=g))  # odd block counts too
    B = int(torch.randint(1, 17, (1,), generator=g))
    q, d = quantize_q8(torch.randn(N, K, generator=g))
    x = torch.randn(B, K, generator=g)
    ref = q8_matmul_reference(x, q, d)
    for path in available_paths():  # AVX2 and 256-bit VNNI share the AVX2 code
        got = q8_matmul(x, q, d, path, threads)
        assert ((got - ref).abs().max() / ref.abs().max().clamp_min(1.0)) < 1e-5, path


def test_q8_embedding_and_blocks_as_ggml_defines_them():
    gguf = pytest.importorskip("gguf", reason="the gguf package is not installed")
    import numpy as np

    from keenlm.io.gguf_q4 import q8_blocks
    from keenlm.quant.q4 import Q8Embedding, dequantize_q8

    g = torch.Generator().manual_seed(9)
    scales = (torch.rand(6, 2, 1, generator=g) + 0.1).half().numpy().view("uint8")
    codes = torch.randint(-127, 128, (6, 2, 32), generator=g, dtype=torch.int8).numpy().view("uint8")
    raw = np.concatenate([scales, codes], axis=-1).reshape(6, 68)
    want = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q8_0)
                            .astype(np.float32))
    q, d = q8_blocks(raw)
    torch.testing.assert_close(dequantize_q8(q, d), want)
    idx = torch.tensor([[5, 0], [2, 2]])
    torch.testing.assert_close(Q8Embedding(q, d)(idx), want[idx])


@needs_kernel
def test_decoding_gives_the_kernels_the_threads_and_gives_them_back():
    # an invariance: the kernels split rows among threads, so tokens do not depend on the count
    from keenlm.config import GenerateConfig, ModelConfig
    from keenlm.infer import generate_tokens
    from keenlm.model import build_model
    from keenlm.quant.q4 import quantize_q4_model

    torch.manual_seed(6)
    net = build_model(ModelConfig(vocab_size=300, n_layer=2, d_model=128, n_head=2,
                                  d_ff=256)).eval()
    quantize_q4_model(net)
    cfg = GenerateConfig(max_new_tokens=12, temperature=0)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        many = generate_tokens(net, [[1, 2, 3], [4, 5]], cfg)
        assert torch.get_num_threads() == 2 and q4.THREADS == 1  # given back
        torch.set_num_threads(1)
        assert generate_tokens(net, [[1, 2, 3], [4, 5]], cfg) == many
    finally:
        torch.set_num_threads(before)
