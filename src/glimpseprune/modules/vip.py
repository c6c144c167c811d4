"""Visual-token Importance Predictor (VIP): a few conditional self-attention blocks over each image's token grid.

Input: per-visual-token glimpse attention features (n_tok, n_attn) and vision-encoder features (one tensor per
block, in the order of ``GlimpseConfig.vision_taps``). Output: one logit per visual token. Each image attends only to
itself (global attention within the image, 2D RoPE on its merged-token grid), so a token's score never depends on
other images or other samples. A video is scored as one input: ``groups`` puts its frame-groups (one (h, w) grid
each) in one attention span, every token attending to all frames' tokens, each frame with the same 2D RoPE over its
own grid. No temporal position is added (a trained module's weights stay valid for images and videos alike): the
glimpse-attention features already carry time, as the LLM computes them with M-RoPE's temporal axis.
Parameter names follow the upstream release so its weights convert by renaming.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VIP_ACTIVATIONS, GlimpseConfig
from ..ops.rope2d import apply_rope_cs, grid_positions, rope2d_angles


class CondAttention(nn.Module):
    """Self-attention whose queries and keys see [x ; condition], values see x only."""

    def __init__(self, width: int, cond_width: int, heads: int, theta: float):
        super().__init__()
        self.heads, self.theta = heads, theta
        qk = width + cond_width
        self.q_proj = nn.Linear(qk, qk, bias=False)
        self.k_proj = nn.Linear(qk, qk, bias=False)
        self.v_proj = nn.Linear(width, width, bias=False)
        self.o_proj = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, grids: list[tuple[int, int]],
                rope: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                groups: list[int] | None = None) -> torch.Tensor:
        # x: (S, width), cond: (S, cond_width); S = sum of h*w over grids; rope: per attention span (``spans``), the
        # 2D RoPE (cos, sin) of its tokens; groups: per grid, its span id (None: every grid alone)
        u = torch.cat([x, cond], dim=-1)
        S, H = x.shape[0], self.heads
        q = self.q_proj(u).view(S, H, -1).transpose(0, 1)  # (H, S, dqk)
        k = self.k_proj(u).view(S, H, -1).transpose(0, 1)
        v = self.v_proj(x).view(S, H, -1).transpose(0, 1)  # (H, S, dv)
        dqk, dv = q.shape[-1], v.shape[-1]
        # Fused kernels need 4-D inputs with one head width: pad v to the q/k width with zeros (the padded output
        # columns are zero and dropped). The softmax scale stays 1/sqrt(dqk), as with the unpadded call.
        if dv < dqk:
            v = F.pad(v, (0, dqk - dv))
        rope = rope if rope is not None else span_angles(grids, groups, dqk, self.theta, x.device)
        qk = torch.stack([q, k])  # (2, H, S, dqk): one rotation for both
        if len(rope) == 1:  # one image or one video: no slicing, no concatenation
            qk = apply_rope_cs(qk, *rope[0])
            o = F.scaled_dot_product_attention(qk[0:1], qk[1:2], v[None])[0, ..., :dv]  # (H, S, dv), O(S) memory
        else:
            outs, start = [], 0
            for cos, sin in rope:
                sl = slice(start, start + cos.shape[0])
                r = apply_rope_cs(qk[:, :, sl], cos, sin)
                outs.append(F.scaled_dot_product_attention(r[0:1], r[1:2], v[None, :, sl])[0, ..., :dv])
                start += cos.shape[0]
            o = torch.cat(outs, dim=1)
        return self.o_proj(o.transpose(0, 1).reshape(S, -1))  # (S, width)


def grid_angles(grids: list[tuple[int, int]], head_dim: int, theta: float, device
                ) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
    """2D RoPE (cos, sin), each (h*w, head_dim) fp32, per distinct grid."""
    out = {}
    for g in dict.fromkeys(grids):
        ang = rope2d_angles(grid_positions(*g, device), head_dim, theta)
        out[g] = (ang.cos(), ang.sin())
    return out


@torch.no_grad()
def init_linears_and_norms(module: nn.Module) -> None:
    """The modules' common initialisation: every Linear Xavier-uniform with zero bias, every RMSNorm weight one."""
    for mod in module.modules():
        if isinstance(mod, nn.Linear):
            nn.init.xavier_uniform_(mod.weight)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
        elif isinstance(mod, nn.RMSNorm):
            nn.init.ones_(mod.weight)


