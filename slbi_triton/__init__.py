"""slbi-triton: Split Linearized Bregman Iteration as a fused multi-tensor torch optimizer."""

from .optimizer import SLBI
from .recording import load_records
from .toolbox import SENTINEL_EPOCH, LayerSparsity, UnknownLayerError

__all__ = ["SENTINEL_EPOCH", "SLBI", "LayerSparsity", "UnknownLayerError", "load_records"]
__version__ = "0.1.0"
