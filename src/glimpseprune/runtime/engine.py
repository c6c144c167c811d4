"""The pruning runtime: prefill layer by layer with mid-stack compaction, then decoding on the compacted cache.

Only this package rewrites hidden states, position ids, masks and the KV cache. Per-request state is a
``PrefillState`` / ``PrefillResult``; nothing is stored on the model, the adapter or the method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..adapters.base import Adapter, Encoded
from ..methods.base import PruningMethod
from .cache import compact_cache, new_cache
from .compact import gather_seq, left_repad_index
from .masks import causal_mask, check_left_padded


@dataclass
class PrefillState:
    """Everything a method may read during one prefill. ``scratch`` is the method's per-request workspace."""

    model: Any
    adapter: Adapter
    enc: Encoded
    cache: Any
    request: dict
    n_layers: int
    prune_layer: int | None
    n_extra: int = 0
    extra_at: int = -1  # sequence index of the first extra token (the end of the prompt)
    rope: tuple[torch.Tensor, torch.Tensor] | None = None  # (cos, sin), (B, L, head_dim) of the current sequence
    key_mask: torch.Tensor | None = None  # (B, L) bool of the current sequence (with extra tokens)
    scratch: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.enc.embeds.device


@dataclass
class PrefillResult:
    logits: torch.Tensor  # (B, V) at the last prompt position, or (B, L', V) with all_logits=True
    cache: Any
    key_mask: torch.Tensor  # (B, L') bool, compacted 2-D mask of the cache
    next_pos: torch.Tensor  # (B,) position id of the first generated token (original, uncompacted numbering)
    keep_masks: list[torch.Tensor]  # per sample (n_vis_b,) bool
    n_vis: list[int]
    prune_layer: int | None
    scratch: dict
    grids: list[tuple[int, int]]  # (h, w) per image, batch order
    image_owner: list[int]  # sample index of each image
    kv_len: list[int]  # valid cache entries per sample at the end of prefill

    @property
    def n_kept(self) -> list[int]:
        return [int(m.sum()) for m in self.keep_masks]


def _resolve_prune_layer(method: PruningMethod, n_layers: int) -> int | None:
    k = method.prune_layer(n_layers)
    if k is not None and not (-1 <= k < n_layers):
        raise ValueError(f"prune layer {k} is outside the LLM's layer range [-1, {n_layers - 1}] ({n_layers} layers)")
    return k


def _append_extra(state: PrefillState, hidden: torch.Tensor, positions: torch.Tensor, extra: torch.Tensor):
    B, n = extra.shape[0], extra.shape[1]
    step = torch.arange(n, device=hidden.device)
    extra_pos = (state.enc.next_pos[:, None] + step).unsqueeze(0).expand(positions.shape[0], B, n)
    hidden = torch.cat([hidden, extra.to(hidden.dtype)], dim=1)
    positions = torch.cat([positions, extra_pos], dim=2)
    key_mask = torch.cat([state.enc.attn_mask, torch.ones(B, n, dtype=torch.bool, device=hidden.device)], dim=1)
    return hidden, positions, key_mask


def _token_keep(state: PrefillState, keep_vis: list[torch.Tensor], length: int) -> torch.Tensor:
    """(B, length) bool: valid prompt tokens, minus dropped visual tokens, minus the extra tokens at the end."""
    enc = state.enc
    B, L = enc.attn_mask.shape
    keep = enc.attn_mask.clone()
    for b, kv in enumerate(keep_vis):
        if kv.numel() != int(enc.vis_mask[b].sum()):
            raise ValueError(f"method returned {kv.numel()} keep flags for sample {b} with {enc.n_vis[b]} tokens")
        keep[b, enc.vis_mask[b]] = kv.to(keep.device)
    pad = torch.zeros(B, length - L, dtype=torch.bool, device=keep.device)
    return torch.cat([keep, pad], dim=1)


