"""The flash backend (FlashAttention-2 in PyTorch) against the naive reference."""

import pytest
import torch

from keenlm.model.attention import naive_attention
from keenlm.model.flash import flash_attention


def _inputs(B, H, Hk, T, S, D, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()  # noqa: E731
    return make(B, H, T, D), make(B, Hk, S, D), make(B, Hk, S, D)


def _padding_mask(B, T, S, seed):
    g = torch.Generator().manual_seed(seed)
    keys = torch.ones(B, S, dtype=torch.bool)
    for b in range(B):  # left padding of a random length per row
        keys[b, : int(torch.randint(0, S // 2, (1,), generator=g))] = False
    causal = torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T)
    return causal[None, None] & keys[:, None, None, :]


CASES = [  # B, H, Hk, T, S, D, causal, block, padded
    (2, 4, 4, 37, 37, 16, True, 8, False),  # ragged last block
    (1, 4, 2, 50, 50, 8, False, 16, False),  # non-causal, GQA
    (2, 6, 3, 5, 29, 16, True, 7, False),  # fewer queries than keys (prefill after a cache)
    (3, 4, 2, 33, 33, 16, True, 10, True),  # left padding, fully masked query rows
    (2, 2, 1, 1, 40, 8, True, 16, True),  # one decode step over a padded cache
    (1, 8, 2, 130, 130, 32, True, 64, False),
]


def _triton_or_skip():
    from keenlm.model import flash_triton

    if not flash_triton.available():
        pytest.skip("triton is not installed (pip install 'keenlm[gpu]')")
    return flash_triton.flash_triton_attention


@pytest.mark.parametrize("B,H,Hk,T,S,D,causal,block,padded", CASES)
@pytest.mark.parametrize("backend", ["flash", "flash_triton"])
def test_flash_equals_naive_forward_and_gradients(B, H, Hk, T, S, D, causal, block, padded, backend):
    q, k, v = _inputs(B, H, Hk, T, S, D, seed=T * S + H)
    mask = _padding_mask(B, T, S, seed=B + T) if padded else None
    if mask is not None:
        ref_mask = mask
    elif causal:
        ref_mask = torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T).expand(B, 1, T, S)
    else:
        ref_mask = torch.ones(B, 1, T, S, dtype=torch.bool)
    ref = naive_attention(q, k, v, ref_mask)
    if backend == "flash":
        out = flash_attention(q, k, v, mask, causal=causal, block=block, rows=block + 3)
    else:  # Triton's interpreter on a CPU: keep it small
        if T * S > 60 * 60:
            pytest.skip("interpreter tests stay small")
        out = _triton_or_skip()(q, k, v, mask, causal=causal)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_flash_bf16_close_to_fp32_reference():
    q, k, v = _inputs(2, 4, 2, 70, 70, 32, seed=3)
    ref = naive_attention(q, k, v, None)
    out = flash_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), None, block=32)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=3e-2)


def _largest_allocation(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(e.cpu_memory_usage for e in prof.events())


def test_flash_never_builds_the_full_score_matrix():
    """Forward + backward: the largest single allocation of flash is a (T x block) slab of
    scores; naive allocates the (T x T) matrix."""
    T, H, block = 512, 2, 64
    q, k, v = _inputs(1, H, H, T, T, 16, seed=4)
    full = H * T * T * 4  # one fp32 score matrix
    naive = _largest_allocation(lambda: naive_attention(q, k, v, None).sum().backward())
    flash = _largest_allocation(lambda: flash_attention(q, k, v, None, block=block).sum().backward())
    assert naive >= full
    assert flash <= H * T * block * 4 < full


def test_model_with_flash_follows_sdpa_loss_curve(tmp_path, small_corpus, monkeypatch):
    from keenlm.config import from_dict
    from keenlm.model import flash

    monkeypatch.setattr(flash, "BLOCK", 16)  # many tiles per 64-token sequence, ragged rows
    monkeypatch.setattr(flash, "ROWS", 24)
    from keenlm.presets import preset_dict
    from keenlm.train import Trainer

    losses = {}
    for backend in ("sdpa", "flash"):
        p = preset_dict("tiny")
        p["model"].update({"attention": backend})
        p["data"].update({"corpus": str(small_corpus), "cache_dir": str(tmp_path / "cache"),
                          "val_fraction": 0.3})
        p["train"].update({"steps": 50, "out_dir": str(tmp_path / backend), "progress": False})
        tr = Trainer(from_dict(p))
        losses[backend] = [tr.train_step()["loss"] for _ in range(50)]
    diff = max(abs(a - b) for a, b in zip(losses["flash"], losses["sdpa"]))
    assert diff < 1e-4, diff


def test_io_model_follows_the_papers_analysis():
    from keenlm.model.flash import io_cost

    a = io_cost(1, 8, 4096, 64, sram_bytes=192 * 1024)
    assert a["tiled"]["bytes"] < a["standard"]["bytes"] / 4  # d^2 << M: far fewer bytes
    assert a["tiled"]["flops"] > a["standard"]["flops"]  # the backward recomputes q k^T
    # standard grows as N^2; the tiled N^2 term shrinks as fast memory grows (N^2 d^2 / M)
    b = io_cost(1, 8, 8192, 64, sram_bytes=192 * 1024)
    assert 3.5 < b["standard"]["bytes"] / a["standard"]["bytes"] <= 4.0
    big = io_cost(1, 8, 8192, 64, sram_bytes=4 * 192 * 1024)
    assert big["tiled"]["bytes"] < 0.4 * b["tiled"]["bytes"]
    assert big["standard"]["bytes"] == b["standard"]["bytes"]
    causal = io_cost(1, 8, 8192, 64, sram_bytes=192 * 1024, causal=True)
    assert causal["tiled"]["flops"] == b["tiled"]["flops"] / 2


def test_flash_triton_without_cuda_is_an_error(monkeypatch):
    fn = _triton_or_skip()
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    monkeypatch.delenv("TRITON_INTERPRET")
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(RuntimeError, match="CUDA"):
        fn(q, q, q, None)


def test_auto_uses_sdpa_on_cpu():
    from keenlm.model.attention import ATTENTION, sdpa_attention

    q, k, v = _inputs(1, 4, 2, 20, 20, 16, seed=9)
    assert torch.equal(ATTENTION["auto"](q, k, v, None), sdpa_attention(q, k, v, None))


def _tile_shapes():
    from keenlm.model.flash_triton import CANDIDATES

    return sorted({c[:2] + (4, 3) for c in CANDIDATES})  # warps and stages change no result


@pytest.mark.parametrize("cand", _tile_shapes())
def test_every_tile_shape_the_gpu_may_pick_is_exact(cand, monkeypatch):
    """The autotuner chooses among CANDIDATES on a GPU; each tile shape (the interpreter runs
    them on the CPU) gives the reference's forward and gradients, ragged edges and GQA
    included."""
    attn = _triton_or_skip()
    from keenlm.model import flash_triton

    monkeypatch.setattr(flash_triton, "_choose", lambda kernel, name, grid_of, args, flags, key:
                        flash_triton._config(flash_triton._blocks(flags["D"], args[0].dtype), cand))
    B, H, Hk, T, D = 1, 2, 1, 45, 16
    q, k, v = _inputs(B, H, Hk, T, T, D, seed=sum(cand))
    ref = naive_attention(q, k, v, torch.ones(T, T, dtype=torch.bool).tril().expand(B, 1, T, T))
    out = attn(q, k, v, None, causal=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
