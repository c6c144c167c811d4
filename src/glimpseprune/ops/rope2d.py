"""2D rotary position embedding over a token grid (row angle in the first half of the frequencies, column angle in
the second), as used by the VIP. Pure tensor functions."""

from __future__ import annotations

import torch


def grid_positions(h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
    """(h*w, 2) long tensor of (row, col) in raster order."""
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    return torch.stack([rows, cols], dim=-1)


def rope2d_angles(pos: torch.Tensor, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Angles (S, head_dim) for positions (S, 2): head_dim/4 frequencies per axis, [row | col] then duplicated."""
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, half, 2, dtype=torch.float32, device=pos.device) / half))
    ang = torch.cat([pos[:, 0:1].float() * inv_freq, pos[:, 1:2].float() * inv_freq], dim=-1)  # (S, half)
    return torch.cat([ang, ang], dim=-1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., S, head_dim) by angles (S, head_dim); computed in fp32, returned in x's dtype."""
    return apply_rope_cs(x, angles.cos(), angles.sin())


def apply_rope_cs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``apply_rope`` with the angles' cos and sin (S, head_dim, fp32) computed once by the caller."""
    xf = x.float()
    out = xf * cos + _rotate_half(xf) * sin
    return out.to(x.dtype)
