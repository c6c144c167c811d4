"""All KV-cache surgery of the runtime lives here: creation, reading a layer's keys, and token compaction.

Works on transformers 5.x ``DynamicCache`` through its per-layer objects (``cache.layers[i].keys / .values``,
each (B, kv_heads, L, head_dim)).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


def new_cache(text_config) -> DynamicCache:
    return DynamicCache(config=text_config)


def layer_keys(cache: DynamicCache, layer_idx: int) -> torch.Tensor:
    """Keys of one layer, (B, kv_heads, L, head_dim), after RoPE."""
    return cache.layers[layer_idx].keys


def compact_cache(cache: DynamicCache, upto_layer: int, index: torch.Tensor) -> None:
    """Keep, in layers 0..upto_layer, only the sequence positions in ``index`` (B, L'), in that order (in place)."""
    for i in range(upto_layer + 1):
        layer = cache.layers[i]
        idx = index[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
        layer.keys = torch.gather(layer.keys, 2, idx)
        layer.values = torch.gather(layer.values, 2, idx)
