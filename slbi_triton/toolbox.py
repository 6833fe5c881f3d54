"""The paper's toolbox on name-indexed views of the flat buffers (work in progress)."""

from __future__ import annotations

import os
from collections.abc import Iterable


class ToolboxMixin:
    """Name-indexed read-outs, recording, ordering and pruning for :class:`SLBI`."""

    def _init_toolbox(self) -> None:
        """Set up toolbox state after the flat buffers exist."""

    def _after_step(
        self, record: bool, path: str | os.PathLike | None, layers: Iterable[str] | None
    ) -> None:
        """Work done after every step (recording, frozen pruned entries)."""
