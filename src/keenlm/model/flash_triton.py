"""FlashAttention-2 as Triton kernels: the ``flash_triton`` backend (CUDA GPUs).

The algorithm of keenlm.model.flash, one program per tile:

- forward: a program owns BLOCK_M query rows of one (batch, head); it streams BLOCK_N keys and
  values at a time through on-chip memory with the online softmax, and writes the output and
  the log-sum-exp of its rows. Causal programs stop at the diagonal.
- backward: delta = rowsum(dO * O) first (PyTorch); then one kernel whose programs own
  BLOCK_N keys of one (batch, key head) and loop over the query blocks (and the query heads
  sharing that key head, for grouped-query attention) to accumulate dK and dV; and one kernel
  whose programs own BLOCK_M query rows and loop over key blocks to accumulate dQ. No atomics:
  each output tile has one owner (FlashAttention-2's split).

Masks as in keenlm.model.flash: causal with T == S when ``mask`` is None (queries see keys up
to their position + S - T), or a (B, 1, T, S) bool mask read tile by tile (KV cache, left
padding); rows with no visible key output 0. Scores, softmax statistics and accumulators are
fp32; inputs fp32, fp16 or bf16. Any sequence length (tiles are masked at the edges) and head
dims up to 256 (padded to a power of two inside the kernel).

On a CPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set before this
module is imported): that is how the tests check them against the naive reference without a
GPU. Without CUDA and without the interpreter, calling the backend is an error.
"""
from __future__ import annotations

import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pip install 'keenlm[gpu]'
    triton = None


