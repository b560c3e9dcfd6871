"""The keenlm model: a Llama-family decoder built from registries of parts."""
from keenlm.model.attention import ATTENTION, KVCache
from keenlm.model.transformer import FFN, LINEAR, Transformer, load_model_state, model_state


def build_model(cfg) -> Transformer:
    """Build a model from a resolved ModelConfig (see keenlm.presets.resolve)."""
    return Transformer(cfg)


__all__ = ["ATTENTION", "FFN", "LINEAR", "KVCache", "Transformer", "build_model",
           "load_model_state", "model_state"]
