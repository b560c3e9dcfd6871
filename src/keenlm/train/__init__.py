"""Training: the loop, optimizers and schedules.

``keenlm.train`` is both this package and the function the API promises
(``keenlm.train(config)``): importing a submodule such as ``keenlm.train.grpo`` would otherwise
replace a function of that name on the parent package. So the package itself is callable; the
call goes to ``keenlm.api.train`` (which loads ``train.init_from`` first), installed here by
keenlm.api when it is imported, since this layer does not import the API above it.
"""
import sys
import types

from keenlm.train.trainer import Trainer, TrainHook, TrainResult

__all__ = ["Trainer", "TrainHook", "TrainResult"]


class _CallableModule(types.ModuleType):
    entry = None  # keenlm.api.train

    def __call__(self, config, hooks=()):
        """Train from a RunConfig or nested dict; returns a TrainResult."""
        return self.entry(config, hooks)


sys.modules[__name__].__class__ = _CallableModule