def available() -> bool:
    return triton is not None


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _visible(rows, cols, T, S, offset, mask_ptr, smb, smt, sms, b,
                 CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr):
        ok = (rows[:, None] < T) & (cols[None, :] < S)
        if HAS_MASK:
            mv = tl.load(mask_ptr + b * smb + rows[:, None] * smt + cols[None, :] * sms, mask=ok, other=0)
            ok = ok & (mv != 0)
        elif CAUSAL:
            ok = ok & (cols[None, :] <= rows[:, None] + offset)
        return ok

    @triton.jit
    def _tile_grads(q, k, v, do, lse, delta, rows, cols, scale, T, S, offset, mask_ptr, smb, smt,
                    sms, b, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr):
        """A tile's probabilities recomputed from the log-sum-exp, and dS = P (dP - delta)."""
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale
        ok = _visible(rows, cols, T, S, offset, mask_ptr, smb, smt, sms, b, CAUSAL, HAS_MASK)
        p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION).to(tl.float32)
        return p, p * (dp - delta[:, None]) * scale

    @triton.jit
    def _fwd(Q, K, V, O, L, Mask, scale, T, S, offset, H, G,
             sqb, sqh, sqt, skb, skh, skt, smb, smt, sms,
             CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, D: tl.constexpr,
             BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             PRECISION: tl.constexpr):
        pid_m, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // H, bh % H
        kh = h // G
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, BLOCK_D)
        q_ptrs = Q + b * sqb + h * sqh + rows[:, None] * sqt + dims[None, :]
        q = tl.load(q_ptrs, mask=(rows[:, None] < T) & (dims[None, :] < D), other=0.0)
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        end = S
        if CAUSAL and not HAS_MASK:  # keys past the last row's diagonal are never visible
            end = tl.minimum(S, (pid_m + 1) * BLOCK_M + offset)
        for n0 in range(0, end, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            kv_off = b * skb + kh * skh + cols[:, None] * skt + dims[None, :]
            kv_ok = (cols[:, None] < S) & (dims[None, :] < D)
            k = tl.load(K + kv_off, mask=kv_ok, other=0.0)
            v = tl.load(V + kv_off, mask=kv_ok, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale
            ok = _visible(rows, cols, T, S, offset, Mask, smb, smt, sms, b, CAUSAL, HAS_MASK)
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - safe[:, None])
            alpha = tl.exp(m - safe)
            l = l * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
            m = m_new
        seen = l > 0
        out = tl.where(seen[:, None], acc / tl.where(seen, l, 1.0)[:, None], 0.0)
        lse = tl.where(seen, m + tl.log(tl.where(seen, l, 1.0)), float("inf"))
        tl.store(O + b * sqb + h * sqh + rows[:, None] * sqt + dims[None, :], out.to(O.dtype.element_ty),
                 mask=(rows[:, None] < T) & (dims[None, :] < D))
        tl.store(L + bh * T + rows, lse, mask=rows < T)

    @triton.jit
    def _bwd_dkdv(Q, K, V, DO, L, Delta, DK, DV, Mask, scale, T, S, offset, H, G,
                  sqb, sqh, sqt, skb, skh, skt, smb, smt, sms,
                  CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, D: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                PRECISION: tl.constexpr):
        pid_n, bkh = tl.program_id(0), tl.program_id(1)
        Hk = H // G
        b, kh = bkh // Hk, bkh % Hk
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        dims = tl.arange(0, BLOCK_D)
        kv_off = b * skb + kh * skh + cols[:, None] * skt + dims[None, :]
        kv_ok = (cols[:, None] < S) & (dims[None, :] < D)
        k = tl.load(K + kv_off, mask=kv_ok, other=0.0)
        v = tl.load(V + kv_off, mask=kv_ok, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        start = 0
        if CAUSAL and not HAS_MASK:  # rows above this block's first key never see it
            start = tl.maximum(0, pid_n * BLOCK_N - offset) // BLOCK_M * BLOCK_M
        for g in range(0, G):
            h = kh * G + g
            for m0 in range(start, T, BLOCK_M):
                rows = m0 + tl.arange(0, BLOCK_M)
                q_off = b * sqb + h * sqh + rows[:, None] * sqt + dims[None, :]
                q_ok = (rows[:, None] < T) & (dims[None, :] < D)
                q = tl.load(Q + q_off, mask=q_ok, other=0.0)
                do = tl.load(DO + q_off, mask=q_ok, other=0.0)
                lse = tl.load(L + (b * H + h) * T + rows, mask=rows < T, other=float("inf"))
                delta = tl.load(Delta + (b * H + h) * T + rows, mask=rows < T, other=0.0)
                p, ds = _tile_grads(q, k, v, do, lse, delta, rows, cols, scale, T, S, offset, Mask,
                                    smb, smt, sms, b, CAUSAL, HAS_MASK, PRECISION)
                dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION).to(tl.float32)
                dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION).to(tl.float32)
        tl.store(DK + kv_off, dk.to(DK.dtype.element_ty), mask=kv_ok)
        tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=kv_ok)

    @triton.jit
    def _bwd_dq(Q, K, V, DO, L, Delta, DQ, Mask, scale, T, S, offset, H, G,
                sqb, sqh, sqt, skb, skh, skt, smb, smt, sms,
                CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, D: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                PRECISION: tl.constexpr):
        pid_m, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // H, bh % H
        kh = h // G
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, BLOCK_D)
        q_off = b * sqb + h * sqh + rows[:, None] * sqt + dims[None, :]
        q_ok = (rows[:, None] < T) & (dims[None, :] < D)
        q = tl.load(Q + q_off, mask=q_ok, other=0.0)
        do = tl.load(DO + q_off, mask=q_ok, other=0.0)
        lse = tl.load(L + bh * T + rows, mask=rows < T, other=float("inf"))
        delta = tl.load(Delta + bh * T + rows, mask=rows < T, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        end = S
        if CAUSAL and not HAS_MASK:
            end = tl.minimum(S, (pid_m + 1) * BLOCK_M + offset)
        for n0 in range(0, end, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            kv_off = b * skb + kh * skh + cols[:, None] * skt + dims[None, :]
            kv_ok = (cols[:, None] < S) & (dims[None, :] < D)
            k = tl.load(K + kv_off, mask=kv_ok, other=0.0)
            v = tl.load(V + kv_off, mask=kv_ok, other=0.0)
            _, ds = _tile_grads(q, k, v, do, lse, delta, rows, cols, scale, T, S, offset, Mask,
                                smb, smt, sms, b, CAUSAL, HAS_MASK, PRECISION)
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION).to(tl.float32)
        tl.store(DQ + q_off, dq.to(DQ.dtype.element_ty), mask=q_ok)


def _launch_args(q, k, mask, causal):
    B, H, T, D = q.shape
    Hk, S = k.shape[1], k.shape[2]
    if mask is not None:
        m = mask.to(torch.int8).expand(B, 1, T, S).contiguous()
        mask_args = (m, m.stride(0), m.stride(2), m.stride(3))
    else:
        mask_args = (q, 0, 0, 0)  # unused
    return B, H, T, D, Hk, S, mask_args


def _blocks(D: int, dtype) -> dict:
    """The default tiles (what the interpreter runs, and the first candidate on a GPU)."""
    block_d = max(16, triton.next_power_of_2(D))
    small = block_d > 64 or dtype == torch.float32
    # fp32 inputs multiply in full fp32 ("ieee"), not TF32: the backend is exact to 1e-5
    return {"BLOCK_D": block_d, "BLOCK_M": 64 if small else 128, "BLOCK_N": 32 if small else 64,
            "PRECISION": "ieee" if dtype == torch.float32 else "tf32"}


# Tile shapes and launch settings tried on a GPU: (BLOCK_M, BLOCK_N, num_warps, num_stages).
# FlashAttention-2 runs 128 x 64 (head dim 128) and 128 x 128 (head dim 64) with 4-8 warps on
# A100/H100; the list brackets those. fp32 inputs keep the default tiles (their shared memory).
CANDIDATES = ((128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3),
              (64, 64, 4, 3), (64, 128, 4, 3), (128, 32, 4, 4), (64, 32, 4, 2))
TUNED: dict = {}  # (kernel, head dim block, dtype, T and S rounded up to powers of 2, flags) -> config


def tuning_enabled() -> bool:
    return os.environ.get("KEENLM_FLASH_TUNE", "1") != "0" and not interpreted()


def _launch(kernel, name: str, grid_of, args: tuple, flags: dict, key: tuple) -> None:
    """Run ``kernel`` with the tiles ``_choose`` picks; ``grid_of(config)`` is its grid."""
    cfg = _choose(kernel, name, grid_of, args, flags, key)
    kernel[grid_of(cfg)](*args, **flags, **cfg)


def _choose(kernel, name: str, grid_of, args: tuple, flags: dict, key: tuple) -> dict:
    """The default tiles, or on a GPU the tuned ones: the first call with a new ``key`` times
    every candidate (triton.testing.do_bench; a candidate that does not fit the chip's shared
    memory or registers is skipped) and keeps the fastest."""
    base = _blocks(flags["D"], args[0].dtype)
    if not tuning_enabled() or args[0].dtype == torch.float32:
        return base
    full = (name, *key)
    if full not in TUNED:
        from triton.testing import do_bench

        timings = {}
        for cand in CANDIDATES:
            cfg = _config(base, cand)
            try:
                timings[cand] = do_bench(lambda: kernel[grid_of(cfg)](*args, **flags, **cfg),
                                         warmup=5, rep=20)
            except Exception as e:  # out of shared memory / registers for this tile: skip it
                if "OutOfResources" not in type(e).__name__ and "resources" not in str(e):
                    raise
        if not timings:
            raise RuntimeError(f"flash_triton: no tile configuration fits this GPU for {full}")
        TUNED[full] = min(timings, key=timings.get)
    return _config(base, TUNED[full])


def _config(base: dict, cand: tuple) -> dict:
    bm, bn, warps, stages = cand
    return {**base, "BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}


def _key(q, T, S, causal, has_mask) -> tuple:
    return (q.shape[-1], q.dtype, triton.next_power_of_2(T), triton.next_power_of_2(S), causal,
            has_mask)


def _check(q):
    if triton is None:
        raise RuntimeError("attention 'flash_triton' needs triton: pip install 'keenlm[gpu]'")
    if not q.is_cuda and not interpreted():
        raise RuntimeError("attention 'flash_triton' runs on CUDA GPUs (on a CPU only under "
                           "TRITON_INTERPRET=1, for tests); use 'flash' or 'sdpa' here")


def triton_forward(q, k, v, mask=None, causal=True):
    _check(q)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, H, T, D, Hk, S, (m, smb, smt, sms) = _launch_args(q, k, mask, causal)
    out = torch.empty_like(q)
    lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    args = (q, k, v, out, lse, m, 1.0 / math.sqrt(D), T, S, S - T, H, H // Hk,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            smb, smt, sms)
    _launch(_fwd, "fwd", lambda c: (triton.cdiv(T, c["BLOCK_M"]), B * H), args,
            {"CAUSAL": causal, "HAS_MASK": mask is not None, "D": D},
            _key(q, T, S, causal, mask is not None))
    return out, lse


def triton_backward(dout, q, k, v, out, lse, mask=None, causal=True):
    q, k, v, dout = q.contiguous(), k.contiguous(), v.contiguous(), dout.contiguous()
    B, H, T, D, Hk, S, (m, smb, smt, sms) = _launch_args(q, k, mask, causal)
    delta = (dout.float() * out.float()).sum(-1).contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    common = (1.0 / math.sqrt(D), T, S, S - T, H, H // Hk, q.stride(0), q.stride(1), q.stride(2),
              k.stride(0), k.stride(1), k.stride(2), smb, smt, sms)
    flags = {"CAUSAL": causal, "HAS_MASK": mask is not None, "D": D}
    key = _key(q, T, S, causal, mask is not None)
    _launch(_bwd_dkdv, "dkdv", lambda c: (triton.cdiv(S, c["BLOCK_N"]), B * Hk),
            (q, k, v, dout, lse, delta, dk, dv, m, *common), flags, key)
    _launch(_bwd_dq, "dq", lambda c: (triton.cdiv(T, c["BLOCK_M"]), B * H),
            (q, k, v, dout, lse, delta, dq, m, *common), flags, key)
    return dq, dk, dv


class _FlashTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, causal):
        out, lse = triton_forward(q, k, v, mask, causal)
        ctx.save_for_backward(q, k, v, out, lse, *(() if mask is None else (mask,)))
        ctx.causal, ctx.has_mask = causal, mask is not None
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, *rest = ctx.saved_tensors
        dq, dk, dv = triton_backward(dout, q, k, v, out, lse, rest[0] if ctx.has_mask else None,
                                     ctx.causal)
        return dq, dk, dv, None, None


def flash_triton_attention(q, k, v, mask=None, causal: bool = True):
    """The ``flash_triton`` backend: same signature and results as keenlm.model.flash."""
    _check(q)
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key heads")
    if q.shape[-1] > 256:
        raise ValueError(f"flash_triton supports head dims up to 256, got {q.shape[-1]}")
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _FlashTriton.apply(q, k, v, mask, causal)
    return triton_forward(q, k, v, mask, causal)[0]
