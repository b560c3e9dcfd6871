"""Tests for keenlm.io.hf: Hugging Face Llama folders out and back in.

Kinds of test: against a trusted implementation (transformers' LlamaForCausalLM and AutoTokenizer
read our export and give the same logits and ids; keenlm reads what transformers saves);
round-trip invariance (export -> keenlm.load gives bit-identical logits, single file == shards);
errors that name the file and the tensor or key; atomicity (an interrupted export leaves nothing).
All models are tiny and seeded; nothing is downloaded.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported anywhere

import keenlm
from keenlm.config import ModelConfig
from keenlm.data import ByteTokenizer, train_bpe
from keenlm.io.hf import export_hf, load_hf
from keenlm.model import build_model


def tiny_cfg(**kw) -> ModelConfig:
    # GQA (4 query heads share 2 KV heads); non-default RoPE base and eps so that a value lost
    # on the way through config.json changes the logits.
    base = dict(vocab_size=257, n_layer=2, d_model=32, n_head=4, n_kv_head=2, d_ff=64,
                max_seq_len=64, rope_theta=500.0, norm_eps=1e-6)
    base.update(kw)
    return ModelConfig(**base)


def random_net(seed: int = 0, **kw):
    """A model with O(1) random weights: the default 0.02 init gives logits so small that a
    1e-5 tolerance would hide real differences."""
    torch.manual_seed(seed)
    net = build_model(tiny_cfg(**kw))
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.dim() == 1:  # RMSNorm gains
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0, p.shape[-1] ** -0.5 if "embed" not in name else 1.0)
    return net.eval()


def token_batch(vocab: int = 257, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (2, 23), generator=g)


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers", reason="transformers is not installed "
                                                      "(pip install 'keenlm[bench]')")


def bpe_tokenizer():
    """Byte-level BPE trained on a few KB of this repository's source."""
    from keenlm.data import tokenizer as module

    text = Path(module.__file__).read_text(encoding="utf-8")[:8000]
    return train_bpe([text], 400)


SAMPLES = ["hello world", "  def f(x):\n\treturn x ** 2  ", "héllo ✓ 日本語 🙂", "", "a\r\n\r\nb"]


# ---------------------------------------------------------------------------------------------
# against transformers


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_transformers_loads_export_with_same_logits(tmp_path, transformers, tie):
    net = random_net(tie_embeddings=tie)
    folder = export_hf(net, ByteTokenizer(), tmp_path / "hf")
    m, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert type(m).__name__ == "LlamaForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert m.config.num_key_value_heads == 2 and m.config.tie_word_embeddings is tie
    tied = m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    assert tied is tie
    x = token_batch()
    with torch.no_grad():
        ours, theirs = net(x), m(x).logits
    assert ours.abs().max() > 1  # the comparison below is not between two near-zero tensors
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_transformers_loads_moe_export_as_mixtral_with_same_logits(tmp_path, transformers):
    from keenlm.config import MoEConfig

    net = random_net(ffn="moe", moe=MoEConfig(experts=4, top_k=2, d_ff=24))
    folder = export_hf(net, ByteTokenizer(), tmp_path / "hf")
    m, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert type(m).__name__ == "MixtralForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert m.config.num_local_experts == 4 and m.config.intermediate_size == 24
    x = token_batch()
    with torch.no_grad():
        ours, theirs = net(x), m(x).logits
    assert ours.abs().max() > 1
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)


@pytest.mark.parametrize("moe,words", [({"shared": 1}, "shared"), ({"top_k": 1}, "top_k is 1"),
                                       ({"balance": "bias"}, "selection biases")])
def test_moe_export_refuses_what_mixtral_cannot_hold(tmp_path, moe, words):
    from keenlm.config import MoEConfig

    net = random_net(ffn="moe", moe=MoEConfig(experts=4, **moe))
    if moe.get("balance") == "bias":
        net.layers[0].mlp.expert_bias[1] = 0.5
    with pytest.raises(ValueError, match=words):
        export_hf(net, ByteTokenizer(), tmp_path / "hf")


