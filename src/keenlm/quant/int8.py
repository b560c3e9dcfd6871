"""Int8 weight-only inference: a quarter of the weight bytes for memory-bound CPU decoding.

Decoding one token reads every weight once; at batch 1 a CPU multiplies faster than it can
fetch fp32 weights (SmolLM2-135M: 540 MB per token against ~15 GB/s), so bytes, not FLOPs, set
the speed. Each weight row is stored as int8 with one scale per output channel (absmax /127,
round to nearest -- the weight-only scheme of LLM.int8()/torchao's int8_weight_only, without
outlier handling), and multiplied by PyTorch's fused int8-weight kernel
``torch._weight_int8pack_mm`` with bf16 activations (the kernel's fast CPU path). The
residual stream, norms, softmax and sampling stay fp32.

``Int8Linear.reference`` dequantizes and calls ``F.linear`` in fp32: the readable definition
the kernel is tested against. ``quantize_int8(net)`` is a converter: it swaps every
``nn.Linear`` (the LM head too, untied from the fp32 embedding table) in place.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


PREFILL_ROWS = 16  # from this many rows on, dequantize to bf16 and use a GEMM


def _has_kernel() -> bool:
    try:
        w = torch.zeros(4, 32, dtype=torch.int8)
        torch._weight_int8pack_mm(torch.zeros(1, 32, dtype=torch.bfloat16), w,
                                  torch.ones(4, dtype=torch.bfloat16))
        return True
    except (RuntimeError, AttributeError):
        return False


def quantize_rows_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax int8: (int8 rows, fp32 scale per row), w ~ q * scale."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


class Int8Embedding(nn.Module):
    """A token embedding stored as int8 rows with one scale each (a quarter of fp32's bytes);
    looked-up rows are dequantized to fp32."""

    def __init__(self, weight_int8: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        if weight_int8.dtype != torch.int8 or scale.shape != (weight_int8.shape[0],):
            raise ValueError("Int8Embedding needs int8 rows with one scale per row")
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scale", scale.float())
        self.num_embeddings, self.embedding_dim = weight_int8.shape

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.weight_int8[idx].float() * self.scale[idx].unsqueeze(-1)


class Int8Linear(nn.Module):
    """y = x (s * W_int8)^T with one scale per output row."""

    def __init__(self, weight: torch.Tensor | None = None, *, weight_int8: torch.Tensor | None = None,
                 scale: torch.Tensor | None = None):
        super().__init__()
        if weight is not None:
            weight_int8, scale = quantize_rows_int8(weight)
        if weight_int8 is None or scale is None or weight_int8.dtype != torch.int8 \
                or scale.shape != (weight_int8.shape[0],):
            raise ValueError("Int8Linear needs a float weight, or int8 rows with one scale per row")
        if weight_int8.data_ptr() % 64:  # the kernel reads aligned rows (a tensor sliced out
            weight_int8 = weight_int8.clone()  # of a safetensors file need not be): own copy
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scale", scale.float())
        self.register_buffer("scale_bf16", self.scale.to(torch.bfloat16), persistent=False)
        self.in_features, self.out_features = weight_int8.shape[1], weight_int8.shape[0]
        self.use_kernel = _has_kernel()

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight_int8.float() * self.scale[:, None]).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.use_kernel or x.device.type != "cpu":
            return self.reference(x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        if x2.shape[0] >= PREFILL_ROWS:
            # many rows (prefill): compute-bound, so widen the weights to bf16 once per call and
            # use the bf16 GEMM (~2.5x the fp32 rate on CPUs with AVX512-BF16/AMX)
            y = F.linear(x2, self.weight_int8.to(torch.bfloat16) * self.scale_bf16[:, None])
        else:  # few rows (decode): memory-bound, read int8 straight into the kernel
            y = torch._weight_int8pack_mm(x2, self.weight_int8, self.scale_bf16)
        return y.to(x.dtype).view(*shape[:-1], self.out_features)


class FusedSlice(nn.Module):
    """Stands in for a projection that now lives inside a fused one: computes its slice of the
    fused output (only for callers that use the projection alone; the model calls the fused)."""

    def __init__(self, fused: nn.Module, start: int, end: int):
        super().__init__()
        self._fused = [fused]  # a list, so the fused weights are not registered twice
        self.start, self.end = start, end

    def forward(self, x):
        return self._fused[0](x)[..., self.start:self.end]


def _fuse(parent: nn.Module, names: list[str], attr: str, make) -> None:
    """Quantize the projections ``names`` of ``parent`` as one module (``make(weight)``) set as
    ``attr``: one kernel call instead of several per decode step."""
    weights = [getattr(parent, n).weight for n in names]
    fused = make(torch.cat(weights))
    setattr(parent, attr, fused)
    start = 0
    for n, w in zip(names, weights):
        setattr(parent, n, FusedSlice(fused, start, start + w.shape[0]))
        start += w.shape[0]


def _fuse_slots(net: nn.Module, make) -> None:
    """Fill every ``qkv_proj`` / ``gate_up_proj`` slot (keenlm's attention and SwiGLU)."""
    for m in list(net.modules()):
        plain = lambda n: type(getattr(m, n, None)) is nn.Linear  # noqa: E731
        if hasattr(m, "qkv_proj") and all(plain(n) for n in ("q_proj", "k_proj", "v_proj")):
            _fuse(m, ["q_proj", "k_proj", "v_proj"], "qkv_proj", make)
        if hasattr(m, "gate_up_proj") and all(plain(n) for n in ("gate_proj", "up_proj")):
            _fuse(m, ["gate_proj", "up_proj"], "gate_up_proj", make)


def quantize_int8(net: nn.Module) -> nn.Module:
    """Replace every nn.Linear of ``net`` by an Int8Linear, in place; returns ``net``.
    q/k/v and gate/up are fused into one quantized projection each."""
    if not _has_kernel():
        print("keenlm: torch._weight_int8pack_mm is unavailable here; int8 layers use the "
              "dequantizing reference (correct, not faster)")
    _fuse_slots(net, Int8Linear)
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.bias is None:
                setattr(parent, name, Int8Linear(child.weight))
    return net