def spans(grids: list[tuple[int, int]], groups: list[int] | None) -> list[list[tuple[int, int]]]:
    """The grids of each attention span, in order: consecutive grids sharing a ``groups`` id (a video's frame-groups)
    form one span; None: one span per grid."""
    if groups is None:
        return [[g] for g in grids]
    if len(groups) != len(grids):
        raise ValueError(f"VIP got {len(groups)} group ids for {len(grids)} grids")
    out: list[list[tuple[int, int]]] = []
    for i, (g, gid) in enumerate(zip(grids, groups)):
        if i and gid == groups[i - 1]:
            out[-1].append(g)
        else:
            out.append([g])
    return out


def span_angles(grids: list[tuple[int, int]], groups: list[int] | None, head_dim: int, theta: float, device
                ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per attention span, the 2D RoPE (cos, sin) of its tokens, each (n_span, head_dim) fp32: every grid's own
    (row, col) angles, frame after frame. Computed once per VIP call and shared by its blocks."""
    table = grid_angles(grids, head_dim, theta, device)
    out = []
    for span in spans(grids, groups):
        if len(span) == 1:
            out.append(table[span[0]])
        else:
            out.append(tuple(torch.cat([table[g][i] for g in span]) for i in (0, 1)))
    return out


# ``GlimpseConfig.vip_act`` -> the function, as transformers' ACT2FN computes it under that name.
ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
               "relu": F.relu}
assert set(ACTIVATIONS) == set(VIP_ACTIVATIONS)


class SwiGLU(nn.Module):
    """down(act(gate(x)) * up(x)); SiLU by default (a GLU with another activation for other ``act`` names)."""

    def __init__(self, width: int, hidden: int, act: str = "silu"):
        super().__init__()
        self.gate_proj = nn.Linear(width, hidden)
        self.up_proj = nn.Linear(width, hidden)
        self.down_proj = nn.Linear(hidden, width)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class VIPBlock(nn.Module):
    def __init__(self, cfg: GlimpseConfig):
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.vip_width, eps=cfg.rms_eps)
        self.attn = CondAttention(cfg.vip_width, cfg.cond_width, cfg.vip_heads, cfg.rope_theta)
        self.norm2 = nn.RMSNorm(cfg.vip_width, eps=cfg.rms_eps)
        self.mlp = SwiGLU(cfg.vip_width, cfg.vip_mlp_width, cfg.vip_act)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, grids: list[tuple[int, int]], rope=None,
                groups: list[int] | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cond, grids, rope, groups)
        return x + self.mlp(self.norm2(x))


class VIP(nn.Module):
    """logits = VIP(attn, conds, grids, groups=None); attn (S, n_attn), conds: list of (S, vision_width), grids:
    [(h, w), ...], groups: per grid its attention span id (``Encoded.grid_groups``; None: each grid alone)."""

    def __init__(self, cfg: GlimpseConfig):
        super().__init__()
        n_attn = len(cfg.attn_layers) * cfg.base_num_heads
        self.attn_in_proj = nn.Linear(n_attn, cfg.vip_width)
        self.cond_in_projs = nn.ModuleList(
            nn.Linear(cfg.base_vision_width, cfg.cond_width) for _ in range(cfg.n_vip_layers)
        )
        self.layers = nn.ModuleList(VIPBlock(cfg) for _ in range(cfg.n_vip_layers))
        self.out_proj = nn.Linear(cfg.vip_width, 1)

    def project_condition(self, i: int, feats: torch.Tensor) -> torch.Tensor:
        """Vision feature i (n, vision_width) -> the condition of VIP block i (n, cond_width)."""
        proj = self.cond_in_projs[i]
        return proj(feats.to(proj.weight.dtype))

    def forward(self, attn: torch.Tensor, conds: list[torch.Tensor], grids: list[tuple[int, int]],
                projected: bool = False, groups: list[int] | None = None) -> torch.Tensor:
        """conds: raw vision features, or with ``projected`` already passed through ``project_condition``."""
        n_tok = sum(h * w for h, w in grids)
        if attn.shape[0] != n_tok or any(c.shape[0] != n_tok for c in conds):
            raise ValueError(f"VIP inputs cover {attn.shape[0]} tokens (attention features) and "
                             f"{[c.shape[0] for c in conds]} (vision features) but the image grids hold {n_tok}")
        if len(conds) != len(self.layers):
            raise ValueError(f"VIP expects {len(self.layers)} vision features, got {len(conds)}")
        dtype = self.attn_in_proj.weight.dtype
        x = self.attn_in_proj(attn.to(dtype))
        first = self.layers[0].attn
        rope = span_angles(grids, groups, first.q_proj.out_features // first.heads, first.theta, x.device)
        for i, (layer, cond) in enumerate(zip(self.layers, conds)):
            x = layer(x, cond.to(dtype) if projected else self.project_condition(i, cond), grids, rope)
        return self.out_proj(x).squeeze(-1).float()  # (S,)
