"""Low-bit weights' configs: ``model.lowbit.*`` (how quantization-aware linears quantize, nested
in the model config) and ``QuantConfig`` (``keenlm quantize``). A leaf module: the run config
nests it."""
from __future__ import annotations

from dataclasses import dataclass

from keenlm.config.base import check


@dataclass(frozen=True)
class LowBitConfig:
    """How the low-bit linears of ``model.linear: ternary | int2 | int4`` quantize
    (keenlm.quant.qat)."""

    group: int = 32  # int4: weights per scale group along the input dimension
    per_channel: bool = False  # ternary: one absmean scale per output row, not per tensor
    act_bits: int = 0  # 0: full-precision activations; 8: per-token absmax int8 (W1.58A8)

    def __post_init__(self):
        p = "model.lowbit."
        check(self.group >= 1, p + "group", self.group, "an integer >= 1")
        check(self.act_bits in (0, 8), p + "act_bits", self.act_bits, "0 | 8")


QUANT_BITS = ("1.58", "2", "3", "4")
QUANT_METHODS = ("rtn", "gptq", "qat")
STORE_KINDS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class QuantConfig:
    """``keenlm quantize``: how a model's weights become packed low-bit weights."""

    bits: str = "4"  # 1.58 (ternary) | 2 | 3 | 4 bits per weight of every block projection
    method: str = "gptq"  # rtn (round to nearest) | gptq (calibrated) | qat (quantization-aware fine-tuning)
    group: int = -1  # weights per (scale, offset) pair along the input; 0: one per row; -1: 64 for 2-4 bits, per row for ternary
    embed: str = "int8"  # storage of the token embedding: fp32 | fp16 | int8 (per-row absmax)
    head: str = "int8"  # storage of an untied LM head: fp32 | fp16 | int8
    calib_seqs: int = 64  # gptq: calibration sequences of stdlib text (training split)
    calib_len: int = 256  # gptq: tokens per calibration sequence
    qat_steps: int = 200  # qat: fine-tuning steps
    qat_lr: float = 1e-4  # qat: peak learning rate
    qat_batch: int = 8  # qat: sequences per step
    seed: int = 0  # calibration sample

    def __post_init__(self):
        p = "quant."
        check(self.bits in QUANT_BITS, p + "bits", self.bits, " | ".join(QUANT_BITS))
        check(self.method in QUANT_METHODS, p + "method", self.method, " | ".join(QUANT_METHODS))
        check(self.group >= -1, p + "group", self.group, "-1 (default), 0 (per row) or a group size")
        for name in ("embed", "head"):
            v = getattr(self, name)
            check(v in STORE_KINDS, p + name, v, " | ".join(STORE_KINDS))
        for name in ("calib_seqs", "calib_len", "qat_steps", "qat_batch"):
            v = getattr(self, name)
            check(v >= 1, p + name, v, "an integer >= 1")
        check(self.qat_lr > 0, p + "qat_lr", self.qat_lr, "a number > 0")
        check(not (self.method == "qat" and self.bits == "3"), p + "bits", self.bits,
              "1.58 | 2 | 4 with method qat (there is no 3-bit quantization-aware linear)")

    @property
    def kind(self) -> str:
        return {"1.58": "ternary", "2": "int2", "3": "int3", "4": "int4"}[self.bits]

    @property
    def group_size(self) -> int:
        if self.group >= 0:
            return self.group
        return 0 if self.bits == "1.58" else 64