def test_keenlm_reads_what_transformers_saves(tmp_path, transformers):
    # transformers 5 writes only rope_parameters/dtype (no rope_theta, no torch_dtype) and a
    # tokenizer.json without keenlm's metadata: the foreign-folder path of load_hf.
    tok = bpe_tokenizer()
    net = random_net(vocab_size=tok.vocab_size, tie_embeddings=False)
    export_hf(net, tok, tmp_path / "ours")
    m = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    m.save_pretrained(tmp_path / "theirs")
    transformers.AutoTokenizer.from_pretrained(tmp_path / "ours").save_pretrained(tmp_path / "theirs")
    assert not (tmp_path / "theirs" / "keenlm_tokenizer.json").exists()
    cfg, state, tok2 = load_hf(tmp_path / "theirs")
    assert dataclasses.replace(cfg, init_std=net.cfg.init_std) == net.cfg
    loaded = keenlm.load(tmp_path / "theirs")
    x = token_batch(tok.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(loaded.net(x), net(x), rtol=0, atol=1e-6)
    for s in SAMPLES:
        assert tok2.encode(s) == tok.encode(s)
    assert tok2.eos_id == tok.eos_id and not tok2.add_bos


def test_autotokenizer_encodes_like_keenlm(tmp_path, transformers):
    tok = bpe_tokenizer()
    assert 300 < tok.vocab_size <= 400  # merges were learned: this is not the byte alphabet
    export_hf(random_net(vocab_size=tok.vocab_size), tok, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for s in SAMPLES:
        ids = tok.encode(s)
        assert hf_tok(s)["input_ids"] == ids, s
        assert hf_tok.decode(ids) == s
    assert hf_tok.eos_token_id == tok.eos_id


# ---------------------------------------------------------------------------------------------
# round trips without transformers


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_keenlm_load_round_trip_is_identical(tmp_path, tie):
    net = random_net(tie_embeddings=tie)
    folder = export_hf(net, ByteTokenizer(), tmp_path / "hf")
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "generation_config.json", "keenlm_tokenizer.json", "model.safetensors",
        "tokenizer.json", "tokenizer_config.json"]
    loaded = keenlm.load(folder)
    assert loaded.net.cfg == net.cfg and loaded.tokenizer.kind == "byte"
    x = token_batch()
    with torch.no_grad():
        assert torch.equal(loaded.net(x), net(x))


def test_config_json_serves_old_and_new_readers(tmp_path):
    folder = export_hf(random_net(), ByteTokenizer(), tmp_path / "hf")
    c = json.loads((folder / "config.json").read_text())
    assert c["rope_parameters"] == {"rope_type": "default", "rope_theta": 500.0}
    assert c["rope_theta"] == 500.0 and c["rope_scaling"] is None
    assert c["dtype"] == c["torch_dtype"] == "float32"
    assert (c["head_dim"], c["num_key_value_heads"], c["eos_token_id"]) == (8, 2, 256)
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == 256


def test_sharded_folder_loads_like_single_file(tmp_path):
    from safetensors.torch import load_file, save_file

    net = random_net(tie_embeddings=False)
    folder = export_hf(net, ByteTokenizer(), tmp_path / "hf")
    state = load_file(str(folder / "model.safetensors"))
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, keys in shards.items():
        save_file({k: state[k].to(torch.bfloat16) for k in keys}, str(folder / file),
                  metadata={"format": "pt"})
    (folder / "model.safetensors").unlink()
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    _, sharded, _ = load_hf(folder)
    expected = {k: v.to(torch.bfloat16).float() for k, v in net.state_dict().items()}
    assert sharded.keys() == expected.keys()
    for k in expected:
        assert sharded[k].dtype == torch.float32 and torch.equal(sharded[k], expected[k]), k


def test_foreign_tokenizer_takes_bos_and_template_from_hf_files(tmp_path):
    # Llama 3 style: no add_bos_token key, the post-processor puts BOS first; transformers 5
    # keeps the chat template in chat_template.jinja.
    folder = export_hf(random_net(), ByteTokenizer(), tmp_path / "hf")
    (folder / "keenlm_tokenizer.json").unlink()
    tcfg = json.loads((folder / "tokenizer_config.json").read_text())
    del tcfg["add_bos_token"]
    (folder / "tokenizer_config.json").write_text(json.dumps(tcfg))
    tj = json.loads((folder / "tokenizer.json").read_text())
    tj["post_processor"] = {"type": "TemplateProcessing", "special_tokens": {}, "pair": [],
                            "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}},
                                       {"Sequence": {"id": "A", "type_id": 0}}]}
    (folder / "tokenizer.json").write_text(json.dumps(tj))
    (folder / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    _, _, tok = load_hf(folder)
    assert tok.kind == "bpe" and tok.add_bos and tok.bos_token == "<|endoftext|>"
    assert tok.encode("hi") == [104, 105] and tok.encode_prompt("hi") == [256, 104, 105]
    assert tok.apply_chat_template([{"role": "user", "content": "yo"}]) == "yo"


# ---------------------------------------------------------------------------------------------
# bad input: each error names the file and the tensor or key


@pytest.fixture
def exported(tmp_path) -> Path:
    return export_hf(random_net(tie_embeddings=False), ByteTokenizer(), tmp_path / "hf")


def edit_config(folder: Path, **changes) -> None:
    c = json.loads((folder / "config.json").read_text())
    c.update(changes)
    (folder / "config.json").write_text(json.dumps(c))


def edit_weights(folder: Path, fn) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    fn(state)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("changes, words", [
    ({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}, "MistralForCausalLM"),
    ({"architectures": None, "model_type": "gpt2"}, "gpt2"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "llama3"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "linear"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"head_dim": 16}, "head_dim 16"),
    ({"hidden_act": "gelu"}, "gelu"),
    ({"num_hidden_layers": None}, "num_hidden_layers"),
], ids=["mistral", "gpt2", "llama3-rope", "linear-rope", "attn-bias", "mlp-bias", "head-dim",
        "gelu", "no-layers"])
