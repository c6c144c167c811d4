"""``pdrop``: PyramidDrop (CVPR'25), multi-stage top-k by the last prompt token's attention inside the LLM.

Several compaction stages: after each stage layer the last prompt token's head-mean attention (softmax over the keys
it sees) ranks the visual tokens still alive, and the top max(1, floor(keep_ratio * lam^s * n_vis)) survive stage s =
0, 1, ... (ratios relative to the ORIGINAL count, as upstream). Defaults keep 50% / 25% / 12.5% after layers L/4 - 1,
L/2 - 1, 3L/4 - 1 (upstream's 32-layer setting: ``layer_list=[8, 16, 24]``, ``image_token_ratio_list=[0.5, 0.25,
0.125]``).

Differences from upstream, both deliberate: the scores come from the attention of the last layer before each cut
(upstream recomputes q/k with the next layer's projections), and dropped tokens also leave the KV cache of the
earlier layers, so generated tokens never see them (upstream keeps them in those layers' cache). ``budget`` is the
count after the last stage; ``PrefillResult.stage_kept`` holds every stage's count.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

from ..registry import register_method
from .base import MethodConfig
from .common import AttentionTopK, check_keep_ratio, check_layer, ratio_count

N_DEFAULT_STAGES = 3


@dataclass(frozen=True)
class PDropConfig(MethodConfig):
    keep_ratio: float = 0.5  # kept fraction after the first stage; stage s keeps keep_ratio * lam ** s
    lam: float = 0.5
    layers: tuple[int, ...] | None = None  # compaction layers, ascending; None: L/4 - 1, L/2 - 1, 3L/4 - 1

    def __post_init__(self) -> None:
        check_keep_ratio(self.keep_ratio)
        if isinstance(self.lam, bool) or not isinstance(self.lam, numbers.Real) or not 0.0 < self.lam <= 1.0:
            raise ValueError(f"lam must be in (0, 1], got {self.lam!r}")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))
            if not self.layers:
                raise ValueError("layers must name at least one LLM layer (or be None for the default schedule)")
            for k in self.layers:
                check_layer("every pdrop layer", k, minimum=0)
            if any(a >= b for a, b in zip(self.layers, self.layers[1:])):
                raise ValueError(f"layers must be strictly increasing, got {list(self.layers)}")


@register_method
class PDropMethod(AttentionTopK):
    """Example: ``gp.apply(model, "pdrop", layers=(7, 15, 23), keep_ratio=0.5, lam=0.5)``."""

    name = "pdrop"
    config_class = PDropConfig

    @classmethod
    def budget_kwargs(cls, fraction: float, n_stages: int = N_DEFAULT_STAGES) -> dict:
        """Config for a matched final budget: a geometric pyramid fraction^(1/S), fraction^(2/S), ..., fraction, so
        the decoder keeps exactly the budget while the earlier stages keep more (as PyramidDrop intends)."""
        step = float(fraction) ** (1.0 / n_stages)
        return {"keep_ratio": step, "lam": step}

    def prune_layers(self, n_layers: int) -> tuple[int, ...]:
        if self.config.layers is not None:
            return self.config.layers
        if n_layers < 4:
            raise ValueError(f"pdrop's default schedule needs at least 4 LLM layers (got {n_layers}); pass layers=")
        return tuple(s * n_layers // 4 - 1 for s in range(1, N_DEFAULT_STAGES + 1))

    def prune_layer(self, n_layers: int) -> int:
        return self.prune_layers(n_layers)[0]

    def stage_count(self, n_vis: int, stage: int) -> int:
        return ratio_count(n_vis, self.config.keep_ratio * self.config.lam ** stage)

    def budget(self, n_vis: int) -> int:
        n_stages = N_DEFAULT_STAGES if self.config.layers is None else len(self.config.layers)
        return self.stage_count(n_vis, n_stages - 1)
