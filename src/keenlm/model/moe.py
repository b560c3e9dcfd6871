"""Mixture of experts: each token runs, and updates, only the few experts its router picks.

    router logits z = x W_r (fp32)      p = softmax(z)
    selection:  the top-k experts of p (+ b, a selection-only bias, with bias balancing)
    weights:    k >= 2: p renormalized over the chosen k (Mixtral); k = 1: p itself (Switch),
                so the router learns from the language-model loss too
    output:     sum over chosen e of weight_e * expert_e(x)  [+ shared experts(x)]

Papers: Switch Transformer (Fedus et al. 2021, https://arxiv.org/abs/2101.03961) for top-1
routing, capacity and the load-balancing loss; ST-MoE (Zoph et al. 2022,
https://arxiv.org/abs/2202.08906) for the router z-loss; DeepSeekMoE (Dai et al. 2024) for
shared experts; DeepSeek-V3 (2024, https://arxiv.org/abs/2412.19437) for auxiliary-loss-free
balancing; sparse upcycling (Komatsuzaki et al. 2022, https://arxiv.org/abs/2212.05055).

Balancing (``model.moe.balance``):
- ``aux``: the Switch loss  aux_coef * E * sum_e f_e P_e, with f_e the share of the batch's
  assignments routed to e and P_e the mean router probability of e. It is aux_coef exactly
  when routing is uniform and grows as it skews (up to aux_coef * E).
- ``bias``: no loss; after every optimizer step each expert's selection bias moves by
  ``bias_rate`` toward balance (up when under-loaded, down when over-loaded). The bias changes
  which experts are chosen, never the weights they are given.
- ``none``: neither (routing tends to collapse onto a few experts: the reason for the others).
The z-loss z_coef * mean(logsumexp(z)^2) keeps logits small in every mode (0 turns it off).

Capacity (``capacity_factor`` c > 0, in training): expert e takes at most ceil(c * k * N / E)
of the N tokens' assignments, first choices before second choices, earlier tokens first within a
choice rank; the other assignments are dropped. A token all of whose assignments are dropped
gets 0 from the routed experts, so the block's residual carries it unchanged. c = 0: dropless.

Compute: ``forward`` sorts the N x k assignments by expert and runs each expert on its own
tokens only (gather, expert, scale, scatter-add), so forward and backward FLOPs grow with k,
not E. ``moe_reference`` beside it runs every expert on every token and masks: obviously right,
E/k times the work; the tests compare the two, outputs and gradients. On a Hopper GPU in
bf16, ``_grouped`` runs all experts in two ``torch._grouped_mm`` calls instead (the optional
fast path; elsewhere, and for quantized experts, the per-expert loop runs). On the CPU in
bf16/fp16 the loop runs on rows padded to a multiple of ``pad_rows`` per expert (``pad_ok``:
oneDNN compiles a kernel per new matmul shape, and the row counts change every batch).

Routing statistics (expert loads, dropped share, router entropy) are summed over the forward
passes of an optimizer step and handed to the trainer by ``end_step``, which also applies the
bias update. The ledger counts parameters a token does not use (``idle_params``), so active
parameters and FLOPs per token are the k chosen experts', not all E.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from torch import nn

from keenlm.model.layers import SwiGLU, _SwiGLU, swiglu_reference as swiglu


class _ExpertShape:
    """The slice of ModelConfig an expert's SwiGLU reads: its widths."""

    def __init__(self, d_model: int, d_ff: int):
        self.d_model, self.d_ff = d_model, d_ff


