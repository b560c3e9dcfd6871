"""How techniques reach the trainer without the trainer knowing them.

A **converter** changes the model being trained. It is a small object, built from the run's
config by a ``for_run(cfg, start)`` class method (``start``: the loaded model's RunConfig when
``train.init_from`` is used, else None; it returns None when it does not apply), with four
methods the trainer calls in list order:

    adopt(model_cfg, net, data, log) -> ModelConfig   starting from a loaded model: change
                                                      ``net`` in place, return its new config
    on_step(model, step, planned_steps)               before every optimizer step
    begin_eval(model)                                 before each evaluation
    end_eval(model, seq_len) -> dict                  extra results of that evaluation (also
                                                      kept in the run's ledger under their key)

A **hook** shapes the loss of a step (keenlm.train.trainer.TrainHook): selective backprop.

Each implementation lives with its technique; this table is the one place that names them.
The order matters: upcycling and spiking conversion see the dense model, quantization-aware
linears wrap the result, and adapters wrap those. (torchtitan's model converters are the model for this.)
"""
from __future__ import annotations

from typing import Protocol

from keenlm.model.lora import LoRAConversion
from keenlm.model.moe import MoEUpcycle
from keenlm.quant.qat import QATConversion
from keenlm.spiking.converter import SpikingConversion
from keenlm.train.surprise import build_hook


class ModelConverter(Protocol):
    name: str

    def adopt(self, model_cfg, net, data, log):
        ...

    def on_step(self, model, step: int, planned_steps: int) -> None:
        ...

    def begin_eval(self, model) -> None:
        ...

    def end_eval(self, model, seq_len: int) -> dict:
        ...


CONVERTERS = (MoEUpcycle, SpikingConversion, QATConversion, LoRAConversion)
HOOKS = (build_hook,)  # (cfg, tokenizer, amp, device) -> a TrainHook or None


def converters_for(cfg, start=None) -> list[ModelConverter]:
    return [c for c in (kind.for_run(cfg, start) for kind in CONVERTERS) if c is not None]


def hooks_for(cfg, tokenizer, amp, device, extra=()) -> list:
    """The hooks the config asks for, then ``extra`` (a caller's own), each checked."""
    hooks = [h for h in (make(cfg, tokenizer, amp, device) for make in HOOKS) if h is not None]
    for h in extra:
        if hasattr(h, "select_batch") and not hasattr(h, "choose_batch"):
            raise TypeError(f"{type(h).__name__}.select_batch: the hook method is now called "
                            "choose_batch (same arguments and result)")
    return hooks + list(extra)
