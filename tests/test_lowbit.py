"""Quantization-aware low-bit linears: STE gradients, quantization grids, training, converters."""

import pytest
import torch

from keenlm.config import LowBitConfig, ModelConfig, from_dict
from keenlm.model import build_model
from keenlm.quant.qat import QATLinear, prepare_qat


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

    with pytest.raises(ConfigError, match="model.lowbit.group"):
        ModelConfig(linear="int4", d_model=96, n_head=2, d_ff=256, lowbit=LowBitConfig(group=64))


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("n", [1, 3, 4, 7, 64, 255, 257])
def test_pack_unpack_round_trip_is_exact(bits, n):
    from keenlm.quant.packing import pack, unpack

    g = torch.Generator().manual_seed(n * bits)
    codes = torch.randint(0, 1 << bits, (5, n), generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (5, -(-n * bits // 8))
    assert torch.equal(unpack(packed, bits, n), codes)


@pytest.mark.parametrize("kind,per_channel", [("ternary", False), ("ternary", True),
                                              ("int2", False), ("int4", False)])
def test_converted_model_gives_the_qat_model_logits(kind, per_channel):
    from keenlm.quant.packing import PackedLinear, convert_qat

    torch.manual_seed(4)
    model = build_model(ModelConfig(vocab_size=97, n_layer=2, d_model=64, n_head=4, d_ff=128,
                                    linear=kind,
                                    lowbit=LowBitConfig(per_channel=per_channel))).eval()
    x = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        qat = model(x)
        convert_qat(model)
        packed = model(x)
    assert isinstance(model.layers[0].mlp.down_proj, PackedLinear)
    torch.testing.assert_close(packed, qat, rtol=0, atol=1e-5)
    lin = model.layers[0].mlp.up_proj  # 128 x 64 weights: 2 bits each (+ scales) vs 32 fp32
    assert lin.packed.numel() == 128 * 64 * (4 if kind == "int4" else 2) // 8


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("rows,n_in,batch", [(7, 5, 1), (33, 64, 3), (16, 257, 2), (130, 100, 8)])
def test_lut_kernel_matches_unpack_reference(bits, rows, n_in, batch):
    from keenlm.quant import kernels as packed_kernels
    from keenlm.quant.packing import from_codes

    if not packed_kernels.available():
        pytest.skip("numba is not installed (pip install 'keenlm[lowbit]')")
    g = torch.Generator().manual_seed(rows * n_in + batch)
    codes = torch.randint(0, 3 if bits == 2 else 4, (rows, n_in), generator=g, dtype=torch.uint8)
    scale = torch.rand(rows, 1, generator=g) + 0.1
    lin = from_codes(codes, scale, -scale * torch.rand(rows, 1, generator=g), 2)
    assert lin.path == "lut"
    x = torch.randn(batch, n_in, generator=g)
    with torch.no_grad():
        fast, ref = lin(x), lin.reference(x)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("rows,n_in,group,batch", [(16, 64, 32, 1), (48, 256, 64, 3), (32, 512, 128, 15)])
def test_int4_kernel_matches_unpack_reference(bits, rows, n_in, group, batch):
    from keenlm.quant.packing import _int4_kernel_available, from_codes

    if not _int4_kernel_available():
        pytest.skip("this torch build has no int4 CPU kernel")
    g = torch.Generator().manual_seed(rows + n_in + bits)
    codes = torch.randint(0, 1 << bits, (rows, n_in), generator=g, dtype=torch.uint8)
    scale = (torch.rand(rows, n_in // group, generator=g) + 0.1) / 10
    offset = -torch.rand(rows, n_in // group, generator=g)
    lin = from_codes(codes, scale, offset, bits, group)
    assert lin.path == "int4"
    x = torch.randn(batch, n_in, generator=g)
    with torch.no_grad():
        fast, ref = lin(x), lin.reference(x)
    # the kernel takes bf16 activations and bf16 (scale, zero) pairs
    torch.testing.assert_close(fast, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


@pytest.mark.parametrize("bits", [1, 3, 5, 8])
def test_pack_unpack_other_widths(bits):
    from keenlm.quant.packing import pack, packed_width, unpack

    for n in (1, 7, 8, 9, 100):
        codes = torch.randint(0, 1 << bits, (3, n), dtype=torch.uint8)
        packed = pack(codes, bits)
        assert packed.shape == (3, packed_width(n, bits))
        assert packed.shape[1] * 8 <= (n + 8) * bits  # at most one byte group of padding
        assert torch.equal(unpack(packed, bits, n), codes)


def test_packed_layer_rejects_inconsistent_tensors():
    from keenlm.quant.packing import PackedLinear, pack

    packed = pack(torch.zeros(4, 10, dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="do not hold"):
        PackedLinear(packed, torch.ones(4, 1), torch.zeros(4, 1), bits=2, in_features=20)
    with pytest.raises(ValueError, match="scale"):
        PackedLinear(packed, torch.ones(3, 1), torch.zeros(3, 1), bits=2, in_features=10)


# ------------------------------------------------------------------ post-training quantization


@pytest.mark.parametrize("kind,levels", [("ternary", 3), ("int2", 4), ("int3", 8), ("int4", 16)])
def test_rtn_codes_fit_the_grid_and_error_falls_with_bits(kind, levels):
    from keenlm.quant import ptq

    torch.manual_seed(5)
    w = torch.randn(32, 128)
    codes, scale, offset = ptq.rtn(w, kind, group=64)
    assert codes.max() < levels and scale.dtype == torch.float16 and scale.shape == (32, 2)
    deq = codes.float().view(32, 2, 64) * scale.float()[..., None] + offset.float()[..., None]
    err = (deq.view(32, 128) - w).pow(2).mean()
    # the fitted (clipped) grid beats plain min-max / absmean rounding
    s0, o0 = ptq.fit_grid(w.view(64, 64), kind, search=False)
    plain = (ptq._codes(w.view(64, 64), s0, o0, levels) * s0 + o0 - w.view(64, 64)).pow(2).mean()
    assert err <= plain + 1e-7
    assert err < {3: 0.25, 4: 0.15, 8: 0.04, 16: 0.01}[levels]


@pytest.mark.parametrize("kind,group", [("int4", 32), ("int2", 0), ("ternary", 0)])
def test_gptq_beats_rtn_on_the_layer_output(kind, group):
    from keenlm.quant import ptq

    torch.manual_seed(6)
    # correlated inputs (as real activations are): GPTQ's error compensation has work to do
    X = torch.randn(2048, 64) @ (torch.randn(64, 64) / 8 + torch.eye(64))
    w = torch.randn(48, 64)
    H = 2 * X.T @ X / len(X)

    def out_err(codes, scale, offset):
        g = group or 64
        deq = codes.float().view(48, -1, g) * scale.float()[..., None] + offset.float()[..., None]
        return (X @ deq.view(48, 64).T - X @ w.T).pow(2).mean()

    e_rtn = out_err(*ptq.rtn(w, kind, group))
    e_gptq = out_err(*ptq.gptq(w, H, kind, group))
    assert e_gptq < 0.9 * e_rtn


def _tiny_km(tie=True, seed=0):
    from keenlm.api import KeenModel
    from keenlm.config import RunConfig
    from keenlm.data import ByteTokenizer

    torch.manual_seed(seed)
    m = ModelConfig(vocab_size=ByteTokenizer().vocab_size, n_layer=2, d_model=64, n_head=4, d_ff=128,
                    tie_embeddings=tie)
    return KeenModel(build_model(m).eval(), ByteTokenizer(), RunConfig(model=m))


@pytest.mark.parametrize("bits,method,embed,tie", [("1.58", "rtn", "int8", True),
                                                   ("2", "rtn", "fp16", True),
                                                   ("3", "rtn", "fp32", False),
                                                   ("4", "gptq", "int8", False)])
def test_quantized_model_saved_and_loaded_gives_identical_logits(bits, method, embed, tie, tmp_path,
                                                                 monkeypatch):
    import keenlm
    from keenlm.quant import recipe as Q
    from keenlm.config import QuantConfig
    from keenlm.quant.packing import PackedLinear

    km = _tiny_km(tie)
    x = torch.randint(0, km.config.model.vocab_size, (2, 20))
    with torch.no_grad():
        ref = km.net(x)
    monkeypatch.setattr(Q, "_calibration", lambda km, q, log: torch.randint(0, 250, (4, 32)))
    q = QuantConfig(bits=bits, method=method, embed=embed, head="int8" if not tie else "fp32")
    Q.quantize(km, q, log=None)
    assert isinstance(km.net.layers[1].mlp.down_proj, PackedLinear)
    with torch.no_grad():
        got = km.net(x)
    snr = 10 * torch.log10(ref.pow(2).mean() / (got - ref).pow(2).mean())
    assert snr > {"1.58": 8, "2": 10, "3": 15, "4": 20}[bits]
    Q.save_quantized(km, tmp_path / "q")
    loaded = keenlm.load(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(loaded.net(x), got)
    b = Q.model_bytes(loaded)
    assert b["fp32_total"] > (2 if embed == "fp32" else 4) * b["total"]
    text = loaded.generate("ab", max_new_tokens=5, temperature=0)
    assert isinstance(text, str)


def test_quantized_folder_errors_name_the_problem(tmp_path):
    import keenlm
    from keenlm.quant import recipe as Q
    from keenlm.config import QuantConfig

    km = Q.quantize(_tiny_km(), QuantConfig(bits="2", method="rtn"), log=None)
    out = Q.save_quantized(km, tmp_path / "q")
    with pytest.raises(FileExistsError):
        Q.save_quantized(km, out)
    f = out / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match="model.safetensors"):
        keenlm.load(out)
    from safetensors.torch import load_file, save_file

    f.write_bytes(data)
    state = load_file(str(f))
    del state["layers.0.mlp.up_proj.scale"]
    save_file(state, str(f))
    with pytest.raises(ValueError, match="layers.0.mlp.up_proj.scale"):
        keenlm.load(out)


def test_qat_start_switches_quantization_on_at_the_fraction(tmp_path, small_corpus):
    from keenlm.presets import preset_dict
    from keenlm.train import Trainer

    p = preset_dict("tiny")
    p["model"].update({"linear": "int2", "d_model": 64, "n_head": 4, "d_ff": 128})
    p["data"].update({"corpus": str(small_corpus), "cache_dir": str(tmp_path / "cache"),
                      "val_fraction": 0.3})
    p["train"].update({"steps": 10, "qat_start": 0.5, "out_dir": str(tmp_path / "run"),
                       "progress": False, "eval_every": 0})
    tr = Trainer(from_dict(p))
    lin = tr.model.layers[0].mlp.up_proj
    seen = []
    for _ in range(10):
        tr.train_step()
        seen.append(lin.quantize)
    assert seen == [False] * 5 + [True] * 5


def test_init_from_starts_at_the_source_model(tmp_path, small_corpus):
    import keenlm
    from keenlm.presets import preset_dict
    from keenlm.train import Trainer

    p = preset_dict("tiny")
    p["model"].update({"d_model": 64, "n_head": 4, "d_ff": 128})
    p["data"].update({"corpus": str(small_corpus), "cache_dir": str(tmp_path / "cache"),
                      "val_fraction": 0.3})
    p["train"].update({"steps": 30, "out_dir": str(tmp_path / "src"), "progress": False,
                       "eval_every": 0})
    src = Trainer(from_dict(p))
    trained = src.fit().final_eval["loss"]
    p["model"].update({"linear": "int4", "lowbit": {"group": 32}, "n_layer": 1, "d_model": 32})
    p["train"].update({"steps": 5, "out_dir": str(tmp_path / "qat"), "init_from": str(tmp_path / "src")})
    tr = Trainer(from_dict(p), init=keenlm.load(tmp_path / "src"))
    assert tr.cfg.model.d_model == 64 and tr.cfg.model.linear == "int4"  # shape from the source
    assert isinstance(tr.model.layers[0].mlp.up_proj, QATLinear)
    assert abs(tr.evaluate()["loss"] - trained) < 0.1  # 4-bit QAT starts near the source
    tr.fit()
    assert isinstance(keenlm.load(tmp_path / "qat").net.layers[0].mlp.up_proj, QATLinear)


def test_ptq_ternary_folder_exports_to_tq2_0(tmp_path):
    pytest.importorskip("gguf")
    import keenlm
    from keenlm.quant import recipe as Q
    from keenlm.api import KeenModel
    from keenlm.config import QuantConfig, RunConfig
    from keenlm.data import ByteTokenizer
    from keenlm.io.gguf_export import export_gguf

    torch.manual_seed(7)
    m = ModelConfig(vocab_size=ByteTokenizer().vocab_size, n_layer=1, d_model=256, n_head=4, d_ff=512)
    km = KeenModel(build_model(m).eval(), ByteTokenizer(), RunConfig(model=m))
    Q.save_quantized(Q.quantize(km, QuantConfig(bits="1.58", method="rtn"), log=None), tmp_path / "q")
    packed = keenlm.load(tmp_path / "q")  # q/k/v and gate/up fused for decoding
    export_gguf(packed.net, packed.tokenizer, tmp_path / "t.gguf", "tq2_0")
    back = keenlm.load(tmp_path / "t.gguf")
    x = torch.randint(0, m.vocab_size, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(back.net(x), packed.net(x), atol=1e-2, rtol=0)
    km2 = KeenModel(build_model(m).eval(), ByteTokenizer(), RunConfig(model=m))
    Q.quantize(km2, QuantConfig(bits="2", method="rtn"), log=None)
    with pytest.raises(ValueError, match="ternary"):
        export_gguf(km2.net, km2.tokenizer, tmp_path / "u.gguf", "tq2_0")


def test_quantize_command_qat_then_info_and_generate(tmp_path, small_corpus, capsys):
    from keenlm.cli import main
    from keenlm.presets import preset_dict
    from keenlm import train

    p = preset_dict("tiny")
    p["model"].update({"d_model": 64, "n_head": 4, "d_ff": 128})
    p["data"].update({"corpus": str(small_corpus), "cache_dir": str(tmp_path / "cache"),
                      "val_fraction": 0.3})
    p["train"].update({"steps": 20, "out_dir": str(tmp_path / "run"), "progress": False})
    train(from_dict(p))
    out = tmp_path / "q2"
    assert main(["quantize", str(tmp_path / "run"), str(out), "--bits", "2", "--method", "qat",
                 "--qat-steps", "3", "--qat-batch", "2"]) == 0
    assert (tmp_path / "q2.qat-run" / "config.json").exists()  # the fine-tuning run is kept
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "2 bits by qat" in text and "smaller" in text
    assert main(["generate", str(out), "--prompt", "def ", "--generate.max_new_tokens", "4",
                 "--generate.temperature", "0", "--no-stream"]) == 0
    assert main(["quantize", str(tmp_path / "run"), str(out), "--bits", "3"]) == 2  # exists
    assert main(["quantize", str(tmp_path / "run"), str(tmp_path / "x"), "--bits", "5"]) == 2


def test_frontier_plot_and_table_from_rows(tmp_path):
    import xml.etree.ElementTree as ET

    from keenlm.studies.frontier import frontier_table, svg_frontier

    rows = [{"name": f"d{d}-{k}", "size": f"{32 * d}x{d}", "d_model": 32 * d, "kind": k, "qat_start": 0.0,
             "tokens": 1000, "params": int(10 ** (4 + d / 2)), "bytes": 10 ** (4 + d / 2) * b,
             "loss": 5.0 - d / 4 + (0 if k == "dense" else 0.1), "loss_trained": 5.0}
            for d in (2, 4) for k, b in (("dense", 4), ("ternary", 0.3))]
    svg_frontier(rows, tmp_path / "f.svg")
    root = ET.parse(tmp_path / "f.svg").getroot()  # well-formed SVG
    lines = root.findall("{http://www.w3.org/2000/svg}polyline")
    assert len(lines) == 2 and all(len(p.get("points").split()) == 2 for p in lines)
    table = frontier_table(rows)
    assert "| ternary QAT | 128x4 |" in table and "+2.5%" in table  # 4.1 / 4.0 - 1 at depth 4


def test_quant_json_naming_a_layer_the_model_lacks_is_an_error(tmp_path):
    import json

    import keenlm
    from keenlm.quant import recipe as Q
    from keenlm.config import QuantConfig

    out = Q.save_quantized(Q.quantize(_tiny_km(), QuantConfig(bits="4", method="rtn"), log=None),
                           tmp_path / "q")
    spec = json.loads((out / "quant.json").read_text())
    spec["layers"]["layers.9.mlp.up_proj"] = spec["layers"].pop("layers.1.mlp.up_proj")
    (out / "quant.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="layers.9.mlp.up_proj"):
        keenlm.load(out)
    (out / "quant.json").write_text("{}")
    with pytest.raises(ValueError, match="quant.json"):
        keenlm.load(out)


def test_default_group_halves_until_it_divides_every_width():
    from keenlm.quant import recipe as Q
    from keenlm.api import KeenModel
    from keenlm.config import QuantConfig, RunConfig
    from keenlm.data import ByteTokenizer

    m = ModelConfig(vocab_size=ByteTokenizer().vocab_size, n_layer=1, d_model=64, n_head=4, d_ff=96)
    km = KeenModel(build_model(m).eval(), ByteTokenizer(), RunConfig(model=m))
    said = []
    Q.quantize(km, QuantConfig(bits="4", method="rtn"), log=said.append)
    assert km.quant["group"] == 32 and "groups of 32" in said[0]
    assert km.net.layers[0].mlp.down_proj.group == 32
    with pytest.raises(ValueError, match="multiple of the group 64"):  # an explicit group is kept
        Q.quantize(KeenModel(build_model(m).eval(), ByteTokenizer(), RunConfig(model=m)),
                   QuantConfig(bits="4", method="rtn", group=64), log=None)
