"""The core on a CUDA GPU: backends against the reference, cache invariance, a bf16 training run.

Opt-in by nature: skipped where torch sees no CUDA device (CI, laptops without a GPU).
Run on a GPU machine with: PYTHONPATH=src python -m pytest -q tests/gpu
"""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="no CUDA device")]

from keenlm.config import GenerateConfig, ModelConfig, from_dict  # noqa: E402
from keenlm.model import build_model  # noqa: E402
from keenlm.model.attention import naive_attention, sdpa_attention  # noqa: E402
from keenlm.model.loss import fused_linear_cross_entropy, reference_linear_cross_entropy  # noqa: E402


def test_sdpa_matches_naive_on_cuda_fp32():
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 8, 37, 64, device="cuda", generator=g, requires_grad=True)
    k = torch.randn(2, 2, 37, 64, device="cuda", generator=g, requires_grad=True)
    v = torch.randn(2, 2, 37, 64, device="cuda", generator=g, requires_grad=True)
    outs = [fn(q, k, v, None) for fn in (naive_attention, sdpa_attention)]
    go = torch.randn_like(outs[0])
    grads = [torch.autograd.grad(o, (q, k, v), go) for o in outs]
    # TF32 may be on for matmuls: compare at a TF32-sized tolerance
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=2e-3)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-3)


def test_kv_cache_equals_recompute_on_cuda():
    from keenlm.infer import generate_tokens

    torch.manual_seed(1)
    model = build_model(ModelConfig(vocab_size=97, n_layer=2, d_model=64, n_head=4, n_kv_head=2,
                                    d_ff=128, max_seq_len=64)).cuda().eval()
    prompt = torch.randint(0, 97, (9,)).tolist()
    cached = generate_tokens(model, [prompt], GenerateConfig(max_new_tokens=16, temperature=0))[0]
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(16):
            seq.append(int(model(torch.tensor([seq], device="cuda"))[0, -1].argmax()))
    assert cached == seq[len(prompt):]


def test_fused_loss_matches_reference_on_cuda():
    g = torch.Generator(device="cuda").manual_seed(2)
    h = torch.randn(300, 64, device="cuda", generator=g, requires_grad=True)
    w = torch.randn(1000, 64, device="cuda", generator=g, requires_grad=True)
    t = torch.randint(0, 1000, (300,), device="cuda", generator=g)
    lf, _ = fused_linear_cross_entropy(h, w, t, chunk=64)
    lr, _ = reference_linear_cross_entropy(h, w, t)
    torch.testing.assert_close(lf, lr, rtol=1e-3, atol=1e-3)
    for a, b in zip(torch.autograd.grad(lf, (h, w)), torch.autograd.grad(lr, (h, w))):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_trainer_on_cuda_with_bf16_autocast(tmp_path, small_corpus):
    from keenlm.presets import preset_dict
    from keenlm.train import Trainer

    p = preset_dict("tiny")
    p["data"].update({"corpus": str(small_corpus), "cache_dir": str(tmp_path / "cache"),
                      "val_fraction": 0.3})
    p["train"].update({"steps": 60, "out_dir": str(tmp_path / "run"), "progress": False,
                       "runtime": {"device": "auto", "dtype": "auto"}})
    tr = Trainer(from_dict(p))
    assert tr.device.type == "cuda" and tr.amp == torch.bfloat16
    first = tr.evaluate()["loss"]
    res = tr.fit()
    assert res.final_eval["loss"] < first - 0.5
    assert all(p.is_cuda and p.dtype == torch.float32 for p in tr.model.parameters())


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("T,D,Hk,padded", [(1000, 64, 8, False), (257, 128, 2, False), (300, 64, 4, True)])
def test_flash_triton_matches_naive_on_cuda(dtype, atol, T, D, Hk, padded):
    from keenlm.model.flash_triton import flash_triton_attention

    g = torch.Generator(device="cuda").manual_seed(T + D)
    q, k, v = (torch.randn(2, 8 if i == 0 else Hk, T, D, device="cuda", generator=g, dtype=dtype)
               .requires_grad_() for i in range(3))
    mask = None
    if padded:
        keys = torch.ones(2, T, dtype=torch.bool, device="cuda")
        keys[0, :37] = False
        mask = torch.ones(T, T, dtype=torch.bool, device="cuda").tril()[None, None] & keys[:, None, None]
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference in full fp32
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = naive_attention(*ref_in, mask)
    out = flash_triton_attention(q, k, v, mask, causal=True)
    go = torch.randn_like(ref)
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=atol)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), go.to(dtype)), torch.autograd.grad(ref, ref_in, go)):
        torch.testing.assert_close(a.float(), b, rtol=0, atol=atol * 10)


def test_grpo_step_and_shared_prefix_on_cuda(tmp_path):
    from keenlm.api import KeenModel
    from keenlm.config import rl_config
    from keenlm.data.tokenizer import ByteTokenizer
    from keenlm.presets import resolve
    from keenlm.train.grpo import RLTrainer
    from keenlm.train.logprobs import reference_logprobs, shared_prefix_logprobs

    torch.manual_seed(2)
    tok = ByteTokenizer()
    cfg = resolve(from_dict({"model": {"n_layer": 2, "d_model": 64, "n_head": 2, "max_seq_len": 160},
                             "train": {"seq_len": 128}}), tok.vocab_size)
    km = KeenModel(build_model(cfg.model), tok, cfg, None)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    rows = torch.tensor([0, 0, 1, 1])
    comps = [[1, 2], [3], [4, 5, 6], []]
    net = km.net.cuda()
    torch.testing.assert_close(shared_prefix_logprobs(net, prompts, rows, comps),
                               reference_logprobs(net, prompts, rows, comps), rtol=0, atol=2e-3)
    rl = rl_config(dict(task="countdown", prompts=2, group=4, max_new_tokens=8, device="cuda",
                        out_dir=str(tmp_path / "rl"), progress=False, eval_n=2))
    rec = RLTrainer(km, rl, reward=lambda p, c: [float(len(x) % 2) for x in c]).rl_step()
    assert rec["step"] == 1 and rec["completion_len"] > 0
