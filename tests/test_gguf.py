"""GGUF export -> import round trips, and every kind of bad file gives a one-line error."""
import dataclasses
import types

import numpy as np
import pytest
import torch

pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'keenlm[io]')")

import keenlm  # noqa: E402
from keenlm.config import ModelConfig  # noqa: E402
from keenlm.data import ByteTokenizer, train_bpe  # noqa: E402
from keenlm.io import gguf as G  # noqa: E402
from keenlm.io.gguf_export import _add_metadata, _tensors, export_gguf  # noqa: E402
from keenlm.model import build_model  # noqa: E402
from keenlm.quant.packing import PackedLinear  # noqa: E402

TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def tiny(tie=True, d_ff=64, kv=2, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=257, n_layer=2, d_model=32, n_head=4, n_kv_head=kv, d_ff=d_ff,
                      max_seq_len=64, tie_embeddings=tie)
    return build_model(cfg).eval()


def logits(net, ids):
    with torch.no_grad():
        return net(torch.tensor([ids]))


@pytest.mark.parametrize("tie,kv", [(True, 2), (False, 4), (True, 1)])
def test_f32_round_trip_is_exact(tmp_path, tie, kv):
    net, tok = tiny(tie=tie, kv=kv), ByteTokenizer()
    path = export_gguf(net, tok, tmp_path / "m.gguf", "f32")
    km = keenlm.load(path)
    ids = torch.randint(0, 257, (20,)).tolist()
    torch.testing.assert_close(logits(km.net, ids), logits(net, ids), rtol=0, atol=1e-5)
    assert km.net.cfg.tie_embeddings == tie and km.net.cfg.kv_heads == kv
    assert km.tokenizer.encode("héllo\n\tworld") == tok.encode("héllo\n\tworld")


@pytest.mark.parametrize("qtype,atol", [("f16", 2e-3), ("q8_0", 2e-2)])
def test_quantized_exports_stay_close(tmp_path, qtype, atol):
    net = tiny()
    path = export_gguf(net, ByteTokenizer(), tmp_path / "m.gguf", qtype)
    km = keenlm.load(path)
    ids = torch.randint(0, 257, (20,)).tolist()
    a, b = logits(km.net, ids), logits(net, ids)
    assert (a - b).abs().max() < atol
    reader = G.open_reader(path)
    kinds = {reader.type_name(t) for t in reader.tensors}
    assert kinds == {"F32", qtype.upper()}  # norms stay F32, matrices take the chosen type


def test_bpe_tokenizer_and_chat_template_survive(tmp_path):
    text = "def add(a, b):\n    return a + b\n" * 50 + "print('héllo wörld', 12345)\n" * 20
    bpe = train_bpe([text], 320)
    bpe.chat_template = TEMPLATE
    net = build_model(ModelConfig(vocab_size=bpe.vocab_size, n_layer=1, d_model=32, n_head=2,
                                  d_ff=64, max_seq_len=64))
    km = keenlm.load(export_gguf(net, bpe, tmp_path / "m.gguf"))
    for s in ("def add(a, b):", "print('héllo', 987)", "  spaces\n\nnew"):
        assert km.tokenizer.encode(s) == bpe.encode(s)
    msgs = [{"role": "user", "content": "hi"}]
    assert km.tokenizer.apply_chat_template(msgs) == bpe.apply_chat_template(msgs)


# ------------------------------------------------------------------------------ bad files


