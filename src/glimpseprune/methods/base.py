"""The pruning-method interface. A method decides WHICH visual tokens to keep and WHEN (after which LLM layer);
it never touches hidden-state layout, positions or the KV cache (the runtime does). Its per-request scratch lives in
``PrefillState.scratch``, never on the method or the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ..contracts import PrefillState


@dataclass(frozen=True)
class MethodConfig:
    """Base config; subclasses add fields and validate them in ``__post_init__``."""


class PruningMethod:
    """Hooks called by the runtime during prefill, in this order:

    ``extra_tokens`` (once) -> for each layer i <= K: ``before_layer``, the layer, ``after_layer`` -> ``select``
    after layer K. K = ``prune_layer(n_layers)``; -1 prunes before the first layer, None never prunes.

    Multi-stage methods override ``prune_layers`` instead: ``select`` then runs after each listed layer (ascending;
    -1 only first), hooks fire for every layer up to the last stage, and extra tokens are dropped at the first stage.

    Right after every compaction the runtime passes the compacted hidden states through ``after_compact`` (at K = -1
    they are the LLM's input embeddings), where merging methods rewrite the rows of the visual tokens they kept.
    """

    name: str = ""
    config_class: type[MethodConfig] = MethodConfig
    takes_keep_masks: bool = False  # reads ``keep_masks`` from the request (mask, oracle); others refuse them

    def __init__(self, config: MethodConfig | None = None, **kwargs: Any):
        if config is not None and kwargs:
            raise TypeError("pass either a config object or keyword fields, not both")
        self.config = config if config is not None else self.config_class(**kwargs)
        if not isinstance(self.config, self.config_class):
            raise TypeError(f"{self.name} expects a {self.config_class.__name__}, got {type(self.config).__name__}")

    def prune_layer(self, n_layers: int) -> int | None:
        return None

    def prune_layers(self, n_layers: int) -> tuple[int, ...]:
        """Layers after which ``select`` runs, ascending; default: the single ``prune_layer`` (or none)."""
        k = self.prune_layer(n_layers)
        return () if k is None else (k,)

    def budget(self, n_vis: int) -> int | None:
        """Visual tokens this method keeps, at the end of prefill, of a sample with n_vis of them; None when the
        count depends on the input (thresholds, supplied masks)."""
        return None

    def vision_taps(self) -> tuple[int, ...]:
        return ()

    def vision_tap_fn(self):
        """None, or a callable (tap position i, features (n, C)) -> tensor that the adapter applies to each tap as
        the vision tower makes it (e.g. the predictor's input projection), so only its (smaller) result is kept
        while the rest of the tower runs. Must return the same object on every call (encodings are cached by it)."""
        return None

    def extra_tokens(self, state: PrefillState) -> torch.Tensor | None:
        """Embeddings (B, n, H) appended after the prompt for layers 0..K; dropped before layer K+1."""
        return None

    def before_layer(self, state: PrefillState, layer_idx: int, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    def after_layer(self, state: PrefillState, layer_idx: int, hidden_in: torch.Tensor) -> None:
        return None

    def after_compact(self, state: PrefillState, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, L', H) of the sequence just compacted by ``select`` (``state.stage`` already counts that
        compaction); returns them, possibly with the kept visual rows (``state.vis_mask``) rewritten. Only the later
        layers see a rewrite: the cache of the layers already run is left as it is."""
        return hidden

    def select(self, state: PrefillState) -> list[torch.Tensor]:
        """Per sample, a bool keep mask over its visual tokens (n_vis_b,), all its images concatenated. At a later
        stage of a multi-stage method it may only drop more: it must stay within ``state.keep_vis``."""
        return [torch.ones(n, dtype=torch.bool, device=state.device) for n in state.enc.n_vis]
