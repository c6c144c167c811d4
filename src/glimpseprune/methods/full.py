"""``full``: no pruning. The reference every other method is compared with."""

from __future__ import annotations

from ..registry import register_method
from .base import PruningMethod


@register_method
class FullMethod(PruningMethod):
    name = "full"

    def budget(self, n_vis: int) -> int:
        return n_vis