def write(path, net, tok, *, arch="llama", cfg=None, drop=(), tokenizer=True, tensor_type=None):
    """A GGUF writer with knobs for breaking things on purpose."""
    from gguf import GGMLQuantizationType, GGUFWriter

    w = GGUFWriter(str(path), arch)
    fake = types.SimpleNamespace(cfg=cfg or net.cfg)
    if tokenizer:
        _add_metadata(w, fake, tok, 0)
    else:
        w.add_block_count(fake.cfg.n_layer)
        w.add_embedding_length(fake.cfg.d_model)
        w.add_feed_forward_length(fake.cfg.d_ff)
        w.add_head_count(fake.cfg.n_head)
    for name, arr in _tensors(net):
        if name in drop:
            continue
        if tensor_type == "IQ4_NL" and arr.ndim == 2 and arr.shape[1] % 32 == 0:
            # any bytes will do: the importer must refuse the type before decoding anything
            raw = np.zeros((arr.shape[0], arr.shape[1] // 32 * 18), dtype=np.uint8)
            w.add_tensor(name, raw, raw_dtype=GGMLQuantizationType.IQ4_NL)
        else:
            w.add_tensor(name, arr.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def assert_one_line_error(path, match):
    with pytest.raises(G.GGUFError) as e:
        keenlm.load(path)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg and match in msg, msg


def test_truncated_file(tmp_path):
    path = export_gguf(tiny(), ByteTokenizer(), tmp_path / "m.gguf")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    assert_one_line_error(path, "truncated")


def test_corrupted_header(tmp_path):
    path = export_gguf(tiny(), ByteTokenizer(), tmp_path / "m.gguf")
    data = bytearray(path.read_bytes())
    path.write_bytes(b"GGUX" + bytes(data[4:]))
    assert_one_line_error(path, "not a GGUF file")
    data[8:16] = (2**40).to_bytes(8, "little")  # absurd tensor count
    path.write_bytes(bytes(data))
    assert_one_line_error(path, "corrupt")


def test_tensor_with_wrong_size(tmp_path):
    net = tiny()
    bad = dataclasses.replace(net.cfg, d_ff=96)  # metadata says 96, tensors hold 64
    path = write(tmp_path / "m.gguf", net, ByteTokenizer(), cfg=bad)
    assert_one_line_error(path, "shape")


def test_unknown_architecture(tmp_path):
    path = write(tmp_path / "m.gguf", tiny(), ByteTokenizer(), arch="mamba")
    assert_one_line_error(path, "unsupported architecture 'mamba'")


def test_unsupported_quantization_type(tmp_path):
    net = tiny(d_ff=256)
    path = write(tmp_path / "m.gguf", net, ByteTokenizer(), tensor_type="IQ4_NL")
    assert_one_line_error(path, "IQ4_NL")


def ternary_net(d_model=256, d_ff=512, vocab_size=257, seed=5):
    """A packed ternary model, as a trained one would be exported. With the defaults every
    matrix row (d_model, d_ff) is a multiple of 256, the TQ1_0 / TQ2_0 block."""
    from keenlm.quant.packing import convert_qat

    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab_size, n_layer=2, d_model=d_model, n_head=4, d_ff=d_ff,
                      max_seq_len=64, linear="ternary")
    return convert_qat(build_model(cfg).eval())


def tensor_types(path) -> dict[str, str]:
    """gguf tensor name -> type name, as gguf.GGUFReader (the trusted reader) sees them."""
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}


def ternary_types(path) -> dict[str, str]:
    """Name -> type of the matrices a ternary model holds as ternary: the blocks' projections."""
    types = tensor_types(path)
    return {n: k for n, k in types.items() if n.startswith("blk.") and "norm" not in n}


@pytest.mark.parametrize("qtype", ["tq1_0", "tq2_0"])
def test_ternary_model_round_trips(tmp_path, qtype):
    from keenlm.io.gguf_export import effective_weights

    net = ternary_net()
    path = export_gguf(net, ByteTokenizer(), tmp_path / "t.gguf", qtype)
    assert set(ternary_types(path).values()) == {qtype.upper()}
    assert tensor_types(path)["token_embd.weight"] == "F16"
    km = keenlm.load(path)
    ours = effective_weights(net)
    for name, w in km.net.state_dict().items():
        if name.endswith("proj.weight"):  # ternary matrices: equal up to fp16 scale rounding
            np.testing.assert_allclose(w.numpy(), ours[name], rtol=1e-3, atol=1e-7)
    ids = torch.randint(0, 257, (16,)).tolist()
    torch.testing.assert_close(logits(km.net, ids), logits(net, ids), rtol=0, atol=1e-2)


def test_tq1_0_is_smaller_than_tq2_0(tmp_path):
    from gguf import GGUFReader

    net, size, matrix_bytes = ternary_net(), {}, {}
    for qtype in ("tq1_0", "tq2_0"):
        path = export_gguf(net, ByteTokenizer(), tmp_path / f"{qtype}.gguf", qtype)
        size[qtype] = path.stat().st_size
        matrix_bytes[qtype] = sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors
                                  if t.tensor_type.name == qtype.upper())
    assert size["tq1_0"] < size["tq2_0"]
    assert matrix_bytes["tq1_0"] * 66 == matrix_bytes["tq2_0"] * 54  # bytes per 256 weights


