"""aaa_fast: fast adversarial training that mixes adversaries and anti-adversaries."""
from . import ops
from .attack import adversarial_pair, perturb
from .fairness import FairnessMultipliers
from .meta import MetaNet, meta_gradient
from .trainer import AAAConfig, AAATrainer, make_meta_net, make_meta_optimizer

__version__ = "0.1.0"
__all__ = ["AAAConfig", "AAATrainer", "FairnessMultipliers", "MetaNet", "adversarial_pair", "make_meta_net",
           "make_meta_optimizer", "meta_gradient", "ops", "perturb"]
