"""Training: the loop, optimizers and schedules.

``keenlm.train`` is both this package and the function the API promises
(``keenlm.train(config)``): importing a submodule such as ``keenlm.train.grpo`` would otherwise
replace a function of that name on the parent package. So the package itself is callable.
"""
import sys
import types

from keenlm.train.trainer import Trainer, TrainHook, TrainResult, train

__all__ = ["Trainer", "TrainHook", "TrainResult", "train"]


class _CallableModule(types.ModuleType):
    def __call__(self, config, hooks=()):
        """Train from a RunConfig or nested dict (``train.init_from`` loaded first); returns a
        TrainResult."""
        return train(config, hooks)


sys.modules[__name__].__class__ = _CallableModule
