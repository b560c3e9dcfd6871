"""4-bit (and 8-bit) weights times int8 activations with integer dot products: the batch-1
decode kernels.

llama.cpp's recipe for CPU decoding (Q4_0 / Q4_1 weights, Q8 activations): each block of 32
weights of a row keeps 16 levels, w = d q + m with q in [0, 15] (Q4_1; Q4_0 is m = -8 d), and
each block of 32 activations is rounded to int8 with its own scale xd = max|x| / 127 when it is
used (weight scales d, m in fp16, as GGUF stores them; activation scales in fp32). A block's
product is then one integer dot product,

    sum_i w_i x_i  ~  d xd sum_i q_i xq_i  +  m xd sum_i xq_i,

which AVX-512 VNNI computes 32 pairs at a time (``vpdpbusd``: unsigned 4-bit codes times signed
int8) and AVX2 in two steps (``vpmaddubsw`` + ``vpmaddwd``). The weights are read at 5 bits
each (16 bytes of codes + two fp16 scales per block, llama.cpp's Q4_1) instead of 32.

    Q4Linear.forward      the C kernel (keenlm/quant/csrc/qdot.c) for up to 16 rows
                          (decode, small batches); more rows (prefill): ``prefill``, the
                          weights dequantized to bf16 in C and one bf16 GEMM (fp32 where the
                          CPU lacks bf16, or with BF16_PREFILL = False)
    Q4Linear.reference    dequantize, then F.linear: the definition of the layer
    q4_matmul_reference   the kernel's own arithmetic in torch (int8 activations included):
                          what the C paths must reproduce to float rounding

The activation rounding changes results slightly against ``reference`` (the tests bound it);
the kernel paths (scalar, AVX2, VNNI) agree with ``q4_matmul_reference`` to float rounding.
A kernel call takes up to 4 weight rows x 4 activation rows per tile (512-bit VNNI), so that a
batch of rows reads each weight once per 4 rows.

These layers run in PyTorch models; keenlm.infer.engine runs a q4 model's whole decode step in
C on the same kernels (what ``generate`` uses where it can). Without the engine, while decoding,
``decode_threads`` gives the kernels the threads and torch one. benchmarks/decode.py has the
figures; benchmarks/q4_kernel.py times the kernels alone against PyTorch's int4 kernel.

The embedding and the LM head use the Q8_0 form (``Q8Linear``, ``Q8Embedding``): int8 blocks of
32 with one scale each, multiplied by the same int8 activations.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from keenlm.quant.int8 import _fuse_slots

try:  # the compiled kernels: built by pip at install (setup.py); optional without a compiler
    from keenlm.quant import _qdot
except ImportError:  # pragma: no cover - the install builds it wherever gcc or clang exists
    _qdot = None

BLOCK = 32
LORA_ADAPTERS = ("lora_A", "lora_B")  # the names of keenlm.model.lora's adapter layers
MAX_ROWS = 16  # rows (batch x positions) the kernel takes per call; more: the GEMM path
# The kernel's threads. 1 by default: its pool spins between calls, and beside torch's own
# OpenMP threads on a 2-core CPU the two pools starve each other (SmolLM2 decoding fell from 56
# to 4-27 tok/s); more threads pay when torch runs on one thread (a decode step of keenlm's own).
THREADS = 1
PATHS = {"auto": 0, "scalar": 1, "avx2": 2, "vnni": 3, "vnni512": 4}
_said = set()


def _say_no_kernel() -> None:
    if "kernel" not in _said:
        _said.add("kernel")
        print("keenlm: the Q4 kernel is not built here (no C compiler at install); 4-bit layers "
              "use the dequantizing reference (correct, not faster)")


def available_paths() -> list[str]:
    """The kernel paths this CPU runs, best last ([] without the compiled module)."""
    if _qdot is None:
        return []
    best = _qdot.best_path()
    return [name for name, code in PATHS.items() if 0 < code <= best]


def quantize_q4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(qs uint8 (N, K/2), d (N, K/32), m (N, K/32)) of a float weight (N, K): each block of 32
    rounded to 16 levels between its min and max (Q4_1), codes packed in ggml's order; d and m
    in fp16 as GGUF stores them (the codes are rounded against the fp16 values)."""
    w = weight.detach().float()
    n, k = w.shape
    if k % BLOCK:
        raise ValueError(f"q4: input width {k} is not a multiple of {BLOCK}")
    g = w.view(n, k // BLOCK, BLOCK)
    lo = g.amin(-1).half().float()
    d = ((g.amax(-1) - lo) / 15).half().float()
    q = torch.round((g - lo[..., None]) / d.clamp_min(1e-30)[..., None]).clamp(0, 15).to(torch.uint8)
    qs = (q[..., :16] | (q[..., 16:] << 4)).reshape(n, k // 2)
    return qs.contiguous(), d.half().contiguous(), lo.half().contiguous()


def unpack_q4(qs: torch.Tensor) -> torch.Tensor:
    """Codes (N, K) in [0, 15] from the packed (N, K/2) layout."""
    n, half = qs.shape
    b = qs.view(n, half // 16, 16)
    return torch.cat([b & 15, b >> 4], dim=-1).view(n, half * 2)


def dequantize_q4(qs, d, m) -> torch.Tensor:
    n = qs.shape[0]
    q = unpack_q4(qs).float().view(n, -1, BLOCK)
    return (q * d.float()[..., None] + m.float()[..., None]).view(n, -1)


def quantize_activations(x: torch.Tensor):
    """(xq int8, xd, xs) of float rows x (B, K): blocks of 32 rounded to int8 by max|x| / 127;
    xs = xd * sum(xq). Round half to even, as the kernel's lrintf."""
    B, K = x.shape
    g = x.float().view(B, K // BLOCK, BLOCK)
    xd = g.abs().amax(-1) / 127
    xq = torch.round(g / torch.where(xd > 0, xd, torch.ones_like(xd))[..., None]).to(torch.int8)
    return xq.view(B, K), xd, xd * xq.float().sum(-1)


def q4_matmul_reference(x: torch.Tensor, qs, d, m) -> torch.Tensor:
    """The kernel's arithmetic in torch (float64 sums): y = sum over blocks of
    d xd (q . xq) + m xs."""
    xq, xd, xs = quantize_activations(x)
    B, K = x.shape
    q = unpack_q4(qs).double().view(qs.shape[0], K // BLOCK, BLOCK)
    dots = torch.einsum("njk,bjk->bnj", q, xq.double().view(B, K // BLOCK, BLOCK))
    return ((dots * d.double()[None] * xd.double()[:, None]).sum(-1)
            + (m.double()[None] * xs.double()[:, None]).sum(-1)).float()


def q4_matmul(x: torch.Tensor, qs, d, m, path: str = "auto", threads: int = 0) -> torch.Tensor:
    """out (B, N) = x (B, K) @ W^T by the compiled kernel, B <= 16; ``threads`` 0: ``THREADS``."""
    if _qdot is None:
        raise RuntimeError("keenlm.quant._qdot is not built (no C compiler at install)")
    x = x.float().contiguous()
    B, K = x.shape
    # the kernel reads raw memory: every shape and type is checked here, never assumed
    qs, d, m = qs.contiguous(), d.half().contiguous(), m.half().contiguous()
    n = qs.shape[0]
    if qs.dtype != torch.uint8 or qs.shape != (n, K // 2) or K % BLOCK \
            or d.shape != (n, K // BLOCK) or m.shape != d.shape or x.device.type != "cpu":
        raise ValueError(f"q4_matmul: x {tuple(x.shape)} against codes {tuple(qs.shape)} "
                         f"{qs.dtype}, scales {tuple(d.shape)}, offsets {tuple(m.shape)}")
    out = torch.empty(B, n, dtype=torch.float32)
    _qdot.q4_linear(x.data_ptr(), qs.data_ptr(), d.data_ptr(), m.data_ptr(), out.data_ptr(),
                    qs.shape[0], K, B, PATHS[path], threads or THREADS)
    return out


def bf16_gemm_pays() -> bool:
    """Whether prefill uses the bf16 GEMM: ``BF16_PREFILL`` when set, else whether this CPU
    multiplies bf16 natively (AVX-512 BF16 or AMX, as oneDNN reports; a bf16 GEMM then runs
    ~2.4x fp32's here at 256 x 576 x 3072; elsewhere it is emulated)."""
    global BF16_PREFILL
    if BF16_PREFILL is None:
        BF16_PREFILL = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return BF16_PREFILL


BF16_PREFILL = None  # None: where the CPU has bf16; False: the fp32 reference GEMM (exact)


def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
    """The forward of Q4Linear and Q8Linear on the CPU without autograd: the kernel for up to
    MAX_ROWS rows (decoding), ``prefill`` for more; the reference (dequantize to fp32, then
    one GEMM) elsewhere."""
    rows = x.numel() // x.shape[-1]
    if _qdot is None or x.device.type != "cpu" or torch.is_grad_enabled():
        if _qdot is None:
            _say_no_kernel()
        return self.reference(x)
    if rows > MAX_ROWS:
        return self.prefill(x)
    return self.kernel(x.reshape(rows, -1)).view(*x.shape[:-1], self.out_features).to(x.dtype)


def _prefill(self, x: torch.Tensor) -> torch.Tensor:
    """Many rows (a prompt): the weights dequantized to bf16 by the C pass, then one bf16 GEMM
    with fp32 accumulation, where the CPU has native bf16; the fp32 reference elsewhere.
    Activations and outputs are rounded to bf16: SmolLM2's perplexity on argparse.py moves from
    8.1084 to 8.1210 (+0.16%, 8 windows of 512 tokens) against the fp32 reference, and its
    prefill runs at 728 tok/s instead of 342 (2 threads here)."""
    if not bf16_gemm_pays():
        return self.reference(x)
    n, k = self.out_features, self.in_features
    w = torch.empty(n, k, dtype=torch.bfloat16)
    codes, d, m, kind = self.blocks()
    _qdot.dequantize_bf16(codes.data_ptr(), d.data_ptr(), 0 if m is None else m.data_ptr(),
                          w.data_ptr(), n, k, kind, torch.get_num_threads())
    return F.linear(x.to(torch.bfloat16), w).to(x.dtype)


class Q4Linear(nn.Module):
    """A bias-free linear layer with Q4 weights (see the module docstring)."""

    def __init__(self, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor):
        super().__init__()
        n, half = qs.shape
        if qs.dtype != torch.uint8 or d.shape != (n, 2 * half // BLOCK) or m.shape != d.shape:
            raise ValueError(f"q4: codes {tuple(qs.shape)} {qs.dtype}, scales {tuple(d.shape)}, "
                             f"offsets {tuple(m.shape)} do not describe one layer")
        self.register_buffer("qs", qs.contiguous())
        self.register_buffer("d", d.half().contiguous())  # fp16 block scales, as in GGUF
        self.register_buffer("m", m.half().contiguous())
        self.in_features, self.out_features = 2 * half, n
        self.path = "auto"  # the kernel path; tests and benchmarks force one of PATHS

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> "Q4Linear":
        return cls(*quantize_q4(weight))

    def dequantized(self) -> torch.Tensor:
        return dequantize_q4(self.qs, self.d, self.m)

    def blocks(self):
        """(codes, scales, offsets, format) for the bf16 prefill pass (format 0: Q4)."""
        return self.qs, self.d, self.m, 0

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized().to(x.dtype))

    def kernel(self, x2d: torch.Tensor) -> torch.Tensor:
        return q4_matmul(x2d, self.qs, self.d, self.m, self.path)

    forward, prefill = _kernel_forward, _prefill

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, q4 blocks of {BLOCK}"


# ------------------------------------------------------------------------------------- Q8_0
# The LM head and the embedding in llama.cpp's Q8_0 form: int8 codes in blocks of 32 with one
# scale each (w = d q). Per-block scales keep the head's rows as the file has them; a per-row
# int8 head cost SmolLM2 ~5% of its next-token argmax agreement with fp32.


def quantize_q8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (N, K), d fp16 (N, K/32)) with d = max|w| / 127 per block of 32."""
    w = weight.detach().float()
    n, k = w.shape
    if k % BLOCK:
        raise ValueError(f"q8: input width {k} is not a multiple of {BLOCK}")
    g = w.view(n, k // BLOCK, BLOCK)
    d = (g.abs().amax(-1) / 127).half().float()
    q = torch.round(g / torch.where(d > 0, d, torch.ones_like(d))[..., None]).clamp(-127, 127)
    return q.to(torch.int8).view(n, k).contiguous(), d.half().contiguous()


def dequantize_q8(q8: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    n, k = q8.shape
    return (q8.float().view(n, k // BLOCK, BLOCK) * d.float()[..., None]).view(n, k)


def q8_matmul_reference(x: torch.Tensor, q8, d) -> torch.Tensor:
    """The Q8 kernel's arithmetic in torch: sum over blocks of d xd (q . xq)."""
    xq, xd, _ = quantize_activations(x)
    B, K = x.shape
    dots = torch.einsum("njk,bjk->bnj", q8.double().view(q8.shape[0], K // BLOCK, BLOCK),
                        xq.double().view(B, K // BLOCK, BLOCK))
    return (dots * d.double()[None] * xd.double()[:, None]).sum(-1).float()


def q8_matmul(x: torch.Tensor, q8, d, path: str = "auto", threads: int = 0) -> torch.Tensor:
    """out (B, N) = x (B, K) @ W^T for Q8_0 weights by the compiled kernel, B <= 16;
    ``threads`` 0: ``THREADS``."""
    if _qdot is None:
        raise RuntimeError("keenlm.quant._qdot is not built (no C compiler at install)")
    x = x.float().contiguous()
    B, K = x.shape
    q8, d = q8.contiguous(), d.half().contiguous()
    n = q8.shape[0]
    if q8.dtype != torch.int8 or q8.shape != (n, K) or K % BLOCK or d.shape != (n, K // BLOCK):
        raise ValueError(f"q8_matmul: x {tuple(x.shape)} against codes {tuple(q8.shape)} "
                         f"{q8.dtype}, scales {tuple(d.shape)}")
    out = torch.empty(B, n, dtype=torch.float32)
    _qdot.q8_linear(x.data_ptr(), q8.data_ptr(), d.data_ptr(), out.data_ptr(), n, K, B,
                    PATHS[path], threads or THREADS)
    return out


class Q8Linear(nn.Module):
    """A bias-free linear layer with Q8_0 weights: the LM head of the q4 path."""

    def __init__(self, q8: torch.Tensor, d: torch.Tensor):
        super().__init__()
        if q8.dtype != torch.int8 or d.shape != (q8.shape[0], q8.shape[1] // BLOCK):
            raise ValueError(f"q8: codes {tuple(q8.shape)} {q8.dtype}, scales {tuple(d.shape)} "
                             "do not describe one layer")
        self.register_buffer("q8", q8.contiguous())
        self.register_buffer("d", d.half().contiguous())
        self.out_features, self.in_features = q8.shape
        self.path = "auto"

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> "Q8Linear":
        return cls(*quantize_q8(weight))

    def blocks(self):
        """(codes, scales, offsets, format) for the bf16 prefill pass (format 1: Q8_0)."""
        return self.q8, self.d, None, 1

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, dequantize_q8(self.q8, self.d).to(x.dtype))

    def kernel(self, x2d: torch.Tensor) -> torch.Tensor:
        return q8_matmul(x2d, self.q8, self.d, self.path)

    forward, prefill = _kernel_forward, _prefill


class Q8Embedding(nn.Module):
    """A token embedding in Q8_0 blocks (shared with a tied Q8Linear head): looked-up rows are
    dequantized to fp32."""

    def __init__(self, q8: torch.Tensor, d: torch.Tensor):
        super().__init__()
        self.register_buffer("q8", q8)
        self.register_buffer("d", d.half())
        self.num_embeddings, self.embedding_dim = q8.shape

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        q, d = self.q8[idx].float(), self.d[idx].float()
        return (q.view(*idx.shape, -1, BLOCK) * d[..., None]).view(*idx.shape, -1)


def quantize_q4_model(net: nn.Module) -> nn.Module:
    """Every block projection to Q4Linear (q/k/v and gate/up fused into one call each), the
    token embedding and the LM head to Q8_0 blocks (the most sensitive layer; GGUF files keep
    it at 8 bits too; a tied head shares the embedding's blocks). In place."""
    if _qdot is None:
        _say_no_kernel()
    _fuse_slots(net, Q4Linear.from_float)
    emb = getattr(net, "embed_tokens", None)
    if type(emb) is nn.Embedding and emb.embedding_dim % BLOCK == 0:
        q8, d = quantize_q8(emb.weight)
        tied = getattr(net, "lm_head", None) is not None and net.lm_head.weight is emb.weight
        net.embed_tokens = Q8Embedding(q8, d)
        if tied:
            net.lm_head = Q8Linear(q8, d)
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            # a LoRA wrapper's adapters (keenlm.model.lora) stay in full precision: its base
            # becomes Q4 blocks and the adapters add their small update on top
            if type(child) is nn.Linear and child.bias is None and name not in LORA_ADAPTERS:
                make = Q8Linear.from_float if name == "lm_head" else Q4Linear.from_float
                setattr(parent, name, make(child.weight))
    return net


@contextlib.contextmanager
def decode_threads(net: nn.Module):
    """While a model with Q4/Q8 layers decodes: torch on one thread, these kernels on torch's
    thread count. Two thread pools spinning on the same cores starve each other (SmolLM2 fell
    to 4 tok/s with both on two threads), and at batch 1 the kernels are the work worth
    threading: 66 tok/s this way against 52 with the kernels on one thread beside torch's two.
    Process-wide, like ``torch.set_num_threads``: one decoding thread at a time."""
    global THREADS
    n = torch.get_num_threads()
    if _qdot is None or n == 1 or not any(isinstance(m, (Q4Linear, Q8Linear))
                                          for m in net.modules()):
        yield
        return
    old = THREADS
    torch.set_num_threads(1)
    THREADS = n
    try:
        yield
    finally:
        torch.set_num_threads(n)
        THREADS = old
