"""aaa_fast: fast adversarial training that mixes adversaries and anti-adversaries."""
from . import ops
from .attack import adversarial_pair, perturb

__version__ = "0.1.0"
__all__ = ["adversarial_pair", "ops", "perturb"]
