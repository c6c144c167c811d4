"""The pruning-method interface. A method decides WHICH visual tokens to keep and WHEN (after which LLM layer);
it never touches hidden-state layout, positions or the KV cache (the runtime does). Its per-request scratch lives in
``PrefillState.scratch``, never on the method or the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ..runtime.engine import PrefillState


@dataclass(frozen=True)
class MethodConfig:
    """Base config; subclasses add fields and validate them in ``__post_init__``."""


class PruningMethod:
    """Hooks called by the runtime during prefill, in this order:

    ``extra_tokens`` (once) -> for each layer i <= K: ``before_layer``, the layer, ``after_layer`` -> ``select``
    after layer K. K = ``prune_layer(n_layers)``; -1 prunes before the first layer, None never prunes.
    """

    name: str = ""
    config_class: type[MethodConfig] = MethodConfig

    def __init__(self, config: MethodConfig | None = None, **kwargs: Any):
        if config is not None and kwargs:
            raise TypeError("pass either a config object or keyword fields, not both")
        self.config = config if config is not None else self.config_class(**kwargs)
        if not isinstance(self.config, self.config_class):
            raise TypeError(f"{self.name} expects a {self.config_class.__name__}, got {type(self.config).__name__}")

    def prune_layer(self, n_layers: int) -> int | None:
        return None

    def vision_taps(self) -> tuple[int, ...]:
        return ()

    def extra_tokens(self, state: PrefillState) -> torch.Tensor | None:
        """Embeddings (B, n, H) appended after the prompt for layers 0..K; dropped before layer K+1."""
        return None

    def before_layer(self, state: PrefillState, layer_idx: int, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    def after_layer(self, state: PrefillState, layer_idx: int, hidden_in: torch.Tensor) -> None:
        return None

    def select(self, state: PrefillState) -> list[torch.Tensor]:
        """Per sample, a bool keep mask over its visual tokens (n_vis_b,), all its images concatenated."""
        return [torch.ones(n, dtype=torch.bool, device=state.device) for n in state.enc.n_vis]
