"""All KV-cache surgery of the runtime lives here: creation, reading a layer's keys, and token compaction.

Works on transformers 5.x ``DynamicCache`` through its per-layer objects (``cache.layers[i].keys / .values``,
each (B, kv_heads, L, head_dim)), and hands a cache to a decoder layer under the keyword the installed
transformers takes it by (``cache`` from 5.24, ``past_key_values`` before; the old name warns from 5.24 and goes in
5.40).
"""

from __future__ import annotations

import functools
import inspect

import torch
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask

from ..contracts import layer_keys  # noqa: F401  (re-exported: the runtime's own view of a layer's keys)


@functools.cache
def cache_param(fn) -> str:
    """The keyword ``fn`` (a function, e.g. a module class's ``forward``) takes the KV cache by: an explicit
    ``cache`` or ``past_key_values`` parameter, else (``**kwargs`` only) the one transformers' mask functions take."""
    params = inspect.signature(fn).parameters  # follows deprecation wrappers (``__wrapped__``) to the real signature
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return "past_key_values" if fn is create_causal_mask else cache_param(create_causal_mask)


def run_layer(layer, hidden: torch.Tensor, mask, rope, cache) -> torch.Tensor:
    """One decoder layer over ``hidden`` (B, q, H) that appends its keys and values to ``cache``; ``mask`` as
    ``masks.attention_mask`` builds it, ``rope`` the (cos, sin) position embeddings."""
    if layer.training and getattr(layer, "gradient_checkpointing", False):
        # transformers calls a checkpointed layer with no cache (it would be written again when the backward pass
        # re-runs the layer), so the runtime's later chunks would find no keys: a shape error deep in attention
        raise ValueError("gradient (activation) checkpointing is on: the runtime keeps its own KV cache across "
                         "layers, which a checkpointed layer cannot write; switch it off first: "
                         "model.activation_checkpointing_disable() (gradient_checkpointing_disable() on older "
                         "transformers)")
    kw = {cache_param(type(layer).forward): cache}
    return layer(hidden, attention_mask=mask, position_embeddings=rope, use_cache=True, **kw)


def new_cache(text_config) -> DynamicCache:
    return DynamicCache(config=text_config)


def compact_cache(cache: DynamicCache, upto_layer: int, index: torch.Tensor) -> None:
    """Keep, in layers 0..upto_layer, only the sequence positions in ``index`` (B, L'), in that order (in place)."""
    for i in range(upto_layer + 1):
        layer = cache.layers[i]
        idx = index[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
        layer.keys = torch.gather(layer.keys, 2, idx)
        layer.values = torch.gather(layer.values, 2, idx)


def merge_group_caches(cache: DynamicCache, parts: list[tuple[torch.Tensor, DynamicCache]], start: int, stop: int,
                       length: int) -> None:
    """Write layers start..stop-1 of per-group caches into ``cache`` as one left-padded batch of ``length``.

    parts: (sample indices (n_g,), that group's cache, whose layers hold (n_g, kv_heads, L_g, head_dim), L_g <=
    length). Padding slots hold zeros; the caller's key mask hides them."""
    B = sum(int(ix.numel()) for ix, _ in parts)
    for j in range(start, stop):
        ref = parts[0][1].layers[j].keys
        keys = ref.new_zeros(B, ref.shape[1], length, ref.shape[-1])
        values = keys.clone()
        for ix, gcache in parts:
            k, v = gcache.layers[j].keys, gcache.layers[j].values
            keys[ix, :, length - k.shape[2]:] = k
            values[ix, :, length - v.shape[2]:] = v
        cache.update(keys, values, j)  # layer j of the batch cache was empty: this initialises it


def repeat_cache(cache: DynamicCache, text_config, G: int) -> DynamicCache:
    """A new cache holding every batch row of ``cache`` G times in a row (rows b*G .. b*G+G-1 = row b); the copy is
    differentiable (``repeat_interleave``) and ``cache`` is not modified."""
    out = new_cache(text_config)
    for i, layer in enumerate(cache.layers):
        out.update(layer.keys.repeat_interleave(G, dim=0), layer.values.repeat_interleave(G, dim=0), i)
    return out