def expert_width(cfg) -> int:
    """Each expert's SwiGLU width: model.moe.d_ff, or model.d_ff / top_k (then k experts
    together are as wide as the dense feed-forward: equal active parameters)."""
    return cfg.moe.d_ff or max(1, cfg.d_ff // cfg.moe.top_k)


class MoE(nn.Module):
    def __init__(self, cfg, linear):
        super().__init__()
        m = cfg.moe
        self.E, self.k, self.cfg = m.experts, m.top_k, m
        width = expert_width(cfg)
        shape = _ExpertShape(cfg.d_model, width)
        self.gate = nn.Linear(cfg.d_model, m.experts, bias=False)  # the router, run in fp32
        self.experts = nn.ModuleList(SwiGLU(shape, linear) for _ in range(m.experts))
        self.shared_experts = nn.ModuleList(SwiGLU(shape, linear) for _ in range(m.shared))
        # selection-only bias of auxiliary-loss-free balancing: saved (it shapes routing)
        self.register_buffer("expert_bias", torch.zeros(m.experts))
        self._aux: dict[str, torch.Tensor] = {}
        self.use_grouped = True  # the GPU fast path where it applies (grouped_ok); False: per expert
        self.pad_rows = 64  # CPU low-precision path: rows per expert padded to a multiple (pad_ok)
        self._reset_stats()

    # ------------------------------------------------------------------------------ routing

    def route(self, h: torch.Tensor):
        """h (N, C) -> logits (N, E) fp32, chosen experts (N, k), their weights (N, k) fp32."""
        with torch.autocast(h.device.type, enabled=False):
            logits = F.linear(h.float(), self.gate.weight.float())
        probs = logits.softmax(-1)
        score = probs + self.expert_bias if self.cfg.balance == "bias" else probs
        idx = score.topk(self.k, dim=-1).indices
        w = probs.gather(-1, idx)
        if self.k > 1:
            w = w / w.sum(-1, keepdim=True)
        return logits, probs, idx, w

    def capacity(self, n_tokens: int) -> int:
        """Assignments an expert may take (n_tokens * k when dropless). Capacity applies in
        training only: evaluation and generation are dropless, so a token's output never
        depends on the other tokens of its batch there (and a Mixtral export computes the same)."""
        c = self.cfg.capacity_factor
        if c == 0 or not self.training:
            return n_tokens * self.k
        return math.ceil(c * self.k * n_tokens / self.E)

    def assignments(self, idx: torch.Tensor):
        """Sort the N x k assignments by expert. Returns (token of each sorted assignment,
        its index into idx.flatten(), kept mask, counts per expert before dropping)."""
        N = idx.shape[0]
        flat = idx.reshape(-1)  # assignment a = token * k + rank
        a = torch.arange(flat.numel(), device=idx.device)
        rank, token = a % self.k, a // self.k
        # within an expert: first choices first, then earlier tokens (GShard/Switch priority)
        order = torch.argsort(flat * (self.k * N) + rank * N + token)
        counts = torch.bincount(flat, minlength=self.E)
        starts = torch.cumsum(counts, 0) - counts
        pos = torch.arange(order.numel(), device=idx.device) - starts[flat[order]]
        kept = pos < self.capacity(N)
        return token[order], order, kept, counts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        logits, probs, idx, w = self.route(h)
        token, order, kept, counts = self.assignments(idx)
        if self.capacity(h.shape[0]) < idx.numel():  # something may be dropped
            token, order = token[kept], order[kept]
            kept_counts = torch.bincount(idx.reshape(-1)[order], minlength=self.E)
        else:
            kept_counts = counts
        if torch.is_autocast_enabled(h.device.type):  # gather and scatter in the compute dtype
            h = h.to(torch.get_autocast_dtype(h.device.type))
        xs = h.index_select(0, token)  # backward: one index_add (faster than h[token]'s)
        if self.grouped_ok(xs):
            ys = self._grouped(xs, kept_counts)
        elif self.pad_ok(xs):
            ys = self._per_expert_padded(xs, kept_counts)
        else:
            ys = self._per_expert(xs, kept_counts.tolist())
        out = torch.zeros(h.shape, dtype=ys.dtype if ys is not None else h.dtype, device=h.device)
        if ys is not None:  # each token's k weighted outputs, summed in the experts' dtype
            out.index_add_(0, token, ys * w.reshape(-1)[order, None].to(ys.dtype))
        for s in self.shared_experts:
            out = out + s(h)
        if self.training:
            if torch.is_grad_enabled():
                self._losses(logits, probs, counts)
                if _data_parallel():  # DDP and FSDP2 reduce gradients in buckets that must match
                    # across ranks, and an expert no token of this rank chose has none: give every
                    # expert a zero one (the trainer drops those of experts the whole batch left)
                    out = out + sum(p.reshape(-1)[:1].sum() for p in self.experts.parameters()) * 0
            self._record(probs, counts, idx.numel() - int(kept.sum()))
        return out.reshape(shape).to(x.dtype)

    def _per_expert(self, xs: torch.Tensor, counts: list[int]) -> torch.Tensor | None:
        """Expert e on its slice of the sorted assignments: one SwiGLU call per expert. The
        slices come from ``split`` (its backward is one concatenation; slicing in a loop
        would make each slice's backward fill a zero tensor as large as all of them)."""
        parts = [self.experts[e](chunk) for e, chunk in enumerate(xs.split(counts))
                 if counts[e]]
        return torch.cat(parts) if parts else None

    def pad_ok(self, xs: torch.Tensor) -> bool:
        """Pad each expert's rows to a multiple of ``pad_rows``: on the CPU in bf16/fp16, where
        oneDNN builds (JIT-compiles) a matmul kernel for every new shape and caches it. The
        experts' row counts change with every batch, so unpadded, nearly every expert GEMM of a
        step pays that build (~0.6 ms here, against ~0.25 ms for the multiply itself: measured,
        1024 x 128 by 128 x 352 in bf16); padded, a few dozen shapes recur and stay cached."""
        return (self.pad_rows > 1 and xs.device.type == "cpu"
                and xs.dtype in (torch.bfloat16, torch.float16))

    def _per_expert_padded(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor | None:
        """``_per_expert`` on rows padded with zeros to a multiple of ``pad_rows`` per expert.
        A zero row's SwiGLU output is exactly zero and it is never read back, so the result,
        and every gradient, equals the unpadded loop's; the cost is at most pad_rows - 1 extra
        rows per expert."""
        r = self.pad_rows
        padded = (counts + r - 1) // r * r
        starts = torch.cumsum(counts, 0) - counts
        pstarts = torch.cumsum(padded, 0) - padded
        expert = torch.repeat_interleave(torch.arange(self.E, device=xs.device), counts)
        dest = torch.arange(xs.shape[0], device=xs.device) - starts[expert] + pstarts[expert]
        xp = xs.new_zeros(int(padded.sum()), xs.shape[1]).index_copy(0, dest, xs)
        yp = self._per_expert(xp, padded.tolist())
        return None if yp is None else yp.index_select(0, dest)

    def grouped_ok(self, xs: torch.Tensor) -> bool:
        """The GPU fast path applies: CUDA with sm90+ (Hopper), bf16 (autocast or weights),
        plain dense experts, widths that are multiples of 16, and torch._grouped_mm."""
        if not (self.use_grouped and xs.is_cuda and hasattr(torch, "_grouped_mm")):
            return False
        bf16 = xs.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cuda") and
                                              torch.get_autocast_dtype("cuda") == torch.bfloat16)
        e = self.experts[0]
        dense = all(type(m) is nn.Linear for x in self.experts
                    for m in (x.gate_proj, x.up_proj, x.down_proj)) and e.gate_up_proj is None
        return (bf16 and dense and torch.cuda.get_device_capability(xs.device)[0] >= 9
                and e.gate_proj.weight.shape[0] % 16 == 0 and xs.shape[-1] % 16 == 0)

    def _grouped(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """All experts in two grouped GEMMs (torch._grouped_mm, bf16): the same arithmetic as
        ``_per_expert`` without a kernel launch per expert. Weights are stacked per call."""
        gate_up = torch.stack([torch.cat([x.gate_proj.weight, x.up_proj.weight])
                               for x in self.experts]).to(torch.bfloat16)  # (E, 2F, C)
        down = torch.stack([x.down_proj.weight for x in self.experts]).to(torch.bfloat16)
        offs = torch.cumsum(counts, 0).to(torch.int32)
        with torch.autocast("cuda", enabled=False):
            a = torch._grouped_mm(xs.to(torch.bfloat16), gate_up.transpose(1, 2), offs=offs)
            act = _SwiGLU.apply(a) if torch.is_grad_enabled() else swiglu(a)
            return torch._grouped_mm(act, down.transpose(1, 2), offs=offs)

    # -------------------------------------------------------------------- balance, statistics

    def _losses(self, logits, probs, counts):
        aux = {}
        if self.cfg.balance == "aux" and self.cfg.aux_coef > 0:
            # the whole batch's shares, over every data-parallel rank
            counts = ranks_sum(counts.float())
            f = counts / counts.sum()
            n = ranks_sum(torch.tensor(float(probs.shape[0]), device=probs.device))
            aux["aux_loss"] = self.cfg.aux_coef * self.E * (f * ranks_sum(probs.sum(0), grad=True)
                                                            / n).sum()
        if self.cfg.z_coef > 0:
            aux["z_loss"] = self.cfg.z_coef * torch.logsumexp(logits, -1).pow(2).mean()
        self._aux = aux

    def pop_aux_losses(self) -> dict[str, torch.Tensor]:
        aux, self._aux = self._aux, {}
        return aux

    def _reset_stats(self):
        self._counts = torch.zeros(self.E, dtype=torch.float64)
        self._dropped = self._assigned = 0
        self._entropy, self._tokens = 0.0, 0

    @torch.no_grad()
    def _record(self, probs, counts, dropped: int):
        self._counts += counts.detach().to("cpu", torch.float64)
        self._dropped += dropped
        self._assigned += int(counts.sum())
        ent = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
        self._entropy += float(ent.sum())
        self._tokens += probs.shape[0]

    def unused_params(self) -> list[nn.Parameter]:
        """Parameters of the routed experts that no token of this step's whole batch (every
        rank's) chose. Across ranks they hold zero gradients (see ``forward``); the trainer drops
        those before the optimizer step, so that, as in one process, they are not updated."""
        counts = ranks_sum(self._counts.to(self.expert_bias.device)).cpu()
        return [p for e, expert in enumerate(self.experts) if counts[e] == 0
                for p in expert.parameters()]

    def end_step(self) -> dict | None:
        """The routing statistics since the last call (None if no tokens passed); with bias
        balancing, move each expert's bias toward balance. Call once per optimizer step."""
        if not self._tokens:
            return None
        if dist.is_available() and dist.is_initialized():  # the job's counts, every rank's
            total = ranks_sum(torch.cat([self._counts, torch.tensor(
                [self._dropped, self._assigned, self._entropy, self._tokens],
                dtype=torch.float64)]).to(self.expert_bias.device)).cpu()
            self._counts = total[:self.E]
            self._dropped, self._assigned, self._entropy, self._tokens = total[self.E:].tolist()
        load = self._counts / self._counts.mean()  # 1.0 = the mean load
        if self.cfg.balance == "bias" and self.training:
            step = self.cfg.bias_rate * torch.sign(1.0 - load).to(self.expert_bias)
            self.expert_bias.add_(step)
        stats = {"load": [round(float(v), 4) for v in load],
                 "dropped": self._dropped / self._assigned,
                 "entropy": self._entropy / self._tokens / math.log(self.E)}
        self._reset_stats()
        return stats

    @staticmethod
    def summarize(stats: list[dict]) -> dict:
        """One metrics record's view of every MoE layer's ``end_step`` statistics."""
        loads = [s["load"] for s in stats]
        return {"moe_load_min": min(min(v) for v in loads),
                "moe_load_max": max(max(v) for v in loads),
                "moe_dropped": sum(s["dropped"] for s in stats) / len(stats),
                "moe_entropy": sum(s["entropy"] for s in stats) / len(stats), "moe_load": loads}

    # -------------------------------------------------------------------------- accounting

    def idle_params(self) -> int:
        """Weights of the routed experts a token does not use: (E - k) of E experts."""
        per_expert = sum(p.numel() for p in self.experts[0].parameters())
        return (self.E - self.k) * per_expert


def _data_parallel() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def ranks_sum(t: torch.Tensor, grad: bool = False) -> torch.Tensor:
    """``t`` summed over the data-parallel ranks of keenlm.train.distributed (``t`` itself in
    one process): the routing statistics of a step are the whole batch's. ``grad``: the sum
    passes gradients back to every rank's part."""
    if not _data_parallel():
        return t
    group = _stats_group()
    if grad:
        return dist_nn.all_reduce(t, group=group)
    t = t.clone()
    dist.all_reduce(t, group=group)
    return t


_GROUP: dict = {}


def _stats_group():
    """A process group of its own for the routing statistics: their all-reduce runs inside the
    backward pass, where the order against DDP's or FSDP's gradient collectives differs from
    rank to rank (each rank's experts see different tokens); one group per kind keeps each
    group's order the same everywhere. Created by every rank at its first use, together."""
    world = dist.group.WORLD
    if world not in _GROUP:
        _GROUP[world] = dist.new_group()
    return _GROUP[world]


def moe_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, masked by the combine weights: the plain loop the sparse
    forward must equal (same routing, same capacity, same dropping)."""
    h = x.reshape(-1, x.shape[-1])
    _, _, idx, w = moe.route(h)
    token, order, kept, _ = moe.assignments(idx)
    keep = torch.zeros(idx.numel(), dtype=torch.bool, device=x.device)
    keep[order[kept]] = True
    combine = torch.zeros(h.shape[0], moe.E, device=x.device)  # (N, E): weight, 0 if not routed
    combine.scatter_add_(1, idx, w * keep.view_as(w))
    out = torch.zeros_like(h)
    for e, expert in enumerate(moe.experts):
        out = out + combine[:, e:e + 1].to(h.dtype) * expert(h)
    for s in moe.shared_experts:
        out = out + s(h)
    return out.reshape(x.shape)




@torch.no_grad()
def upcycle(net, moe_cfg, noise: float = 0.01, seed: int = 0) -> None:
    """Turn a trained dense model into an MoE in place (sparse upcycling): every expert of a
    layer starts as a copy of that layer's SwiGLU plus Gaussian noise of ``noise`` times the
    weight's std (identical experts would get identical gradients and never differ), the
    router starts small and random. Experts keep the dense width (``moe_cfg.d_ff`` is set to
    it). With k >= 2 the chosen weights sum to 1, so the upcycled model starts as the dense
    one (up to the noise). ``net.cfg`` becomes the MoE config."""
    cfg = dataclasses.replace(net.cfg, ffn="moe", moe=dataclasses.replace(moe_cfg, d_ff=net.cfg.d_ff))
    if any(not isinstance(layer.mlp, SwiGLU) for layer in net.layers):
        raise ValueError("upcycling needs a dense model (model.ffn: dense)")
    if moe_cfg.shared or moe_cfg.top_k < 2:
        raise ValueError("upcycling needs model.moe.shared 0 and model.moe.top_k >= 2: then the k "
                         "chosen copies, with weights summing to 1, start as the dense layer")
    g = torch.Generator().manual_seed(seed)
    linear = lambda i, o: net.linear_factory(cfg)(i, o)  # noqa: E731
    for layer in net.layers:
        dense = layer.mlp
        ref = next(dense.parameters())
        moe = MoE(cfg, linear).to(device=ref.device, dtype=ref.dtype)
        nn.init.normal_(moe.gate.weight, 0.0, cfg.init_std, generator=g)
        for expert in list(moe.experts) + list(moe.shared_experts):
            for (name, p), q in zip(expert.named_parameters(), dense.parameters()):
                eps = torch.randn(q.shape, generator=g).to(q) * (noise * float(q.float().std()))
                p.copy_(q + eps)
        layer.mlp = moe
    net.cfg = cfg


class MoEUpcycle:
    """The trainer's converter for ``train.init_from`` a dense model with ``model.ffn: moe``:
    sparse upcycling (``upcycle``) before training starts (keenlm.train.converters)."""

    name = "moe-upcycle"

    def __init__(self, moe_cfg):
        self.moe_cfg = moe_cfg

    @classmethod
    def for_run(cls, cfg, start=None):
        if start is not None and cfg.model.ffn == "moe" and start.model.ffn == "dense":
            return cls(cfg.model.moe)
        return None

    def adopt(self, model, net, data, log):
        upcycle(net, self.moe_cfg)
        if log:
            log(f"upcycled to {self.moe_cfg.experts} experts (top-{self.moe_cfg.top_k}) of width "
                f"{model.d_ff}, copies of each layer's feed-forward")
        return dataclasses.replace(model, ffn="moe", moe=net.cfg.moe)

    def on_step(self, model, step, planned_steps):
        pass

    def begin_eval(self, model):
        pass

    def end_eval(self, model, seq_len) -> dict:
        return {}