def test_unsupported_config_is_refused(exported, changes, words):
    edit_config(exported, **changes)
    with pytest.raises(ValueError, match="config.json") as e:
        load_hf(exported)
    assert words in str(e.value)


def test_missing_tensor_is_named(exported):
    edit_weights(exported, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"tensor model\.layers\.1\.mlp\.up_proj\.weight is missing"):
        load_hf(exported)


def test_missing_untied_head_is_named(exported):
    edit_weights(exported, lambda s: s.pop("lm_head.weight"))
    with pytest.raises(ValueError, match=r"tensor lm_head\.weight is missing"):
        load_hf(exported)


def test_wrong_shape_is_named(exported):
    def shrink(s):
        s["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 32)

    edit_weights(exported, shrink)
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor model\.layers\.0\.self_attn"
                                         r"\.k_proj\.weight has shape \(8, 32\).*\(16, 32\)"):
        load_hf(exported)


def test_unexpected_tensor_is_named(exported):
    def add(s):
        s["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)

    edit_weights(exported, add)
    with pytest.raises(ValueError, match=r"unexpected tensor model\.layers\.0\.self_attn\.q_proj\.bias"):
        load_hf(exported)


def test_rotary_inv_freq_is_ignored(exported):
    edit_weights(exported, lambda s: s.update({"model.rotary_emb.inv_freq": torch.ones(4)}))
    load_hf(exported)


def test_truncated_safetensors_is_named(exported):
    f = exported / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match=r"model\.safetensors: cannot read safetensors file"):
        load_hf(exported)


def test_missing_or_foreign_tokenizer_is_refused(exported):
    for name in ("keenlm_tokenizer.json", "tokenizer.json"):
        (exported / name).unlink()
    with pytest.raises(ValueError, match="no tokenizer.json"):
        load_hf(exported)
    word_level = {"version": "1.0", "model": {"type": "WordLevel", "vocab": {"a": 0},
                                              "unk_token": "a"}}
    (exported / "tokenizer.json").write_text(json.dumps(word_level))
    with pytest.raises(ValueError, match=r"tokenizer\.json: tokenizer model is 'WordLevel'"):
        load_hf(exported)


# ---------------------------------------------------------------------------------------------
# export refusals and atomicity


def test_export_refuses_non_llama_parts(tmp_path):
    net = random_net()
    # no other linear kind is registered yet, so the config is bent past its own validation
    object.__setattr__(net.cfg, "linear", "ternary")
    with pytest.raises(ValueError, match="model.linear is 'ternary'"):
        export_hf(net, ByteTokenizer(), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_export_refuses_to_clobber_unless_asked(tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists"):
        export_hf(random_net(), ByteTokenizer(), out)
    assert (out / "notes.txt").exists()
    export_hf(random_net(), ByteTokenizer(), out, overwrite=True)
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").exists()


def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        export_hf(random_net(), ByteTokenizer(), tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []  # neither out_dir nor a temporary sibling