@pytest.mark.parametrize("qtype", ["tq1_0", "tq2_0"])
def test_ternary_rows_off_the_block_stay_f16(tmp_path, capsys, qtype):
    from keenlm.io.gguf_export import effective_weights

    net = ternary_net(d_model=64, d_ff=256)  # rows of 64, but ffn_down's rows are 256
    path = export_gguf(net, ByteTokenizer(), tmp_path / "t.gguf", qtype)
    kinds = ternary_types(path)
    assert {k for n, k in kinds.items() if ".ffn_down." in n} == {qtype.upper()}
    assert {k for n, k in kinds.items() if ".ffn_down." not in n} == {"F16"}
    err = capsys.readouterr().err
    assert (f"keenlm: blk.0.attn_q.weight has rows of 64 (not a multiple of 256, "
            f"{qtype.upper()}'s block); kept as F16") in err
    ours = effective_weights(net)
    for name, w in keenlm.load(path).net.state_dict().items():
        if name.endswith("proj.weight"):
            np.testing.assert_allclose(w.numpy(), ours[name], rtol=1e-3, atol=1e-7)


def test_missing_tokenizer_and_missing_tensor(tmp_path):
    path = write(tmp_path / "a.gguf", tiny(), ByteTokenizer(), tokenizer=False)
    assert_one_line_error(path, "no tokenizer")
    path = write(tmp_path / "b.gguf", tiny(), ByteTokenizer(), drop=("blk.1.ffn_up.weight",))
    assert_one_line_error(path, "blk.1.ffn_up.weight is missing")


def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch):
    import gguf

    def boom(self):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(OSError):
        export_gguf(tiny(), ByteTokenizer(), tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_cli_convert_and_chat(tmp_path, capsys):
    from keenlm.cli.chat import chat_loop
    from keenlm.cli import main

    text = "hello there, how are you? fine thanks\n" * 40
    bpe = train_bpe([text], 300)
    bpe.chat_template = TEMPLATE + "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    net = build_model(ModelConfig(vocab_size=bpe.vocab_size, n_layer=1, d_model=32, n_head=2,
                                  d_ff=64, max_seq_len=1024))
    src = export_gguf(net, bpe, tmp_path / "m.gguf")
    assert main(["convert", str(src), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "m2.gguf"), "--to", "gguf",
                 "--type", "f16"]) == 0
    assert (tmp_path / "m2.gguf").exists()
    turns = iter(["hello", "how are you?"])

    def read(_prompt):
        try:
            return next(turns)
        except StopIteration:
            raise EOFError from None

    out = []
    messages = chat_loop(tmp_path / "m2.gguf", max_new_tokens=8, temperature=0, read=read,
                         write=out.append)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]


def test_llama_cpp_reads_our_export(tmp_path):
    # optional: llama-cpp-python compiles for ~10 minutes, so it is not part of `make test`
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    text = "def add(a, b):\n    return a + b\n" * 60
    bpe = train_bpe([text], 300)
    torch.manual_seed(3)
    net = build_model(ModelConfig(vocab_size=bpe.vocab_size, n_layer=2, d_model=64, n_head=4,
                                  n_kv_head=2, d_ff=128, max_seq_len=64)).eval()
    path = export_gguf(net, bpe, tmp_path / "m.gguf", "f32")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, logits_all=True,
                          verbose=False)
    ids = bpe.encode("def add(a, b):")
    assert llm.tokenize(b"def add(a, b):", add_bos=False, special=False) == ids
    llm.eval(ids)
    theirs = torch.tensor(np.asarray(llm.scores[: len(ids)]))
    torch.testing.assert_close(theirs, logits(net, ids)[0], rtol=0, atol=1e-3)


@pytest.mark.parametrize("qtype", ["tq1_0", "tq2_0"])
def test_llama_cpp_reads_our_ternary_export(tmp_path, qtype):
    # optional, as above; against a trusted implementation: llama.cpp's TQ1_0 / TQ2_0 kernels
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    bpe = train_bpe(["def add(a, b):\n    return a + b\n" * 60], 300)  # llama.cpp wants merges
    net = ternary_net(vocab_size=bpe.vocab_size)
    path = export_gguf(net, bpe, tmp_path / "t.gguf", qtype)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, logits_all=True,
                          verbose=False)
    ids = bpe.encode("def add(a, b):")
    llm.eval(ids)
    theirs = torch.tensor(np.asarray(llm.scores[: len(ids)]))
    # llama.cpp's ternary dot products take 8-bit (Q8_K) activations: ~1e-2 off on logits of ~4
    torch.testing.assert_close(theirs, logits(net, ids)[0], rtol=0, atol=3e-2)


