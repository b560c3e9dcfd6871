"""FlashAttention in PyTorch: blocked attention with an online softmax and a recomputing backward.

The algorithm (Dao et al. 2022, https://arxiv.org/abs/2205.14135; FlashAttention-2, Dao 2023,
https://arxiv.org/abs/2307.08691): attention softmax(q k^T / sqrt(D)) v is computed one block of
keys at a time. Each query row keeps a running maximum m, a running sum l of exp(score - m) and
a running output; a new block rescales them (the online softmax) so no T x S score matrix ever
exists. The forward saves only the output and the log-sum-exp L = m + log(l) per query row; the
backward recomputes each block's probabilities exp(score - L) from q, k and L and accumulates
dq, dk, dv block by block (FlashAttention-2's order: the outer loop over key blocks).

On a CPU the point is memory, not a hand-scheduled SRAM: each step holds one (queries x
``block``) slab of scores instead of the whole (T x S) matrix, so forward + backward at
8192 positions needs a few percent of the naive backend's memory. All query rows of a key
block are processed in one batched matmul (the loop runs over key blocks only, S / block
iterations); with a causal mask, the rows that cannot see a block are skipped, so the work is
halved as in the paper. Grouped-query attention is computed without repeating k and v: the
H / Hk query heads that share a key head are one batch dimension.

Masks: ``mask=None`` means causal with T == S (training); ``causal=False`` attends everywhere;
a (B, 1, T, S) bool mask (KV cache, left padding) is applied as given. Rows with no visible
key output 0, as the naive reference does. Inputs fp32 or bf16 (scores and softmax statistics
in fp32). The readable reference is ``keenlm.model.attention.naive_attention``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

BLOCK = 256  # keys per tile
ROWS = 512  # queries per tile: a (heads x 512 x 256) fp32 tile of scores (4 MB at 8 heads)


def _grouped(q, Hk):
    """(B, H, T, D) -> (B, Hk, G, T, D): the G query heads sharing each key head."""
    B, H, T, D = q.shape
    return q.view(B, Hk, H // Hk, T, D)


def _tile_mask(mask, causal, T, S, i0, i1, j0, j1, device):
    """Bool (.., rows, keys) of visible (query i0..i1, key j0..j1) pairs, broadcastable against
    (B, Hk, G, rows, keys); None when every pair is visible."""
    if mask is not None:
        return mask[:, :, i0:i1, j0:j1].unsqueeze(1)  # (B, 1, 1, rows, keys)
    if not causal:
        return None
    offset = S - T  # query i sees keys <= i + offset
    if j1 - 1 <= i0 + offset:  # the whole tile is at or below the diagonal
        return None
    rows = torch.arange(i0, i1, device=device)[:, None] + offset
    return torch.arange(j0, j1, device=device)[None, :] <= rows


def _key_end(causal, mask, T, S, i1):
    """Keys past this are invisible to every query row before i1 (causal, no explicit mask)."""
    return min(S, i1 + S - T) if causal and mask is None else S


def flash_forward(q, k, v, mask=None, causal=True, block=BLOCK, rows=ROWS):
    """(out (B, H, T, D) in q's dtype, lse (B, H, T) fp32). Tiles of ``rows`` queries x
    ``block`` keys; each query tile keeps its running max, sum and output."""
    B, H, T, D = q.shape
    Hk, S = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D)
    qg = _grouped(q, Hk)
    G = H // Hk
    out = torch.zeros(B, Hk, G, T, D, dtype=q.dtype, device=q.device)
    lse = torch.full((B, Hk, G, T), float("inf"), device=q.device)
    for i0 in range(0, T, rows):
        i1 = min(T, i0 + rows)
        qi = qg[..., i0:i1, :]
        m = torch.full((B, Hk, G, i1 - i0), float("-inf"), device=q.device)
        l = torch.zeros(B, Hk, G, i1 - i0, device=q.device)
        acc = torch.zeros(B, Hk, G, i1 - i0, D, device=q.device)
        for j0 in range(0, _key_end(causal, mask, T, S, i1), block):
            j1 = min(S, j0 + block)
            kj, vj = k[:, :, None, j0:j1], v[:, :, None, j0:j1]  # (B, Hk, 1, keys, D)
            s = (qi @ kj.transpose(-2, -1)).float().mul_(scale)  # (B, Hk, G, rows, keys)
            vis = _tile_mask(mask, causal, T, S, i0, i1, j0, j1, q.device)
            if vis is not None:
                s.masked_fill_(~vis, float("-inf"))
            m_new = torch.maximum(m, s.amax(-1))
            safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # no -inf - -inf
            p = s.sub_(safe[..., None]).exp_()  # in place: the tile is the largest tensor
            corr = torch.exp(m - safe)
            l.mul_(corr).add_(p.sum(-1))
            acc.mul_(corr[..., None]).add_(p.to(v.dtype) @ vj)
            m = m_new
        seen = l > 0
        out[..., i0:i1, :] = torch.where(seen[..., None], acc / l.clamp_min(1e-30)[..., None], 0.0)
        lse[..., i0:i1] = torch.where(seen, m + torch.log(l.clamp_min(1e-30)), lse[..., i0:i1])
    return out.view(B, H, T, D), lse.view(B, H, T)


def flash_backward(dout, q, k, v, out, lse, mask=None, causal=True, block=BLOCK, rows=ROWS):
    """Gradients (dq, dk, dv) by recomputing each tile's probabilities from lse; the outer
    loop runs over key blocks (their dk, dv stay local), the inner over query tiles."""
    B, H, T, D = q.shape
    Hk, S = k.shape[1], k.shape[2]
    G = H // Hk
    scale = 1.0 / math.sqrt(D)
    qg, dog = _grouped(q, Hk), _grouped(dout, Hk)
    lse_g = lse.view(B, Hk, G, T)
    delta = (dout.float() * out.float()).sum(-1).view(B, Hk, G, T)  # rowsum(dO * O)
    dq = torch.zeros(B, Hk, G, T, D, device=q.device)
    dk = torch.zeros(B, Hk, S, D, device=q.device)
    dv = torch.zeros(B, Hk, S, D, device=q.device)
    offset = S - T
    for j0 in range(0, S, block):
        j1 = min(S, j0 + block)
        kj, vj = k[:, :, None, j0:j1], v[:, :, None, j0:j1]
        first = max(0, j0 - offset) // rows * rows if causal and mask is None else 0
        for i0 in range(first, T, rows):
            i1 = min(T, i0 + rows)
            qi, doi = qg[..., i0:i1, :], dog[..., i0:i1, :]
            s = (qi @ kj.transpose(-2, -1)).float().mul_(scale)
            p = s.sub_(lse_g[..., i0:i1, None]).exp_()  # rows with lse = inf -> 0
            vis = _tile_mask(mask, causal, T, S, i0, i1, j0, j1, q.device)
            if vis is not None:
                p.masked_fill_(~vis, 0.0)
            dv[:, :, j0:j1] += (p.transpose(-2, -1) @ doi.float()).sum(2)
            dp = (doi @ vj.transpose(-2, -1)).float()
            ds = dp.sub_(delta[..., i0:i1, None]).mul_(p).mul_(scale)
            dq[..., i0:i1, :] += ds @ kj.float()
            dk[:, :, j0:j1] += (ds.transpose(-2, -1) @ qi.float()).sum(2)
    return dq.view(B, H, T, D).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _Flash(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, causal, block, rows):
        out, lse = flash_forward(q, k, v, mask, causal, block, rows)
        ctx.save_for_backward(q, k, v, out, lse, *(() if mask is None else (mask,)))
        ctx.causal, ctx.block, ctx.rows, ctx.has_mask = causal, block, rows, mask is not None
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, *rest = ctx.saved_tensors
        mask = rest[0] if ctx.has_mask else None
        dq, dk, dv = flash_backward(dout.contiguous(), q, k, v, out, lse, mask, ctx.causal,
                                    ctx.block, ctx.rows)
        return dq, dk, dv, None, None, None, None


def flash_attention(q, k, v, mask: Optional[torch.Tensor] = None, causal: bool = True,
                    block: int = BLOCK, rows: int = ROWS):
    """The ``flash`` backend: (B, H, T, D) queries, (B, Hk, S, D) keys/values -> (B, H, T, D)."""
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key heads")
    if mask is not None and mask.dtype != torch.bool:
        raise ValueError(f"attention mask must be bool, got {mask.dtype}")
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _Flash.apply(q, k, v, mask, causal, block, rows)
    return flash_forward(q, k, v, mask, causal, block, rows)[0]


# ------------------------------------------------------------------------------ the IO model


def io_cost(batch: int, heads: int, seq_len: int, head_dim: int, *, block_q: int = 0,
            block_k: int = 0, sram_bytes: int = 192 * 1024, bytes_per_element: int = 2,
            causal: bool = False) -> dict:
    """FLOPs and bytes moved between slow memory (HBM / DRAM) and fast on-chip memory (SRAM /
    cache) for one attention forward and backward, standard vs tiled (FlashAttention-2), after
    the FlashAttention paper's analysis (Dao et al. 2022, Section 3.2 and Theorem 2).

    Standard attention (the paper's Algorithm 0) writes the N x N scores S and probabilities P
    to slow memory and reads them back: forward reads Q, K (2Nd), writes S (N^2), reads S and
    writes P (2N^2), reads P and V (N^2 + Nd), writes O (Nd); the backward reads P, dO, V, Q,
    K, writes and re-reads dP and dS (N^2 each), and writes dQ, dK, dV -- Theta(Nd + N^2).

    Tiled attention keeps one big block in fast memory and streams small blocks past it. Sizes
    default to the paper's rule: the kept block holds ceil(M / 4d) rows (room for it, its
    output accumulator and the streamed blocks), the streamed one min(that, d). Forward (outer
    loop over query blocks of B_q rows): Q and O move once (2Nd), K and V once per query block
    (2Nd * N / B_q), plus the log-sum-exp (N). Backward (outer loop over key blocks of B_k):
    K, V, dK, dV once (4Nd); Q, dO, dQ (read and written) and the per-row statistics once per
    key block ((4Nd + 2N) * N / B_k). With B ~ M / 4d that is Theta(N^2 d^2 / M): fewer bytes
    than the standard Theta(N^2) whenever d^2 is much smaller than M.

    FLOPs: forward 4 N^2 d (q k^T and p v), backward 8 N^2 d, plus 4 N^2 d for the tiled
    backward's recomputed q k^T; causal attention halves every N^2 term (the tiled version
    skips blocks above the diagonal; the standard one is counted as computing them all).
    Everything is multiplied by batch x heads; bytes by ``bytes_per_element``.
    """
    N, d, bh = seq_len, head_dim, batch * heads
    M = sram_bytes // bytes_per_element  # fast memory in elements
    kept = max(1, math.ceil(M / (4 * d)))
    bq, bk = block_q or kept, block_k or kept
    frac = 0.5 if causal else 1.0  # share of the N x N pairs the tiled version computes
    std_fwd = 2 * N * d + N * N + 2 * N * N + N * N + N * d + N * d
    # backward: read P, dO, V (N^2 + 2Nd); write and read dP, dS (4 N^2); read Q, K; write dQ, dK, dV
    std_bwd = N * N + 2 * N * d + 4 * N * N + 2 * N * d + 3 * N * d
    tiled_fwd = 2 * N * d + 2 * N * d * math.ceil(N / bq) * frac + N
    tiled_bwd = 4 * N * d + (4 * N * d + 2 * N) * math.ceil(N / bk) * frac
    mm = 2 * N * N * d  # one N x N x d matrix multiply
    out = {
        "standard": {"flops": bh * 6 * mm, "bytes": bh * bytes_per_element * (std_fwd + std_bwd)},
        "tiled": {"flops": bh * 7 * mm * frac, "bytes": bh * bytes_per_element * (tiled_fwd + tiled_bwd)},
        "block_q": bq, "block_k": bk, "sram_bytes": sram_bytes,
    }
    out["bytes_ratio"] = out["standard"]["bytes"] / out["tiled"]["bytes"]
    return out
