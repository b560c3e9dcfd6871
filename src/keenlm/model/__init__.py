"""The keenlm model: a Llama-family decoder built from registries of parts."""
import contextlib

import torch
from torch import nn

from keenlm.model.attention import ATTENTION, KVCache
from keenlm.model.transformer import (FFN, LINEAR, Transformer, check_state_shapes, load_model_state,
                                      model_state)

# torch.nn.init functions the modules' own constructors call
_INIT_FUNCTIONS = ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "ones_", "zeros_",
                   "constant_", "trunc_normal_", "xavier_uniform_", "xavier_normal_")


@contextlib.contextmanager
def _no_init():
    """Module constructors initialize their parameters; on the "meta" device there is nothing
    to fill (the weights come from a file next), and torch's meta path for random init imports
    torch._dynamo, ~1 s of a GGUF load. As transformers' ``no_init_weights``: the init
    functions return their tensor untouched while the model is built."""
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in _INIT_FUNCTIONS:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def build_model(cfg) -> Transformer:
    """Build a model from a resolved ModelConfig (see keenlm.presets.resolve). Under
    ``torch.device("meta")`` (to be filled from a file) nothing is initialized."""
    if torch.get_default_device().type == "meta":
        with _no_init():
            return Transformer(cfg)
    return Transformer(cfg)


__all__ = ["ATTENTION", "FFN", "LINEAR", "KVCache", "Transformer", "build_model",
           "check_state_shapes", "load_model_state", "model_state"]