def test_fast_reader_matches_gguf_package_reader(tmp_path):
    # against a trusted implementation: keenlm's struct parser vs gguf.GGUFReader
    from gguf import GGUFReader

    from keenlm.io import gguf_format

    text = "def add(a, b):\n    return a + b\n" * 30
    bpe = train_bpe([text], 300)
    bpe.chat_template = TEMPLATE
    net = build_model(ModelConfig(vocab_size=bpe.vocab_size, n_layer=2, d_model=64, n_head=4,
                                  n_kv_head=2, d_ff=128, max_seq_len=64))
    path = export_gguf(net, bpe, tmp_path / "m.gguf", "q8_0")
    meta, infos, data = gguf_format.read(path)
    ref = GGUFReader(str(path))
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        want = field.contents()
        got = meta[key]
        if isinstance(want, float):
            assert got == pytest.approx(want)
        else:
            assert got == want, key
    assert [t.name for t in infos] == [t.name for t in ref.tensors]
    for ours, theirs in zip(infos, ref.tensors):
        assert ours.shape == tuple(int(d) for d in reversed(theirs.shape.tolist()))
        assert ours.offset == theirs.data_offset and ours.n_bytes == theirs.n_bytes
        assert ours.type_id == int(theirs.tensor_type)


def test_a_tq2_0_file_loads_as_ternary_blocks_and_decodes_in_the_engine(tmp_path):
    # keenlm.load(..., quant="q4") keeps TQ2_0 blocks as stored (keenlm.quant.tq2.T2Linear),
    # against the fp32 load of the same file; rows off the 256 block are F16 in the file and
    # become Q4. The C decode step runs the model (generation equal with and without it).
    from keenlm.config import GenerateConfig
    from keenlm.infer import engine, generate_tokens
    from keenlm.quant.q4 import Q4Linear
    from keenlm.quant.tq2 import T2Linear, dequantize_t2

    path = export_gguf(ternary_net(), ByteTokenizer(), tmp_path / "t.gguf", "tq2_0")
    fp32, low = keenlm.load(path), keenlm.load(path, quant="q4")
    layer, ref = low.net.layers[1], fp32.net.layers[1]
    assert isinstance(layer.mlp.down_proj, T2Linear) and isinstance(layer.self_attn.qkv_proj, T2Linear)
    torch.testing.assert_close(dequantize_t2(layer.mlp.down_proj.qs, layer.mlp.down_proj.d),
                               ref.mlp.down_proj.weight)  # the file's blocks, no re-rounding
    ids = torch.randint(0, 257, (12,)).tolist()
    a, b = logits(low.net, ids), logits(fp32.net, ids)
    assert (a - b).norm() / b.norm() < 0.02  # int8 activations and the Q8_0 head
    cfg = GenerateConfig(max_new_tokens=12, temperature=0)
    if engine.unsupported(low.net) is None:
        on = generate_tokens(low.net, [ids], cfg)
        engine.ENABLED = False
        try:
            assert generate_tokens(low.net, [ids], cfg) == on
        finally:
            engine.ENABLED = True
    mixed = keenlm.load(export_gguf(ternary_net(d_model=64, d_ff=256), ByteTokenizer(),
                                    tmp_path / "m.gguf", "tq2_0"), quant="q4")
    assert isinstance(mixed.net.layers[0].mlp.down_proj, T2Linear)
    assert isinstance(mixed.net.layers[0].self_attn.qkv_proj, Q4Linear)  # F16 rows of 64


def packed_int4_model(vocab=257):
    from keenlm.quant.ptq import quantize_rtn

    torch.manual_seed(0)
    net = build_model(ModelConfig(vocab_size=vocab, n_layer=2, d_model=32, n_head=4, n_kv_head=2,
                                  d_ff=64, max_seq_len=64)).eval()
    with torch.no_grad():  # weights of O(1/sqrt(in)): rounding errors show in the logits
        for name, p in net.named_parameters():
            if p.dim() == 2:
                p.normal_(0, p.shape[-1] ** -0.5 if "embed" not in name else 1.0)
    return quantize_rtn(net, "int4", group=32)


