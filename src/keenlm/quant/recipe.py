"""``keenlm quantize MODEL --bits 1.58|2|3|4 --method rtn|gptq|qat``: packed low-bit models.

Any model keenlm loads (a run folder, a GGUF file, a Hugging Face folder) becomes a *quantized
model folder* (keenlm.quant.folder): every block projection in the packed format of
keenlm.quant.packing, the token embedding and an untied LM head stored as chosen (fp32, fp16 or
int8 rows), the rest (norms) fp32. ``keenlm.load(OUT)`` (and so ``keenlm generate|eval|chat
OUT``) runs it on the packed fast paths; ``keenlm info OUT`` reports its bytes against the same
model in fp32. Methods:

- ``rtn``: round to nearest on a fitted grid (keenlm.quant.ptq);
- ``gptq``: GPTQ calibrated on stdlib text (the run's own training split for keenlm runs);
- ``qat``: quantization-aware fine-tuning (keenlm.quant.qat, through the Trainer with the
  model as its starting point), then ``convert_qat``: ternary and 2-bit with one learned scale
  per row, 4-bit symmetric groups.
"""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from keenlm.api import load
from keenlm.config import (CheckpointConfig, DataConfig, EvalConfig, OptimConfig, RunConfig,
                           ScheduleConfig, TrainConfig)
from keenlm.data import get_batch, load_corpus, tokenize_corpus
from keenlm.model.lora import lora_layers, merge_lora
from keenlm.quant import ptq
from keenlm.quant.config import QuantConfig
# re-exported beside quantize(): keenlm quantize's whole surface in one module
from keenlm.quant.folder import FORMAT, load_quantized, model_bytes, save_quantized  # noqa: F401
from keenlm.quant.int8 import Int8Embedding, Int8Linear, quantize_rows_int8
from keenlm.quant.packing import PackedLinear, convert_qat
from keenlm.runs import default_cache_dir
from keenlm.train import Trainer


def _calibration(km, q: QuantConfig, log) -> torch.Tensor:
    """(calib_seqs, calib_len) token windows from the training split of the model's corpus
    (a keenlm run's own data; stdlib for imported models), at most its first 4 MB (64 x 256
    tokens need far less; a whole corpus would be tokenized for nothing), drawn with ``q.seed``."""
    data_cfg = km.config.data if km.run_dir is not None else DataConfig()
    if not data_cfg.max_bytes or data_cfg.max_bytes > 4_000_000:
        data_cfg = dataclasses.replace(data_cfg, max_bytes=4_000_000)
    data = tokenize_corpus(load_corpus(data_cfg), km.tokenizer, default_cache_dir(data_cfg.cache_dir),
                           log=log)
    T = min(q.calib_len, km.config.model.max_seq_len)
    x, _ = get_batch(data.train, q.calib_seqs, T, q.seed, 0)
    return x


def _qat(km, q: QuantConfig, group: int, run_dir: Path, log) -> None:
    """Quantization-aware fine-tuning of km.net in place, through the Trainer."""
    m = km.config.model
    group = group or m.d_model
    lowbit = dataclasses.replace(m.lowbit, group=group if q.kind == "int4" else m.lowbit.group,
                                 per_channel=True)
    model = dataclasses.replace(m, linear=q.kind, lowbit=lowbit)
    data = km.config.data if km.run_dir is not None else DataConfig(max_bytes=4_000_000)
    train = TrainConfig(steps=q.qat_steps, batch_size=q.qat_batch, seq_len=min(256, m.max_seq_len),
                        optim=OptimConfig(lr=q.qat_lr, weight_decay=0.0),
                        schedule=ScheduleConfig(kind="cosine",
                                                warmup_steps=max(1, q.qat_steps // 20)),
                        eval=EvalConfig(every=0), checkpoint=CheckpointConfig(resume=False),
                        out_dir=str(run_dir), seed=q.seed + 1, progress=log is not None)
    tr = Trainer(RunConfig(model=model, data=data, train=train), init=km)
    res = tr.fit()
    if log:
        log(f"qat: {res.step} steps, val loss {res.final_eval['loss']:.4f}; run folder {run_dir}")
    km.net.eval()


@torch.no_grad()
def store_tables(net, q: QuantConfig) -> None:
    """The embedding (and an untied head) as ``q.embed`` / ``q.head`` say."""
    tied = net.lm_head.weight is net.embed_tokens.weight
    if q.embed == "int8":
        w8, s = quantize_rows_int8(net.embed_tokens.weight)
        net.embed_tokens = Int8Embedding(w8, s)
        if tied:  # the head reads the same int8 rows
            net.lm_head = Int8Linear(weight_int8=w8, scale=s)
    elif q.embed == "fp16":
        net.embed_tokens.weight.copy_(net.embed_tokens.weight.half().float())
    if not tied:
        if q.head == "int8":
            net.lm_head = Int8Linear(net.lm_head.weight)
        elif q.head == "fp16":
            net.lm_head.weight.copy_(net.lm_head.weight.half().float())


def _fit_group(net, q: QuantConfig, log) -> int:
    """The group size: as given; by default 64, halved until it divides every projection's
    input width (a SwiGLU width of 352 takes groups of 32), and said so."""
    group = q.group_size
    if q.group != -1 or group == 0:
        return group
    widths = {m.in_features for name, m in net.named_modules()
              if type(m) is nn.Linear and not name.endswith("lm_head")}
    while group > 8 and any(w % group for w in widths):
        group //= 2
    if group != q.group_size and log:
        log(f"quantize: groups of {q.group_size} do not divide every layer width "
            f"{sorted(widths)}; using groups of {group}")
    return group


def quantize(model, q: QuantConfig, *, log: Callable[[str], None] | None = print,
             qat_dir: str | Path | None = None):
    """Quantize ``model`` (a path or a keenlm.load result) in place; returns the KeenModel with
    ``.quant`` (what quant.json records)."""
    km = load(model) if isinstance(model, (str, Path)) else model
    if any(isinstance(m, PackedLinear) for m in km.net.modules()):
        raise ValueError("the model is already quantized")
    if lora_layers(km.net):  # one set of weights to round: the adapters folded in first
        if log:
            log("merging the LoRA adapters into the weights before quantizing")
        merge_lora(km.net)
        km.config = dataclasses.replace(km.config, model=km.net.cfg)
    group = _fit_group(km.net, q, log)
    km.net.eval()
    if q.method == "rtn":
        ptq.quantize_rtn(km.net, q.kind, group)
    elif q.method == "gptq":
        calib = _calibration(km, q, log)
        if log:
            log(f"gptq: {calib.shape[0]} x {calib.shape[1]} calibration tokens")
        ptq.quantize_gptq(km.net, q.kind, group, calib, log=log)
    else:
        run_dir = Path(qat_dir) if qat_dir else Path(tempfile.mkdtemp(prefix="keenlm-qat-"))
        _qat(km, q, group, run_dir, log)
        convert_qat(km.net)
    store_tables(km.net, q)
    layers = {name: {"bits": m.bits, "group": m.group, "in_features": m.in_features,
                     "act_bits": m.act_bits}
              for name, m in km.net.named_modules() if isinstance(m, PackedLinear)}
    km.quant = {"format": FORMAT, "bits": q.bits, "method": q.method, "group": group,
                "embed": q.embed, "head": q.head, "tied": km.config.model.tie_embeddings,
                "config": dataclasses.asdict(q), "layers": layers}
    return km
