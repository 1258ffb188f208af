"""aaa_fast: fast adversarial training that mixes adversaries and anti-adversaries."""
from . import ops

__version__ = "0.1.0"
__all__ = ["ops"]
