"""slbi-triton: Split Linearized Bregman Iteration as a fused multi-tensor torch optimizer.

``SLBI`` is the optimizer; ``slim`` turns a trained network into a physically smaller one
(the optional extra ``[slim]``); ``load_records`` reads the record file of
``step(record=True)``; ``SLBI.kernels()`` reports which kernel runs which parameters.
"""

from .coupling import ModuleGraphError, param_groups
from .dispatch import KernelInfo
from .optimizer import SLBI
from .recording import load_records
from .slimming import SlimError, SlimResult, slim
from .targets import MacModel, MacTarget, channel_norms, hold_out, prune_to
from .toolbox import SENTINEL_EPOCH, LayerSparsity, UnknownLayerError

__all__ = [
    "SENTINEL_EPOCH",
    "SLBI",
    "KernelInfo",
    "LayerSparsity",
    "MacModel",
    "MacTarget",
    "ModuleGraphError",
    "SlimError",
    "SlimResult",
    "UnknownLayerError",
    "channel_norms",
    "hold_out",
    "load_records",
    "param_groups",
    "prune_to",
    "slim",
]
__version__ = "0.2.0"
