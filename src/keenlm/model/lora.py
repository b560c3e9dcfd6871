"""LoRA: low-rank adapters on frozen linear layers, and QLoRA on a packed low-bit base.

LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685): a frozen weight W gets a trainable
low-rank update, y = x W^T + s * (dropout(x) A^T) B^T with A (r, in), B (out, r) and
s = alpha / r. A starts as Kaiming-uniform noise and B at zero (as in the paper and in peft),
so the adapted model starts equal to its base. Only A and B train: the optimizer holds
2 x r x (in + out) numbers per layer instead of 2 x in x out.

QLoRA (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314): the frozen base stays in its
packed low-bit form (keenlm's ``PackedLinear``: int4 GPTQ/RTN, 2-bit, ternary; or, with
``model.lora.base = "q4"``, ``Q4Linear``: llama.cpp's Q4_1 blocks of 32, not the paper's NF4),
dequantized layer by layer in the forward pass; gradients reach the adapters through it. A
model read from a Q4_1 GGUF file holds weights that round back to the file's own codes, so
its "q4" base is the file's 4-bit weights exactly: the adapters learn against the weights that
will be served, and the served model is that base plus the adapters (``keenlm.load(RUN,
quant="q4")``). Folding the adapters into the weights and rounding again to 4 bits is another
matter: a fine-tune's change per weight is usually far below one 4-bit step, and rounding
returns the base (docs/real-model.md measures it).

The wrapper works on any linear module of the registry (dense ``nn.Linear``, quantization-aware
``QATLinear``, ``PackedLinear``, ``Int4Linear``), and is applied by name: ``targets`` are the
last components of module names (``q_proj``, ``down_proj``), named as in Hugging Face's Llama,
so adapters move to and from ``peft`` without renaming (keenlm.io.peft). The base sits under
``base_layer`` as in peft.

``LoRALinear.reference`` computes the same output with the merged weight W + s B A: the plain
formula the adapter path is tested against; ``merge_lora(net)`` replaces every wrapper by a
dense ``nn.Linear`` holding that weight (a packed base is dequantized first).
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from keenlm.quant.int4 import Int4Linear
from keenlm.quant.packing import PackedLinear
from keenlm.quant.q4 import BLOCK, Q4Linear
from keenlm.quant.qat import QATLinear


LINEAR_KINDS = (nn.Linear, PackedLinear, Int4Linear, Q4Linear)  # QATLinear is an nn.Linear


def base_weight(base: nn.Module) -> torch.Tensor:
    """The (out, in) weight a linear module applies, in full precision, detached."""
    if isinstance(base, QATLinear):
        return base.quantized_weight().detach()
    if isinstance(base, PackedLinear):
        return base.weight()
    if isinstance(base, (Int4Linear, Q4Linear)):
        return base.dequantized()
    if isinstance(base, nn.Linear):
        if base.bias is not None:
            raise ValueError("LoRA: linear layers with a bias are not supported (Llama has none)")
        return base.weight.detach()
    raise TypeError(f"LoRA: cannot read the weight of a {type(base).__name__}")


class LoRALinear(nn.Module):
    """base(x) + s * B(A(dropout(x))), the base frozen."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank {rank}: an integer >= 1")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.base_layer = base.requires_grad_(False)
        device = next(iter(base.state_dict().values())).device
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device)
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # peft's and the paper's
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        y = self.base_layer(x)
        a = self.lora_A(self.dropout(x).to(self.lora_A.weight.dtype))
        return y + (self.lora_B(a) * self.scaling).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        return base_weight(self.base_layer).float() + self.delta_weight().detach().float()

    def reference(self, x):
        """The same output from the merged weight W + s B A (no dropout)."""
        return F.linear(x, self.merged_weight().to(x.dtype))

    def extra_repr(self):
        return f"rank={self.rank}, alpha={self.alpha}"


def lora_layers(net: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in net.named_modules() if isinstance(m, LoRALinear)}


