"""slbi-triton: Split Linearized Bregman Iteration as a fused multi-tensor torch optimizer."""

from .optimizer import SLBI

__all__ = ["SLBI"]
__version__ = "0.1.0"
