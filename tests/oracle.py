"""External oracle for the pruning runtime: the STOCK transformers model and its own ``generate``, with a registered
attention function that hides the dropped visual tokens' keys from layers > K (prefill) and from every layer for the
generated tokens. Physically removing tokens must give the same result as this masking."""

from __future__ import annotations

import contextlib

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "gp_test_oracle"
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
    dropped = _STATE["dropped"].to(device)  # (B, prompt_len)
    pad = torch.zeros(dropped.shape[0], max(0, n_keys - dropped.shape[1]), dtype=torch.bool, device=device)
    dropped = torch.cat([dropped, pad], dim=1)[:, :n_keys]
    late = (module.layer_idx > _STATE["K"]) | (q_abs >= _STATE["P"])  # (Q,)
    hide = dropped[:, None, :] & late[None, :, None] & (j[None, None, :] != q_abs[None, :, None])
    mask = base.expand(query.shape[0], 1, Q, n_keys) & ~hide[:, None]
    return sdpa_attention_forward(module, query, key, value, mask, **kwargs)


AttentionInterface.register(NAME, _oracle_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def oracle_model(model_dir):
    from transformers import AutoModelForImageTextToText

    m = AutoModelForImageTextToText.from_pretrained(model_dir, local_files_only=True).eval()
    m.set_attn_implementation({"text_config": NAME, "vision_config": "sdpa"})
    return m


def dropped_positions(inputs, image_token_id: int, keep_masks) -> torch.Tensor:
    """(B, L) bool: True at the visual tokens that keep_masks drop."""
    vis = inputs["input_ids"] == image_token_id
    dropped = torch.zeros_like(vis)
    for b, keep in enumerate(keep_masks):
        dropped[b, vis[b]] = ~keep
    return dropped


@contextlib.contextmanager
def masking(dropped: torch.Tensor, K: int):
    _STATE.update(dropped=dropped, K=K, P=dropped.shape[1])
    try:
        yield
    finally:
        _STATE.clear()


def stock_generate(model, inputs, n: int, use_cache: bool = True, pad_token_id: int = 0):
    out = model.generate(**inputs, max_new_tokens=n, do_sample=False, use_cache=use_cache,
                         return_dict_in_generate=True, output_logits=True, pad_token_id=pad_token_id)
    return out.sequences[:, inputs["input_ids"].shape[1]:], out.logits
