"""The early glimpse module: scores visual tokens BEFORE the LLM (K = -1), so the kept count is known before any
LLM layer runs (a server can size the KV cache up front). No model knowledge beyond the sizes in ``GlimpseConfig``
(``kind="early"``).

Inputs, all available before the first LLM layer: the visual tokens' LLM input embeddings (the projector's output),
the question's token embeddings (the LLM's input embedding table on the prompt's text tokens) and the vision-encoder
taps. Per block: the visual tokens cross-attend to the question's tokens (plus one learned query token, so a sample
always has something to attend to), then one VIP block (``modules/vip.py``: conditional self-attention over each
image's grid with 2D RoPE, conditioned on a vision tap) -- the GlimpsePrune VIP with the glimpse token's attention
replaced by cross-attention to the question.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ..config import GlimpseConfig
from .vip import VIPBlock, init_linears_and_norms, span_angles


class QuestionAttention(nn.Module):
    """Visual tokens (queries) attend to one sample's question tokens and a learned token (keys / values)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.learned = nn.Parameter(torch.zeros(1, width))
        self.q_proj = nn.Linear(width, width, bias=False)
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width, bias=False)
        self.o_proj = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor, text: list[torch.Tensor], n_vis: list[int]) -> torch.Tensor:
        # x: (S, W), S = sum(n_vis); text: per sample (T_b, W)
        outs, h = [], self.heads
        d = x.shape[-1] // h
        for xb, tb in zip(x.split(n_vis), text):  # a sample without visual tokens gives (0, W)
            kv = torch.cat([self.learned.to(tb.dtype), tb], dim=0)  # (T_b + 1, W)
            q = self.q_proj(xb).view(xb.shape[0], h, d).transpose(0, 1)  # (h, n_b, d)
            k = self.k_proj(kv).view(kv.shape[0], h, d).transpose(0, 1)  # (h, T_b + 1, d)
            v = self.v_proj(kv).view(kv.shape[0], h, d).transpose(0, 1)
            o = F.scaled_dot_product_attention(q[None], k[None], v[None])[0]  # (h, n_b, d)
            outs.append(o.transpose(0, 1).reshape(xb.shape[0], h * d))
        return self.o_proj(torch.cat(outs, dim=0))  # (S, W)


class EarlyGlimpseModule(nn.Module):
    """logits = module(vis_embeds, text_embeds, n_vis, conds, grids): one logit per visual token."""

    def __init__(self, cfg: GlimpseConfig, dropout: float = 0.0):
        super().__init__()
        if cfg.kind != "early":
            raise ValueError(f"EarlyGlimpseModule needs a config of kind 'early', got {cfg.kind!r}")
        self.cfg = cfg
        H, W = cfg.base_hidden_size, cfg.vip_width
        self.vis_norm = nn.RMSNorm(H, eps=cfg.rms_eps)
        self.vis_in_proj = nn.Linear(H, W)
        self.text_norm = nn.RMSNorm(H, eps=cfg.rms_eps)
        self.text_in_proj = nn.Linear(H, W)
        self.dropout = nn.Dropout(dropout)
        self.cond_in_projs = nn.ModuleList(nn.Linear(cfg.base_vision_width, cfg.cond_width)
                                           for _ in range(cfg.n_vip_layers))
        self.question_norms = nn.ModuleList(nn.RMSNorm(W, eps=cfg.rms_eps) for _ in range(cfg.n_vip_layers))
        self.question_attns = nn.ModuleList(QuestionAttention(W, cfg.vip_heads) for _ in range(cfg.n_vip_layers))
        self.layers = nn.ModuleList(VIPBlock(cfg) for _ in range(cfg.n_vip_layers))
        self.out_proj = nn.Linear(W, 1)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        init_linears_and_norms(self)
        for attn in self.question_attns:
            nn.init.normal_(attn.learned, std=0.02)

    def drop_after(self, layer: int) -> None:
        """Make the picks leave after LLM layer ``layer`` (-1: before the LLM) from now on: the config's
        ``prune_layer``, checked against the base's depth, and saved with the module."""
        self.cfg = dataclasses.replace(self.cfg, prune_layer=layer)

    def project_condition(self, i: int, feats: torch.Tensor) -> torch.Tensor:
        """Vision tap i (n, vision_width) -> the condition of block i (n, cond_width)."""
        proj = self.cond_in_projs[i]
        return proj(feats.to(proj.weight.dtype))

    def forward(self, vis: torch.Tensor, text: list[torch.Tensor], n_vis: list[int], conds: list[torch.Tensor],
                grids: list[tuple[int, int]], projected: bool = False, groups: list[int] | None = None
                ) -> torch.Tensor:
        """vis: (S, H) visual tokens' input embeddings, samples in turn; text: per sample (T_b, H) question token
        embeddings; conds: per block (S, vision_width), or (S, cond_width) with ``projected``. Returns (S,) fp32."""
        n_tok = sum(h * w for h, w in grids)
        if vis.shape[0] != n_tok or sum(n_vis) != n_tok or any(c.shape[0] != n_tok for c in conds):
            raise ValueError(f"early module inputs cover {vis.shape[0]} tokens (visual embeddings), {sum(n_vis)} "
                             f"(n_vis) and {[c.shape[0] for c in conds]} (vision features) but the image grids hold "
                             f"{n_tok}")
        if len(conds) != len(self.layers):
            raise ValueError(f"early module expects {len(self.layers)} vision features, got {len(conds)}")
        if len(text) != len(n_vis):
            raise ValueError(f"early module got {len(text)} questions for {len(n_vis)} samples")
        dtype = self.vis_in_proj.weight.dtype
        x = self.dropout(self.vis_in_proj(self.vis_norm(vis.to(dtype))))  # (S, W)
        q = [self.text_in_proj(self.text_norm(t.to(dtype))) for t in text]  # per sample (T_b, W)
        first = self.layers[0].attn
        rope = span_angles(grids, groups, first.q_proj.out_features // first.heads, first.theta, x.device)
        for i, (norm, cross, layer) in enumerate(zip(self.question_norms, self.question_attns, self.layers)):
            x = x + cross(norm(x), q, n_vis)
            cond = conds[i].to(dtype) if projected else self.project_condition(i, conds[i])
            x = layer(x, cond, grids, rope, groups)
        return self.out_proj(x).squeeze(-1).float()  # (S,)
