"""Attention masks for the runtime: additive 4-D masks built from a 2-D key mask (left padding, causal)."""

from __future__ import annotations

import torch


def causal_mask(key_mask: torch.Tensor, q_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (B, 1, q_len, n_keys): query i (the last q_len positions) sees key j iff key_mask[b, j] and
    j <= i. Disallowed entries hold the dtype's minimum (not -inf), so fully padded rows stay finite."""
    B, n_keys = key_mask.shape
    offset = n_keys - q_len
    q_idx = torch.arange(q_len, device=key_mask.device)[:, None] + offset
    k_idx = torch.arange(n_keys, device=key_mask.device)[None, :]
    allowed = (k_idx <= q_idx)[None] & key_mask.bool()[:, None, :]  # (B, q, k)
    mask = torch.zeros(B, 1, q_len, n_keys, dtype=dtype, device=key_mask.device)
    return mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


def check_left_padded(attention_mask: torch.Tensor) -> None:
    """Raise if a 2-D mask is not left padded (zeros only before the first one in each row)."""
    m = attention_mask.bool()
    if m.dim() != 2:
        raise ValueError(f"attention_mask must be 2-D (batch, seq), got shape {tuple(m.shape)}")
    ones_after = m.long().cummax(dim=1).values.bool()
    if bool((ones_after & ~m).any()):
        raise ValueError(
            "right-padded (or interior-padded) batches are not supported: pad on the left "
            "(processor.tokenizer.padding_side = 'left')"
        )
    if bool((~m.any(dim=1)).any()):
        raise ValueError("a sample in the batch has an all-zero attention_mask (empty prompt)")
