"""keenlm: small language models made smarter and faster on the compute one person has."""
from keenlm._version import __version__

from keenlm import train  # noqa: E402  (a callable package: keenlm.train(config))
from keenlm.api import KeenModel, load  # noqa: E402
from keenlm.config import ConfigError, RunConfig  # noqa: E402

__all__ = ["ConfigError", "KeenModel", "RunConfig", "load", "train", "__version__"]
