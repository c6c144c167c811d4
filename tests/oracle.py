"""External oracle for the pruning runtime: the STOCK transformers model and its own ``generate``, with a registered
attention function that hides the dropped visual tokens' keys from layers > K (prefill) and from every layer for the
generated tokens. Physically removing tokens must give the same result as this masking. Multi-stage pruning: each
dropped token has its own K (``masking_stages``)."""

from __future__ import annotations

import contextlib

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "gp_test_oracle"
KEPT = 10**9  # drop layer of a key that is never dropped
_STATE: dict = {}


def _oracle_attention(module, query, key, value, attention_mask, **kwargs):
    Q, n_keys = query.shape[2], key.shape[2]
    device = query.device
    q_abs = torch.arange(Q, device=device) + (n_keys - Q)
    j = torch.arange(n_keys, device=device)
    if attention_mask is None:
        base = (j[None, :] <= q_abs[:, None])[None, None]
    elif attention_mask.dtype == torch.bool:
        base = attention_mask
    else:
        base = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    drop_layer = _STATE["drop_layer"].to(device)  # (B, prompt_len): the layer after which each key is dropped
    pad = torch.full((drop_layer.shape[0], max(0, n_keys - drop_layer.shape[1])), KEPT, device=device)
    drop_layer = torch.cat([drop_layer, pad], dim=1)[:, :n_keys]
    dropped = drop_layer < KEPT
    late = (module.layer_idx > drop_layer)[:, None, :] | (q_abs >= _STATE["P"])[None, :, None]  # (B, Q, k)
    hide = dropped[:, None, :] & late & (j[None, None, :] != q_abs[None, :, None])
    mask = base.expand(query.shape[0], 1, Q, n_keys) & ~hide[:, None]
    return sdpa_attention_forward(module, query, key, value, mask, **kwargs)


AttentionInterface.register(NAME, _oracle_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def oracle_model(model_dir):
    from transformers import AutoModelForImageTextToText

    m = AutoModelForImageTextToText.from_pretrained(model_dir, local_files_only=True).eval()
    m.set_attn_implementation({"text_config": NAME, "vision_config": "sdpa"})
    return m


def visual_positions(inputs, token_ids) -> torch.Tensor:
    """(B, L) bool: True at the placeholder tokens ``token_ids`` (one id, e.g. the image token, or several, e.g.
    image and video tokens)."""
    return torch.isin(inputs["input_ids"], torch.as_tensor(token_ids, device=inputs["input_ids"].device))


def dropped_positions(inputs, image_token_id, keep_masks) -> torch.Tensor:
    """(B, L) bool: True at the visual tokens that keep_masks drop."""
    vis = visual_positions(inputs, image_token_id)
    dropped = torch.zeros_like(vis)
    for b, keep in enumerate(keep_masks):
        dropped[b, vis[b]] = ~keep
    return dropped


def masking(dropped: torch.Tensor, K: int):
    """Hide the ``dropped`` (B, L) keys from layers > K and from every generated token."""
    return masking_stages(torch.where(dropped, K, KEPT))


def stage_drop_layers(inputs, image_token_id, stage_layers, stage_keep_masks) -> torch.Tensor:
    """(B, L) long: the compaction layer after which each visual token leaves (KEPT for tokens never dropped)."""
    vis = visual_positions(inputs, image_token_id)
    out = torch.full(vis.shape, KEPT, dtype=torch.long)
    for K, masks in reversed(list(zip(stage_layers, stage_keep_masks))):  # the earliest stage that drops it wins
        for b, keep in enumerate(masks):
            row = out[b, vis[b]]
            row[~keep.cpu()] = K
            out[b, vis[b]] = row
    return out


@contextlib.contextmanager
def masking_stages(drop_layer: torch.Tensor):
    """Hide key j from layers > drop_layer[b, j] (prefill) and from every generated token if it is ever dropped."""
    _STATE.update(drop_layer=drop_layer, P=drop_layer.shape[1])
    try:
        yield
    finally:
        _STATE.clear()


def stock_generate(model, inputs, n: int, use_cache: bool = True, pad_token_id: int = 0):
    out = model.generate(**inputs, max_new_tokens=n, do_sample=False, use_cache=use_cache,
                         return_dict_in_generate=True, output_logits=True, pad_token_id=pad_token_id)
    return out.sequences[:, inputs["input_ids"].shape[1]:], out.logits
