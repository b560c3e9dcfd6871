"""Quantization-aware low-bit linears: STE gradients, quantization grids, training, converters."""

import pytest
import torch

from keenlm.config import ModelConfig, from_dict
from keenlm.model import build_model
from keenlm.model.lowbit import QATLinear, prepare_qat


@pytest.mark.parametrize("kind", ["ternary", "int2", "int4"])
@pytest.mark.parametrize("act_bits", [0, 8])
def test_ste_gradients_reach_latent_weights(kind, act_bits):
    torch.manual_seed(0)
    lin = QATLinear(64, 48, kind, act_bits=act_bits)
    with torch.no_grad():
        lin.weight.normal_(0, 0.02)
        lin.init_alpha()
    x = torch.randn(5, 64, requires_grad=True)
    lin(x).pow(2).sum().backward()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()
    assert lin.weight.grad.abs().sum() > 0  # round() alone would give exactly zero
    assert x.grad.abs().sum() > 0
    if kind == "int2":
        assert lin.alpha.grad.abs().sum() > 0  # the step size learns too (LSQ)


def test_quantization_grids():
    torch.manual_seed(1)
    w = torch.randn(16, 64)
    t = QATLinear(64, 16, "ternary")
    t.weight.data.copy_(w)
    assert len(torch.unique(t.quantized_weight())) <= 3
    i2 = QATLinear(64, 16, "int2")
    i2.weight.data.copy_(w)
    i2.init_alpha()
    q2 = i2.quantized_weight()
    assert all(len(torch.unique(row)) <= 4 for row in q2)
    i4 = QATLinear(64, 16, "int4", group=32)
    i4.weight.data.copy_(w)
    q4 = i4.quantized_weight().view(16, 2, 32)
    assert all(len(torch.unique(g)) <= 16 for g in q4.reshape(-1, 32))
    snr4 = 10 * torch.log10(w.pow(2).mean() / (q4.reshape(16, 64) - w).pow(2).mean())
    assert snr4 > 15  # 4 bits keep ~20 dB on Gaussian weights


@pytest.mark.parametrize("kind", ["ternary", "int2", "int4"])
def test_low_bit_model_trains(kind, tmp_path, small_corpus):
    from keenlm.presets import preset_dict
    from keenlm.train import Trainer

    p = preset_dict("tiny")
    p["model"].update({"linear": kind, "d_model": 64, "n_head": 4, "d_ff": 128})
    p["data"].update({"corpus": str(small_corpus), "cache_dir": str(tmp_path / "cache"),
                      "val_fraction": 0.3})
    p["train"].update({"steps": 40, "out_dir": str(tmp_path / "run"), "progress": False})
    tr = Trainer(from_dict(p))
    assert isinstance(tr.model.layers[0].mlp.up_proj, QATLinear)
    first = tr.evaluate()["loss"]
    assert tr.fit().final_eval["loss"] < first - 0.5


def test_prepare_qat_keeps_the_trained_weights():
    torch.manual_seed(2)
    model = build_model(ModelConfig(vocab_size=97, n_layer=2, d_model=64, n_head=4, d_ff=128)).eval()
    x = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        ref = model(x)
    prepare_qat(model, "int4", group=32)
    assert isinstance(model.layers[1].self_attn.o_proj, QATLinear)
    assert type(model.lm_head) is torch.nn.Linear  # the head stays full precision by default
    with torch.no_grad():
        got = model(x)
    snr = 10 * torch.log10(ref.pow(2).mean() / (got - ref).pow(2).mean())
    assert snr > 15


def test_bad_group_is_a_config_error():
    from keenlm.config import ConfigError

    with pytest.raises(ConfigError, match="model.lowbit_group"):
        ModelConfig(linear="int4", d_model=96, n_head=2, d_ff=256, lowbit_group=64)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("n", [1, 3, 4, 7, 64, 255, 257])
def test_pack_unpack_round_trip_is_exact(bits, n):
    from keenlm.model.packing import pack, unpack

    g = torch.Generator().manual_seed(n * bits)
    codes = torch.randint(0, 1 << bits, (5, n), generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (5, -(-n * bits // 8))
    assert torch.equal(unpack(packed, bits, n), codes)


@pytest.mark.parametrize("kind,per_channel", [("ternary", False), ("ternary", True),
                                              ("int2", False), ("int4", False)])
def test_converted_model_gives_the_qat_model_logits(kind, per_channel):
    from keenlm.model.packing import PackedLinear, convert_qat

    torch.manual_seed(4)
    model = build_model(ModelConfig(vocab_size=97, n_layer=2, d_model=64, n_head=4, d_ff=128,
                                    linear=kind, lowbit_per_channel=per_channel)).eval()
    x = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        qat = model(x)
        convert_qat(model)
        packed = model(x)
    assert isinstance(model.layers[0].mlp.down_proj, PackedLinear)
    torch.testing.assert_close(packed, qat, rtol=0, atol=1e-5)
    lin = model.layers[0].mlp.up_proj  # 128 x 64 weights: 2 bits each (+ scales) vs 32 fp32
    assert lin.packed.numel() == 128 * 64 * (4 if kind == "int4" else 2) // 8


@pytest.mark.parametrize("kind", ["ternary", "int2"])
@pytest.mark.parametrize("rows,n_in,batch", [(7, 5, 1), (33, 64, 3), (16, 257, 2), (130, 100, 8)])
def test_lut_kernel_matches_unpack_reference(kind, rows, n_in, batch):
    from keenlm.model import packed_kernels
    from keenlm.model.packing import LEVELS, PackedLinear, pack

    if not packed_kernels.available():
        pytest.skip("numba is not installed (pip install 'keenlm[lowbit]')")
    g = torch.Generator().manual_seed(rows * n_in + batch)
    hi = 3 if kind == "ternary" else 4
    codes = torch.randint(0, hi, (rows, n_in), generator=g, dtype=torch.uint8)
    lin = PackedLinear(kind, pack(codes, 2), torch.rand(rows, 1, generator=g) + 0.1, n_in)
    assert lin.use_kernel
    x = torch.randn(batch, n_in, generator=g)
    with torch.no_grad():
        fast, ref = lin(x), lin.reference(x)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    assert LEVELS[kind].numel() == 4