def quantize_bases(net: nn.Module) -> None:
    """Every adapter's dense base (``nn.Linear``) into Q4_1 blocks (``Q4Linear``): the QLoRA
    base of ``model.lora.base = "q4"``. In place; the adapters stay as they are."""
    for name, m in lora_layers(net).items():
        if type(m.base_layer) is nn.Linear:
            if m.in_features % BLOCK:
                raise ValueError(f"LoRA base q4: {name} has input width {m.in_features}, not a "
                                 f"multiple of the Q4 block of {BLOCK}")
            m.base_layer = Q4Linear.from_float(m.base_layer.weight)


def apply_lora(net: nn.Module, rank: int, alpha: float, dropout: float,
               targets: tuple[str, ...], base: str = "model") -> list[str]:
    """Wrap every linear module whose name ends in one of ``targets``; freeze everything else
    in ``net``; with ``base="q4"`` hold the wrapped dense weights in Q4_1 blocks. In place;
    returns the wrapped modules' names."""
    if lora_layers(net):
        raise ValueError("this model already has LoRA adapters")
    wrapped = []
    for parent_name, parent in list(net.named_modules()):
        for name, child in list(parent.named_children()):
            if name in targets and not isinstance(child, LoRALinear):
                if not isinstance(child, LINEAR_KINDS):
                    raise TypeError(f"LoRA target {parent_name}.{name} is a "
                                    f"{type(child).__name__}, not a linear layer")
                setattr(parent, name, LoRALinear(child, rank, alpha, dropout))
                wrapped.append(f"{parent_name}.{name}" if parent_name else name)
    if not wrapped:
        raise ValueError(f"LoRA targets {list(targets)} name no linear layer of this model")
    if base == "q4":
        quantize_bases(net)
    elif base != "model":
        raise ValueError(f"LoRA base {base!r}: model | q4")
    for pname, p in net.named_parameters():
        p.requires_grad_(".lora_A." in pname or ".lora_B." in pname)
    return wrapped


def add_adapters(net: nn.Module, lora) -> list[str]:
    """``apply_lora`` with a LoRAConfig, recorded in ``net.cfg`` (a keenlm Transformer)."""
    names = apply_lora(net, lora.rank, lora.scale_alpha, lora.dropout, lora.targets, lora.base)
    net.cfg = dataclasses.replace(net.cfg, lora=lora)
    return names


def merge_lora(net: nn.Module) -> nn.Module:
    """Every LoRALinear replaced by a dense nn.Linear holding W + s B A (fp32), everything
    trainable again, ``net.cfg.lora`` cleared (a keenlm Transformer). In place."""
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                dense = nn.Linear(child.in_features, child.out_features, bias=False,
                                  device=child.lora_A.weight.device)
                with torch.no_grad():
                    dense.weight.copy_(child.merged_weight())
                setattr(parent, name, dense)
    for p in net.parameters():
        p.requires_grad_(True)
    if hasattr(net, "cfg"):
        net.cfg = dataclasses.replace(net.cfg, lora=type(net.cfg.lora)())
    return net


def trainable_parameters(net: nn.Module) -> int:
    """Distinct parameters that train (tied ones counted once)."""
    return sum(p.numel() for p in {id(p): p for p in net.parameters() if p.requires_grad}.values())


class LoRAConversion:
    """The trainer's converter for adapters (keenlm.train.converters): starting from a loaded
    model (``train.init_from``) with ``model.lora.rank`` > 0, its linears get adapters and the
    rest freezes. A model built from scratch with adapters gets them from ``build_model``."""

    name = "lora"

    def __init__(self, cfg):
        self.lora = cfg.model.lora

    @classmethod
    def for_run(cls, cfg, start=None):
        return cls(cfg) if start is not None and cfg.model.lora.rank else None

    def adopt(self, model, net, data, log):
        if model.lora.rank:
            raise ValueError("the starting model already has LoRA adapters: merge them first "
                             "(keenlm convert --merge-lora) or train them on (keenlm train with "
                             "the run folder as out_dir)")
        c = self.lora
        names = add_adapters(net, c)
        if log:
            log(f"LoRA rank {c.rank} on {len(names)} layers: {trainable_parameters(net):,} "
                f"trainable parameters")
        return dataclasses.replace(model, lora=c)

    def on_step(self, model, step, planned_steps):
        pass

    def begin_eval(self, model):
        pass

    def end_eval(self, model, seq_len) -> dict:
        return {}
