"""Differentiable forward for training a method's trainable part (stage 1 of GlimpsePrune).

The sequence is ``prompt (left padded) | extra tokens (the glimpse) | suffix (the answer, right padded)``, run in
three chunks over one KV cache, with autograd on:

1. the prefix (prompt + glimpse) through layers 0..K; the method's hooks fire as at inference and its predictor's
   logits are read after layer K;
2. the prefix through layers K+1..;
3. the suffix through every layer, attending to the cached prefix.

At K = -1 (an early module) chunk 1 is empty: the predictor's logits are read before any layer, from the encoding
alone. The method's ``before_layer`` runs on every layer of the prefix, so per-layer glimpse vectors after K also
train (through the LM loss, as upstream). Nothing is compacted. Two visibility modes for chunks 2 and 3:

- ``soft_keep=False`` (upstream stage 1): nothing is hidden; the answer sees the glimpse (the chunks then equal
  one causal pass over the whole sequence).
- ``soft_keep=True`` (label-free distillation): what inference drops is dropped softly. The glimpse is hidden from
  every later query, and visual keys get an additive ``log sigmoid(logit)`` bias for prompt queries at layers > K
  and answer queries at every layer: a differentiable stand-in for removing them.

Suffix token t gets position id ``next_pos + t`` (the glimpse shares the first), so the answer sits where it would
be decoded. ``suffix_logits[:, t]`` predicts suffix token t (read at the position before it).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from ..adapters.base import Adapter, Encoded
from ..methods.base import PruningMethod
from .cache import new_cache, run_layer
from .engine import PrefillState, _resolve_prune_layer, add_visual
from .masks import attention_mask, causal_mask


@dataclass
class TrainForward:
    suffix_logits: torch.Tensor  # (B, T, V)
    vip_logits: list[torch.Tensor] | None  # per sample (n_vis_b,); None for methods without a predictor
    enc: Encoded


def _hide(mask: torch.Tensor, state: PrefillState, vip: list[torch.Tensor] | None) -> torch.Tensor:
    """``mask`` (B, 1, q, k) plus ``_key_bias`` over its keys (a dense additive mask, for attention implementations
    that cannot take the per-key bias on fused kernels)."""
    every_key = torch.ones(mask.shape[0], mask.shape[-1], dtype=torch.bool, device=mask.device)
    bias = _key_bias(every_key, state, vip, mask.dtype)[:, None, None, :]
    return (mask + bias).clamp(min=torch.finfo(mask.dtype).min)


KEY_BIAS_ATTENTION = "glimpseprune_key_bias"  # the attention function of chunk 2 under soft keep (registered below)
_MASKED = -1e4  # a key bias that hides the key (exp underflows to 0 in every dtype) and stays finite in fp16


def key_bias_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Causal attention over a prompt with an additive per-key bias ``attention_mask`` (B, n_keys) on SDPA's fused
    kernels: the bias rides in 8 extra query / key channels (query 1 / scale, key the bias, value 0), so that
    q'.k' x scale = q.k x scale + bias. No (L, L) mask or score matrix is built, and the bias gets its gradient
    through the keys. Query and key lengths must be equal (a whole prompt; chunk 2 of ``forward_train``).
    query (B, H, L, D), key / value (B, Hkv, L, D); returns ((B, L, H, D), None), as transformers' attention
    functions do."""
    B, H, L, D = query.shape
    if key.shape[2] != L:
        raise ValueError(f"key_bias_attention runs on a whole prompt: {L} queries but {key.shape[2]} keys")
    if key.shape[1] != H:  # grouped-query attention: as transformers' SDPA path does
        key, value = (t.repeat_interleave(H // key.shape[1], dim=1) for t in (key, value))
    scale = D ** -0.5 if scaling is None else scaling
    bias = attention_mask.to(query.dtype)[:, None, :, None].expand(B, H, L, 1)
    q = torch.cat([query, F.pad(torch.full_like(query[..., :1], 1.0 / scale), (0, 7))], dim=-1)
    k = torch.cat([key, F.pad(bias, (0, 7))], dim=-1)
    out = F.scaled_dot_product_attention(q, k, F.pad(value, (0, 8)), is_causal=True, scale=scale,
                                         dropout_p=dropout if module.training else 0.0)
    return out[..., :D].transpose(1, 2).contiguous(), None


AttentionInterface.register(KEY_BIAS_ATTENTION, key_bias_attention)


def _key_bias(key_mask: torch.Tensor, state: PrefillState, vip: list[torch.Tensor] | None, dtype) -> torch.Tensor:
    """(B, n_keys), per key: padding (``key_mask`` False) and the glimpse hidden, visual keys biased by their log
    keep-probability (``vip``; None: no bias). Keys past the prompt's (a suffix's) get 0."""
    bias = torch.zeros(key_mask.shape, dtype=torch.float32, device=key_mask.device)
    L0, n = state.enc.vis_mask.shape[1], state.n_extra
    for b, lg in enumerate(vip or []):
        bias[b, :L0][state.enc.vis_mask[b]] = F.logsigmoid(lg.float())
    bias[:, L0:L0 + n] = _MASKED
    return bias.masked_fill(~key_mask.bool(), _MASKED).clamp(min=_MASKED).to(dtype)


@contextlib.contextmanager
def _attention_implementation(layers, name: str):
    """The given decoder layers' attention runs ``name`` (their configs' ``_attn_implementation``) inside the block;
    restored on exit, also on errors."""
    configs = {id(c): c for c in (layer.self_attn.config for layer in layers)}.values()
    before = [(c, c._attn_implementation) for c in configs]
    try:
        for c, _ in before:
            c._attn_implementation = name
        yield
    finally:
        for c, impl in before:
            c._attn_implementation = impl


def _run(layers, idx, hidden, mask, state, method, hooks: bool, prefix: bool = True) -> torch.Tensor:
    for i in idx:
        if hooks:
            hidden = method.before_layer(state, i, hidden)
        h_in = hidden
        hidden = run_layer(layers[i], hidden, mask, state.rope, state.cache)
        if prefix:  # the prompt's visual tokens get the adapter's per-layer additions (DeepStack), as at inference
            hidden = add_visual(state, i, hidden)
        if hooks and state.prune_layer is not None and i <= state.prune_layer:
            method.after_layer(state, i, h_in)
    return hidden


def forward_train(model, adapter: Adapter, method: PruningMethod, inputs: dict, suffix_ids: torch.Tensor,
                  suffix_mask: torch.Tensor, soft_keep: bool = False) -> TrainForward:
    """See the module docstring. suffix_ids / suffix_mask: (B, T), right padded; inputs: left-padded prompts."""
    layers = adapter.layers(model)
    n_layers = len(layers)
    K = _resolve_prune_layer(method, n_layers)
    if K is not None and K < 0 and not hasattr(method, "predict_logits"):
        raise ValueError("forward_train needs a method that prunes after a layer (K >= 0), or one that predicts its "
                         "scores before the LLM (K = -1, with predict_logits)")
    enc = adapter.encode(model, inputs, taps=method.vision_taps() if K is not None else (),
                         tap_fn=method.vision_tap_fn() if K is not None else None)
    state = PrefillState(model, adapter, enc, new_cache(adapter.text_config(model)), {}, n_layers, K)
    B, L0, _ = enc.embeds.shape
    extra = method.extra_tokens(state) if K is not None else None
    hidden, positions, key_mask = enc.embeds, enc.positions, enc.attn_mask
    if extra is not None:
        state.n_extra, state.extra_at = extra.shape[1], L0
        ext_pos = enc.next_pos.view(1, B, 1).expand(positions.shape[0], B, extra.shape[1])
        hidden = torch.cat([hidden, extra.to(hidden.dtype)], dim=1)
        positions = torch.cat([positions, ext_pos], dim=2)
        key_mask = torch.cat([key_mask, torch.ones(B, extra.shape[1], dtype=torch.bool, device=hidden.device)], 1)
    state.key_mask = key_mask
    state.vis_mask = torch.cat([enc.vis_mask, torch.zeros_like(key_mask[:, L0:])], dim=1)  # nothing is dropped
    state.keep_vis = [torch.ones(n, dtype=torch.bool, device=hidden.device) for n in enc.n_vis]
    state.rope = adapter.rotary(model, hidden, positions)
    hooks = extra is not None or K is not None
    split = n_layers if K is None else K + 1
    # the prefix's plain causal (+ padding) mask as the model's attention implementation takes it, as at inference:
    # None without padding (SDPA's causal kernel), never a dense (B, 1, L, L) float mask
    mask = attention_mask(adapter.text_config(model), hidden, key_mask)
    hidden = _run(layers, range(split), hidden, mask, state, method, hooks)  # chunk 1
    vip = method.predict_logits(state) if K is not None and hasattr(method, "predict_logits") else None
    after = range(split, n_layers)
    if soft_keep and vip is not None and all(layers[i].self_attn.config._attn_implementation == "sdpa" for i in after):
        # the soft-keep biases, per key, on SDPA's fused kernels (no (L, L) mask, no score matrix)
        with _attention_implementation([layers[i] for i in after], KEY_BIAS_ATTENTION):
            hidden = _run(layers, after, hidden, _key_bias(key_mask, state, vip, hidden.dtype), state, method,
                          extra is not None)  # chunk 2
    else:
        if soft_keep:  # another attention implementation: the biases in a dense additive (B, 1, L, L) mask
            mask = _hide(causal_mask(key_mask, hidden.shape[1], hidden.dtype), state, vip)
        hidden = _run(layers, after, hidden, mask, state, method, extra is not None)  # chunk 2
    # chunk 3: the suffix, every layer, over the cached prefix
    T = suffix_ids.shape[1]
    step = torch.arange(T, device=suffix_ids.device)
    state.rope = adapter.rotary(model, hidden, (enc.next_pos[:, None] + step).unsqueeze(0).expand(
        positions.shape[0], B, T))
    full_mask = torch.cat([key_mask, suffix_mask.bool()], dim=1)
    smask = causal_mask(full_mask, T, hidden.dtype)
    suffix = _run(layers, range(n_layers), adapter.embed_tokens(model, suffix_ids),
                  _hide(smask, state, vip) if soft_keep else smask, state, method, hooks=False, prefix=False)
    # suffix token 0 is predicted by the glimpse in upstream training, by the last prompt token at inference
    first = hidden[:, L0 - 1:L0] if soft_keep else hidden[:, -1:]
    logits = adapter.logits(model, torch.cat([first, suffix[:, :-1]], dim=1))
    return TrainForward(logits, vip, enc)
