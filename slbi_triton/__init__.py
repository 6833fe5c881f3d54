"""slbi-triton: Split Linearized Bregman Iteration as a fused multi-tensor torch optimizer."""

from .dispatch import KernelInfo
from .optimizer import SLBI
from .recording import load_records
from .toolbox import SENTINEL_EPOCH, LayerSparsity, UnknownLayerError

__all__ = ["SENTINEL_EPOCH", "SLBI", "KernelInfo", "LayerSparsity", "UnknownLayerError", "load_records"]
__version__ = "0.2.0"
