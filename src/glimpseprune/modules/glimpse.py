"""The trainable GlimpsePrune module: the glimpse token's per-layer vectors and the VIP. No model knowledge beyond
the sizes recorded in ``GlimpseConfig``."""

from __future__ import annotations

import torch
from torch import nn

from ..config import GlimpseConfig
from .vip import VIP, init_linears_and_norms


class GlimpseModule(nn.Module):
    """glimpse_embeddings (n_glimpse_layers, 1, H) -> shared Linear + RMSNorm -> one vector per glimpse layer; VIP."""

    def __init__(self, cfg: GlimpseConfig, dropout: float = 0.0):
        super().__init__()
        self.cfg = cfg
        H = cfg.base_hidden_size
        self.glimpse_embeddings = nn.Parameter(torch.zeros(len(cfg.glimpse_layers), 1, H))
        self.glimpse_proj = nn.Linear(H, H)
        self.glimpse_norm = nn.RMSNorm(H, eps=cfg.glimpse_eps)  # upstream: the base model's rms_norm_eps
        self.glimpse_dropout = nn.Dropout(dropout)
        self.vip = VIP(cfg)
        self._row = {layer: i for i, layer in enumerate(cfg.glimpse_layers)}
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.glimpse_embeddings, std=0.02)
        init_linears_and_norms(self)

    def glimpse_vector(self, layer_idx: int) -> torch.Tensor | None:
        """(H,) vector for the glimpse token at ``layer_idx`` (layer 0: its input embedding), or None."""
        row = self._row.get(layer_idx)
        if row is None:
            return None
        e = self.glimpse_embeddings[row, 0]
        return self.glimpse_dropout(self.glimpse_norm(self.glimpse_proj(e)))

    def glimpse_vectors(self, upto: int | None = None) -> dict[int, torch.Tensor]:
        """The (H,) vectors of the glimpse layers <= ``upto`` (all with None) in one batched projection:
        {layer_idx: vector}, the function of ``glimpse_vector`` per layer with one matmul instead of one per layer."""
        layers = [(layer, row) for layer, row in self._row.items() if upto is None or layer <= upto]
        rows = torch.tensor([row for _, row in layers], device=self.glimpse_embeddings.device)
        e = self.glimpse_dropout(self.glimpse_norm(self.glimpse_proj(self.glimpse_embeddings[rows, 0])))
        return {layer: e[i] for i, (layer, _) in enumerate(layers)}

    def forward(self, attn: torch.Tensor, conds: list[torch.Tensor], grids: list[tuple[int, int]],
                projected: bool = False, groups: list[int] | None = None) -> torch.Tensor:
        return self.vip(attn, conds, grids, projected, groups)
