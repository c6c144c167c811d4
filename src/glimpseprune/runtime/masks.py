"""Attention masks for the runtime.

Inference (``attention_mask``) builds exactly what transformers' own modeling code builds for the attention
implementation the model was loaded with (``config._attn_implementation``), through ``masking_utils``:

* ``sdpa`` / ``flash_attention_*`` with no padding: **no mask** (SDPA runs its causal kernel, flash its ``is_causal``
  path, GQA stays grouped); with left padding: a bool (B, 1, q, k) mask for SDPA, the 2-D mask for flash (varlen);
* ``eager``: the additive float mask eager attention needs (it materialises the scores anyway);
* ``flex_attention``: a block mask.

The runtime's sequences are always left padded, and every layer that runs a prefill chunk starts from an empty cache
(layers after a compaction layer have seen nothing yet), so a prefill mask is square: no cache.
Decoding runs after prefill, when every cache layer holds the same length: the cache sizes the mask.

``causal_mask`` (a dense additive mask) is kept for training only, where soft-keep biases are added to it.
"""

from __future__ import annotations

import torch
from transformers.masking_utils import create_causal_mask

from .cache import cache_param


def attention_mask(config, hidden: torch.Tensor, key_mask: torch.Tensor, cache=None):
    """The mask the decoder layers of a model with text config ``config`` need for queries ``hidden`` (B, q, H).

    key_mask: (B, past + q) bool, left padded, or None where no row is padded (no host read of it then);
    ``cache``: None in prefill (past = 0), the decode cache (every layer the same length ``past``) in decoding.
    Returns None, a tensor or a flex ``BlockMask``, as transformers would."""
    if key_mask is not None:
        if cache is not None and cache.get_seq_length(0) + hidden.shape[1] != key_mask.shape[1]:
            raise ValueError(f"key mask covers {key_mask.shape[1]} keys but the cache holds "
                             f"{cache.get_seq_length(0)} + {hidden.shape[1]} new")
        if cache is None and key_mask.shape[1] != hidden.shape[1]:
            raise ValueError(f"prefill key mask covers {key_mask.shape[1]} keys for {hidden.shape[1]} queries")
    return create_causal_mask(config=config, inputs_embeds=hidden, attention_mask=key_mask, position_ids=None,
                              layer_idx=0 if cache is not None else None, **{cache_param(create_causal_mask): cache})


def causal_mask(key_mask: torch.Tensor, q_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (B, 1, q_len, n_keys) for training: query i (the last q_len positions) sees key j iff
    key_mask[b, j] and j <= i. Disallowed entries hold the dtype's minimum (not -inf), so fully padded rows stay
    finite."""
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