def prefill(
    model, adapter: Adapter, method: PruningMethod, inputs: dict, request: dict | None = None,
    all_logits: bool = False,
) -> PrefillResult:
    """Run the prompt through the LLM, pruning visual tokens after the method's layer K."""
    if inputs.get("attention_mask") is not None:
        check_left_padded(inputs["attention_mask"])
    layers = adapter.layers(model)
    n_layers = len(layers)
    K = _resolve_prune_layer(method, n_layers)
    enc = adapter.encode(model, inputs, taps=method.vision_taps() if K is not None else ())
    if not bool(enc.vis_mask.any()):
        K = None  # nothing to prune: the method is a no-op
    state = PrefillState(model, adapter, enc, new_cache(adapter.text_config(model)), request or {}, n_layers, K)
    hidden, positions, key_mask = enc.embeds, enc.positions, enc.attn_mask
    extra = method.extra_tokens(state) if K is not None and K >= 0 else None
    if extra is not None:
        state.n_extra, state.extra_at = extra.shape[1], hidden.shape[1]
        hidden, positions, key_mask = _append_extra(state, hidden, positions, extra)
    state.key_mask = key_mask
    state.rope = adapter.rotary(model, hidden, positions)
    keep_vis = [torch.ones(n, dtype=torch.bool, device=hidden.device) for n in enc.n_vis]

    def compact(upto: int):
        nonlocal hidden, positions, key_mask, keep_vis
        keep_vis = method.select(state)
        index, key_mask = left_repad_index(_token_keep(state, keep_vis, hidden.shape[1]))
        hidden = gather_seq(hidden, index, 1)
        positions = gather_seq(positions, index, 2)
        state.rope = tuple(gather_seq(r, index, 1) for r in state.rope)
        if upto >= 0:
            compact_cache(state.cache, upto, index)
        state.key_mask = key_mask

    if K == -1:
        compact(-1)
    mask4d = causal_mask(key_mask, hidden.shape[1], hidden.dtype)
    for i, layer in enumerate(layers):
        pruning = K is not None and i <= K
        if pruning:
            hidden = method.before_layer(state, i, hidden)
        h_in = hidden
        hidden = layer(hidden, attention_mask=mask4d, position_embeddings=state.rope, past_key_values=state.cache,
                       use_cache=True)
        if pruning:
            method.after_layer(state, i, h_in)
        if i == K:
            compact(K)
            mask4d = causal_mask(key_mask, hidden.shape[1], hidden.dtype)
    logits = adapter.logits(model, hidden if all_logits else hidden[:, -1:])
    return PrefillResult(
        logits=logits if all_logits else logits[:, -1], cache=state.cache, key_mask=key_mask,
        next_pos=enc.next_pos, keep_masks=[k.bool() for k in keep_vis], n_vis=enc.n_vis, prune_layer=K,
        scratch=state.scratch, grids=enc.grids, image_owner=enc.image_owner,
        kv_len=key_mask.sum(dim=1).tolist(),
    )


def decode_step(model, adapter: Adapter, pre: PrefillResult, tokens: torch.Tensor, step: int) -> torch.Tensor:
    """Feed tokens (B,) at position next_pos + step; extends pre.cache and pre.key_mask in place. Returns (B, V)."""
    B = tokens.shape[0]
    hidden = adapter.embed_tokens(model, tokens[:, None])
    positions = adapter.decode_positions(pre.next_pos + step)
    rope = adapter.rotary(model, hidden, positions)
    pre.key_mask = torch.cat([pre.key_mask, torch.ones(B, 1, dtype=torch.bool, device=hidden.device)], dim=1)
    mask4d = causal_mask(pre.key_mask, 1, hidden.dtype)
    for layer in adapter.layers(model):
        hidden = layer(hidden, attention_mask=mask4d, position_embeddings=rope, past_key_values=pre.cache,
                       use_cache=True)
    return adapter.logits(model, hidden)[:, -1]


def pick_tokens(logits: torch.Tensor, do_sample: bool, temperature: float, generator) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / max(temperature, 1e-5), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model, adapter: Adapter, method: PruningMethod, inputs: dict, max_new_tokens: int = 32,
    eos_token_id: int | list[int] | None = None, pad_token_id: int = 0, do_sample: bool = False,
    temperature: float = 1.0, seed: int | None = None, request: dict | None = None, keep_logits: bool = False,
) -> tuple[torch.Tensor, PrefillResult, list[torch.Tensor]]:
    """Prefill with pruning, then decode. Returns (new tokens (B, T), prefill result, per-step logits (B, V) if
    keep_logits else [])."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    eos = torch.tensor([] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int)
                                                         else list(eos_token_id)))
    pre = prefill(model, adapter, method, inputs, request)
    logits = pre.logits
    gen = None if seed is None else torch.Generator(device=logits.device).manual_seed(seed)
    B = logits.shape[0]
    done = torch.zeros(B, dtype=torch.bool, device=logits.device)
    out, step_logits = [], []
    for t in range(max_new_tokens):
        if keep_logits:
            step_logits.append(logits)
        tok = pick_tokens(logits, do_sample, temperature, gen).to(logits.device)
        tok = torch.where(done, torch.full_like(tok, pad_token_id), tok)
        out.append(tok)
        done = done | torch.isin(tok, eos.to(tok.device))
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        logits = decode_step(model, adapter, pre, tok, t)
    return torch.stack(out, dim=1), pre, step_logits
