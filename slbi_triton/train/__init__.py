"""The training application: the ``slbi-train`` command on offline MNIST / Fashion-MNIST.

It uses the optimizer library (:mod:`slbi_triton`) as any user would; nothing in the
library imports it. Modules: :mod:`.cli` (arguments, ``main``), :mod:`.loop` (training,
evaluation, pruning sweep), :mod:`.shrink` (``--slim``: slimming and its measurements),
:mod:`.records` (the run records the modules pass on), :mod:`.report` (tables and CSV
files), :mod:`.data` (the offline data sets), :mod:`.idx` (the IDX file format),
:mod:`.models` (LeNet-5, ResNet-20), :mod:`.plots` (figures).
"""

from .cli import build_parser, main
from .loop import PRUNE_PERCENTS, build_schedulers, default_path_layer, slbi_param_groups

__all__ = [
    "PRUNE_PERCENTS",
    "build_parser",
    "build_schedulers",
    "default_path_layer",
    "main",
    "slbi_param_groups",
]
