"""The trainable GlimpsePrune module: the glimpse token's per-layer vectors and the VIP. No model knowledge beyond
the sizes recorded in ``GlimpseConfig``."""

from __future__ import annotations

import torch
from torch import nn

from ..config import GlimpseConfig
from .vip import VIP


class GlimpseModule(nn.Module):
    """glimpse_embeddings (n_glimpse_layers, 1, H) -> shared Linear + RMSNorm -> one vector per glimpse layer; VIP."""

    def __init__(self, cfg: GlimpseConfig, dropout: float = 0.0):
        super().__init__()
        self.cfg = cfg
        H = cfg.base_hidden_size
        self.glimpse_embeddings = nn.Parameter(torch.zeros(len(cfg.glimpse_layers), 1, H))
        self.glimpse_proj = nn.Linear(H, H)
        self.glimpse_norm = nn.RMSNorm(H, eps=cfg.rms_eps)
        self.glimpse_dropout = nn.Dropout(dropout)
        self.vip = VIP(cfg)
        self._row = {layer: i for i, layer in enumerate(cfg.glimpse_layers)}
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.glimpse_embeddings, std=0.02)
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.xavier_uniform_(mod.weight)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.RMSNorm):
                nn.init.ones_(mod.weight)

    def glimpse_vector(self, layer_idx: int) -> torch.Tensor | None:
        """(H,) vector for the glimpse token at ``layer_idx`` (layer 0: its input embedding), or None."""
        row = self._row.get(layer_idx)
        if row is None:
            return None
        e = self.glimpse_embeddings[row, 0]
        return self.glimpse_dropout(self.glimpse_norm(self.glimpse_proj(e)))

    def glimpse_vectors(self) -> dict[int, torch.Tensor]:
        """Every glimpse layer's (H,) vector in one batched projection: {layer_idx: vector} (the function of
        ``glimpse_vector`` per layer, one matmul instead of one per layer)."""
        e = self.glimpse_dropout(self.glimpse_norm(self.glimpse_proj(self.glimpse_embeddings[:, 0])))
        return {layer: e[row] for layer, row in self._row.items()}

    def forward(self, attn: torch.Tensor, conds: list[torch.Tensor], grids: list[tuple[int, int]],
                projected: bool = False) -> torch.Tensor:
        return self.vip(attn, conds, grids, projected)