def test_q4_1_export_of_a_4bit_model_is_lossless(tmp_path):
    """keenlm's 4-bit codes with fp16 scale and offset per 32 inputs are Q4_1 blocks as they
    stand: the file's weights are the model's (the embedding goes to Q8_0)."""
    net = packed_int4_model()
    path = export_gguf(net, ByteTokenizer(), tmp_path / "m.gguf", "q4_1")
    reader = G.open_reader(path)
    kinds = {t.name: reader.type_name(t) for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == "Q4_1" and kinds["token_embd.weight"] == "Q8_0"
    km = keenlm.load(path)
    for name, m in net.named_modules():
        if isinstance(m, PackedLinear):  # every projection, bit for bit (q/k permuted back)
            torch.testing.assert_close(km.net.get_submodule(name).weight, m.weight(), rtol=0, atol=0)
    q4_0 = keenlm.load(export_gguf(net, ByteTokenizer(), tmp_path / "r.gguf", "q4_0"))
    w = net.layers[0].mlp.down_proj.weight()
    err = (q4_0.net.layers[0].mlp.down_proj.weight - w).abs().max()
    assert 0 < err < 0.5 * w.abs().max()  # q4_0 rounds the weights again: close, not equal


def test_llama_cpp_runs_our_q4_1_export_like_keenlm(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    bpe = train_bpe(["def add(a, b):\n    return a + b\n" * 60], 300)
    net = packed_int4_model(bpe.vocab_size)
    path = export_gguf(net, bpe, tmp_path / "m.gguf", "q4_1")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, logits_all=True,
                          verbose=False)
    ids = bpe.encode("def add(a, b):\n    return a + b")
    llm.eval(ids)
    theirs = torch.tensor(np.asarray(llm.scores[: len(ids)]))
    ours = logits(keenlm.load(path).net, ids)[0]
    # llama.cpp multiplies Q4_1 blocks by 8-bit-quantized activations (Q8_1): close, not exact
    assert (theirs - ours).abs().max() < 0.05 * ours.abs().max()


def test_qlora_model_exports_as_its_q4_base_and_a_llama_cpp_lora_file(tmp_path):
    """A QLoRA model (adapters over Q4 blocks) goes to GGUF as two files: the base's Q4_1
    blocks as stored (keenlm reads them back bit for bit) and the adapters in llama.cpp's LoRA
    GGUF, with which llama.cpp computes the adapted model's logits."""
    from gguf import GGUFReader

    from keenlm.config import LoRAConfig
    from keenlm.io.gguf_export import export_gguf_lora
    from keenlm.model.lora import add_adapters, lora_layers, merge_lora

    bpe = train_bpe(["def add(a, b):\n    return a + b\n" * 60], 300)
    torch.manual_seed(0)
    net = build_model(ModelConfig(vocab_size=bpe.vocab_size, n_layer=2, d_model=32, n_head=4,
                                  n_kv_head=2, d_ff=64, max_seq_len=64)).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.normal_(0, p.shape[-1] ** -0.5 if p.dim() == 2 and "embed" not in name else 1.0)
    add_adapters(net, LoRAConfig(rank=4, alpha=8.0, base="q4"))
    with torch.no_grad():
        for m in lora_layers(net).values():
            m.lora_B.weight.normal_(0, 0.3)
    with pytest.raises(ValueError, match="one set of weights"):
        export_gguf(net, bpe, tmp_path / "x.gguf", "q4_1")
    base, adapters = export_gguf_lora(net, bpe, tmp_path / "m.gguf", "q4_1")
    assert adapters.name == "m.lora.gguf"
    back = keenlm.load(base)
    for name, m in lora_layers(net).items():
        torch.testing.assert_close(back.net.get_submodule(name).weight,
                                   m.base_layer.dequantized(), rtol=0, atol=0)
    r = GGUFReader(str(adapters))
    shapes = {t.name: tuple(t.data.shape) for t in r.tensors}
    assert shapes["blk.1.attn_k.weight.lora_a"] == (4, 32)
    assert shapes["blk.1.attn_k.weight.lora_b"] == (16, 4) and len(shapes) == 2 * 7 * 2
    ids = bpe.encode("def add(a, b):\n    return a + b")
    adapted = logits(merge_lora(net), ids)[0]
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    scores = {}
    for lora in (None, str(adapters)):
        llm = llama_cpp.Llama(model_path=str(base), lora_path=lora, n_ctx=64, n_threads=1,
                              logits_all=True, verbose=False)
        llm.eval(ids)
        scores[lora] = torch.tensor(np.asarray(llm.scores[: len(ids)]))
    err = (scores[str(adapters)] - adapted).abs().max()
    assert err < 0.05 * adapted.abs().max()
    assert (scores[None] - adapted).abs().max() > 4 * err  # the adapters are what made it close
