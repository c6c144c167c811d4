"""The pruning runtime: prefill layer by layer with mid-stack compaction, then decoding on the compacted cache.

Only this package rewrites hidden states, position ids, masks and the KV cache. Per-request state is a
``PrefillState`` / ``PrefillResult``; nothing is stored on the model, the adapter or the method.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..adapters.base import Adapter
from ..contracts import PrefillState
from ..methods.base import PruningMethod
from .cache import compact_cache, new_cache, run_layer
from .compact import gather_seq, left_repad_index
from .groups import plan_groups, run_grouped
from .masks import attention_mask, check_left_padded


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
    grids: list[tuple[int, int]]  # (h, w) per image / video frame-group, batch order (``Encoded``'s contract)
    image_owner: list[int]  # sample index of each grids entry
    kv_len: list[int]  # valid cache entries per sample at the end of prefill
    prune_layers: tuple[int, ...] = ()  # every compaction layer (prune_layer is the first)
    stage_keep_masks: list[list[torch.Tensor]] = field(default_factory=list)  # per compaction, per sample (n_vis_b,)
    timing: dict = field(default_factory=dict)  # generate: wall seconds of "prefill" (ViT + LLM) and "decode" (steps)
    grid_video: list[int] = field(default_factory=list)  # per grids entry: -1 image, else its video (``Encoded``)
    # whether any sample's cache is left padded; decoding appends to every row, so it holds to the end. When False
    # decode steps pass no key mask (as stock decoding without padding): no host read of the mask per step
    padded: bool = True

    @property
    def n_kept(self) -> list[int]:
        return [int(m.sum()) for m in self.keep_masks]

    @property
    def stage_kept(self) -> list[list[int]]:
        """Per compaction, the visual tokens kept per sample (the last equals ``n_kept``)."""
        return [[int(m.sum()) for m in masks] for masks in self.stage_keep_masks]


def _resolve_prune_layer(method: PruningMethod, n_layers: int) -> int | None:
    k = method.prune_layer(n_layers)
    if k is not None and not (-1 <= k < n_layers):
        raise ValueError(f"prune layer {k} is outside the LLM's layer range [-1, {n_layers - 1}] ({n_layers} layers)")
    return k


def _resolve_prune_layers(method: PruningMethod, n_layers: int) -> tuple[int, ...]:
    ks = tuple(int(k) for k in method.prune_layers(n_layers))
    for k in ks:
        if not (-1 <= k < n_layers):
            raise ValueError(f"prune layer {k} is outside the LLM's layer range [-1, {n_layers - 1}] "
                             f"({n_layers} layers)")
    if any(a >= b for a, b in zip(ks, ks[1:])):
        raise ValueError(f"prune layers must be strictly increasing, got {list(ks)}")
    return ks


def _append_extra(state: PrefillState, hidden: torch.Tensor, positions: torch.Tensor, extra: torch.Tensor):
    B, n = extra.shape[0], extra.shape[1]
    step = torch.arange(n, device=hidden.device)
    extra_pos = (state.enc.next_pos[:, None] + step).unsqueeze(0).expand(positions.shape[0], B, n)
    hidden = torch.cat([hidden, extra.to(hidden.dtype)], dim=1)
    positions = torch.cat([positions, extra_pos], dim=2)
    key_mask = torch.cat([state.enc.attn_mask, torch.ones(B, n, dtype=torch.bool, device=hidden.device)], dim=1)
    return hidden, positions, key_mask


def _token_keep(state: PrefillState, keep_vis: list[torch.Tensor]) -> torch.Tensor:
    """(B, L) bool over the current sequence: valid tokens, minus newly dropped visual tokens, minus extra tokens."""
    keep = state.key_mask.clone()
    if state.n_extra:
        keep[:, state.extra_at:state.extra_at + state.n_extra] = False
    if len(keep_vis) != len(state.keep_vis):
        raise ValueError(f"method returned {len(keep_vis)} keep masks for a batch of {len(state.keep_vis)}")
    for b, (new, old) in enumerate(zip(keep_vis, state.keep_vis)):
        if new.numel() != old.numel():
            raise ValueError(f"method returned {new.numel()} keep flags for sample {b} with {old.numel()} tokens")
        new = new.to(keep.device).bool().flatten()
        if bool((new & ~old).any()):
            raise ValueError(f"method kept visual tokens of sample {b} that an earlier stage dropped")
        keep[b, state.vis_mask[b]] = new[old]
    return keep


def add_visual(state: PrefillState, layer_idx: int, hidden: torch.Tensor) -> torch.Tensor:
    """Hidden states (B, L, H) after layer ``layer_idx`` plus the adapter's additions for that layer
    (``Encoded.visual_adds``: Qwen3-VL DeepStack) at the visual tokens still in the sequence (``state.vis_mask``);
    the rows of pruned tokens are dropped with the runtime's own keep masks (``state.keep_vis``). Out of place."""
    adds = state.enc.visual_adds
    if layer_idx >= len(adds):
        return hidden
    rows = adds[layer_idx][torch.cat(state.keep_vis).to(adds[layer_idx].device)]  # (n_kept_total, H)
    out = hidden.clone()
    out[state.vis_mask] = out[state.vis_mask] + rows.to(out.dtype)
    return out


def prefill(
    model, adapter: Adapter, method: PruningMethod, inputs: dict, request: dict | None = None,
    all_logits: bool = False, group: bool = True,
) -> PrefillResult:
    """Run the prompt through the LLM, pruning visual tokens after the method's layer K. With ``group``, a batch
    whose kept counts differ enough runs the layers after the last compaction in groups (``runtime/groups.py``)."""
    if inputs.get("attention_mask") is not None:
        check_left_padded(inputs["attention_mask"])
    layers = adapter.layers(model)
    n_layers = len(layers)
    stages = _resolve_prune_layers(method, n_layers)
    enc = adapter.encode(model, inputs, taps=method.vision_taps() if stages else (),
                         tap_fn=method.vision_tap_fn() if stages else None)
    if not bool(enc.vis_mask.any()):
        stages = ()  # nothing to prune: the method is a no-op
    K, last = (stages[0], stages[-1]) if stages else (None, None)
    state = PrefillState(model, adapter, enc, new_cache(adapter.text_config(model)), request or {}, n_layers, K,
                         prune_layers=stages)
    hidden, positions, key_mask = enc.embeds, enc.positions, enc.attn_mask
    extra = method.extra_tokens(state) if K is not None and K >= 0 else None
    if extra is not None:
        state.n_extra, state.extra_at = extra.shape[1], hidden.shape[1]
        hidden, positions, key_mask = _append_extra(state, hidden, positions, extra)
    state.key_mask = key_mask
    state.vis_mask = torch.cat([enc.vis_mask, torch.zeros_like(key_mask[:, enc.vis_mask.shape[1]:])], dim=1)
    state.keep_vis = [torch.ones(n, dtype=torch.bool, device=hidden.device) for n in enc.n_vis]
    state.rope = adapter.rotary(model, hidden, positions)
    stage_masks: list[list[torch.Tensor]] = []

    def compact(upto: int):
        nonlocal hidden, positions, key_mask
        keep_vis = [k.to(hidden.device).bool().flatten() for k in method.select(state)]
        index, key_mask = left_repad_index(_token_keep(state, keep_vis))
        hidden = gather_seq(hidden, index, 1)
        positions = gather_seq(positions, index, 2)
        state.rope = tuple(gather_seq(r, index, 1) for r in state.rope)
        if upto >= 0:
            compact_cache(state.cache, upto, index)
        state.vis_mask = gather_seq(state.vis_mask, index, 1) & key_mask
        state.key_mask, state.keep_vis = key_mask, keep_vis
        state.n_extra, state.extra_at, state.stage = 0, -1, state.stage + 1  # extra tokens go at the first stage
        stage_masks.append(keep_vis)
        hidden = method.after_compact(state, hidden)

    if K == -1:
        compact(-1)
    text_config = adapter.text_config(model)
    mask, stale = None, True  # the mask of the current sequence, built when the first layer that needs it runs
    for i, layer in enumerate(layers):
        # the first layer after the last compaction and after the adapter's visual additions (run per batch)
        if group and last is not None and i == max(last + 1, len(enc.visual_adds)):
            groups = plan_groups(key_mask.sum(dim=1).tolist())
            if groups:
                hidden = run_grouped(layers, i, hidden, key_mask, state.rope, state.cache, text_config, groups)
                break
        if stale:
            mask, stale = attention_mask(text_config, hidden, key_mask), False
        pruning = last is not None and i <= last
        if pruning:
            hidden = method.before_layer(state, i, hidden)
        h_in = hidden
        hidden = run_layer(layer, hidden, mask, state.rope, state.cache)
        hidden = add_visual(state, i, hidden)
        if pruning:
            method.after_layer(state, i, h_in)
        if i in stages:
            compact(i)
            stale = True
    logits = adapter.logits(model, hidden if all_logits else hidden[:, -1:])
    kv_len = key_mask.sum(dim=1).tolist()
    return PrefillResult(
        logits=logits if all_logits else logits[:, -1], cache=state.cache, key_mask=key_mask,
        next_pos=enc.next_pos, keep_masks=state.keep_vis, n_vis=enc.n_vis, prune_layer=K,
        scratch=state.scratch, grids=enc.grids, image_owner=enc.image_owner,
        kv_len=kv_len, prune_layers=stages, stage_keep_masks=stage_masks, grid_video=enc.grid_video,
        padded=min(kv_len) < key_mask.shape[1],
    )


def decode_step(model, adapter: Adapter, pre: PrefillResult, tokens: torch.Tensor, step: int) -> torch.Tensor:
    """Feed tokens (B,) at position next_pos + step; extends pre.cache and pre.key_mask in place. Returns (B, V)."""
    B = tokens.shape[0]
    hidden = adapter.embed_tokens(model, tokens[:, None])
    positions = adapter.decode_positions(pre.next_pos + step)
    rope = adapter.rotary(model, hidden, positions)
    pre.key_mask = torch.cat([pre.key_mask, torch.ones(B, 1, dtype=torch.bool, device=hidden.device)], dim=1)
    mask = attention_mask(adapter.text_config(model), hidden, pre.key_mask if pre.padded else None, pre.cache)
    for layer in adapter.layers(model):
        hidden = run_layer(layer, hidden, mask, rope, pre.cache)
    return adapter.logits(model, hidden)[:, -1]


# GenerationConfig fields whose decoding strategy this loop does not run (one greedy / sampled sequence per prompt)
_UNSUPPORTED = {"num_beams": 1, "num_return_sequences": 1, "guidance_scale": 1.0, "penalty_alpha": None,
                "assistant_early_exit": None, "prompt_lookup_num_tokens": None}
DEFAULT_MAX_NEW_TOKENS = 32  # when neither the call nor its GenerationConfig says (transformers' own default is 20)


def resolve_generation_config(generation_config=None, **overrides):
    """A fresh ``transformers.GenerationConfig``: a copy of ``generation_config`` (or an empty one), updated with the
    ``overrides`` that are not None, then transformers' global defaults where still unset (greedy, top_k 50 when
    sampling, ...), and ``max_new_tokens`` = 32 where unset. Unknown keywords and unsupported decoding strategies
    (beam search, several sequences per prompt, classifier-free guidance, assisted decoding) are refused by name."""
    import copy

    from transformers import GenerationConfig

    if generation_config is not None and not isinstance(generation_config, GenerationConfig):
        raise TypeError(f"generation_config must be a transformers.GenerationConfig, got "
                        f"{type(generation_config).__name__}")
    gc = copy.deepcopy(generation_config) if generation_config is not None else GenerationConfig()
    unknown = gc.update(**{k: v for k, v in overrides.items() if v is not None})
    if unknown:
        raise TypeError(f"unknown generation arguments {sorted(unknown)}: pass fields of transformers.GenerationConfig")
    gc.update(**GenerationConfig._get_default_generation_params(), defaults_only=True)
    if gc.max_new_tokens is None:
        gc.max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    for key, neutral in _UNSUPPORTED.items():
        value = getattr(gc, key, None)
        if value is not None and value != neutral:
            raise ValueError(f"{key}={value!r} is not supported by the pruning runtime (greedy or sampled decoding of "
                             "one sequence per prompt)")
    if getattr(gc, "assistant_model", None) is not None:
        raise ValueError("assisted decoding is not supported by the pruning runtime")
    return gc


def _mixin_call(model, name: str, *args, **kwargs):
    """``model.<name>(...)`` of transformers' GenerationMixin; the unbound method where the model lacks it."""
    from transformers import GenerationMixin

    fn = getattr(model, name, None)
    return fn(*args, **kwargs) if fn is not None else getattr(GenerationMixin, name)(model, *args, **kwargs)


def build_decoding(model, gc, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, tokenizer=None):
    """(logits processors, stopping criteria) exactly as ``model.generate`` builds them for ``gc`` and this prompt.
    ``gc`` is finalised in place: ``max_length`` = prompt + ``max_new_tokens``, special tokens as tensors."""
    from transformers import StoppingCriteriaList

    L, device = input_ids.shape[1], input_ids.device
    gc.max_length = L + gc.max_new_tokens
    _mixin_call(model, "_prepare_special_tokens", gc, True, device=device, batch_size=input_ids.shape[0])
    processors = _mixin_call(model, "_get_logits_processor", gc, input_ids_seq_length=L, encoder_input_ids=input_ids,
                             device=device, model_kwargs={"attention_mask": attention_mask})
    criteria = _mixin_call(model, "_get_stopping_criteria", gc, StoppingCriteriaList(), tokenizer=tokenizer)
    return processors, criteria


def next_tokens(scores: torch.Tensor, do_sample: bool, generator=None) -> torch.Tensor:
    """(B,) from processed scores (B, V): argmax, or one draw from their softmax. Without a ``generator`` the draw
    uses the global RNG exactly as ``model.generate`` does, so the same ``torch.manual_seed`` gives the same tokens."""
    if not do_sample:
        return scores.argmax(dim=-1)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.no_grad()
def generate(
    model, adapter: Adapter, method: PruningMethod, inputs: dict, max_new_tokens: int | None = None,
    eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None, do_sample: bool | None = None,
    temperature: float | None = None, seed: int | None = None, request: dict | None = None,
    keep_logits: bool = False, *, generation_config=None, streamer=None, tokenizer=None, **generation_kwargs,
) -> tuple[torch.Tensor, PrefillResult, list[torch.Tensor]]:
    """Prefill with pruning, then decode like ``model.generate``: the logits processors and stopping criteria are the
    ones transformers builds for the ``GenerationConfig`` (``generation_config`` updated with the keywords given,
    e.g. ``top_p=0.9, repetition_penalty=1.1, stop_strings=["."]``; stop strings need ``tokenizer``), applied to the
    running (B, prompt + t) ids. Rows that stopped get ``pad_token_id`` while others go on. EOS ids come from the
    config or ``eos_token_id`` only (none: decode ``max_new_tokens`` steps). ``seed`` samples with a private
    ``torch.Generator``; without it sampling consumes the global RNG as ``model.generate`` does. A ``streamer``
    (``TextStreamer``, ``TextIteratorStreamer``; batch of 1) gets the prompt ids, each new token, then ``end()``.

    Returns (new tokens (B, T), prefill result, per-step raw logits (B, V) if keep_logits else [])."""
    try:
        gc = resolve_generation_config(generation_config, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                                       pad_token_id=pad_token_id, do_sample=do_sample, temperature=temperature,
                                       **generation_kwargs)
        if gc.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {gc.max_new_tokens}")
        if streamer is not None:
            streamer.put(inputs["input_ids"].cpu())
        return _decode(model, adapter, method, inputs, gc, seed, request, keep_logits, streamer, tokenizer)
    finally:
        if streamer is not None:
            streamer.end()  # also on errors, so a consumer thread iterating a TextIteratorStreamer is released


def checked_decoding(model, gc, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, tokenizer=None):
    """``build_decoding``, with what transformers refuses while building (``top_p=-1``, a zero repetition penalty,
    stop strings without a tokenizer, out-of-vocabulary ``bad_words_ids``, ...) raised as one ``ValueError`` naming
    the settings: called before the prefill, so a bad knob costs no model run."""
    if gc.stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer: pass tokenizer= (or a processor to the PrunedModel)")
    try:
        return build_decoding(model, gc, input_ids, attention_mask, tokenizer)
    except (ValueError, TypeError) as err:
        raise ValueError(f"invalid generation settings: {err}") from err


def _decode(model, adapter, method, inputs, gc, seed, request, keep_logits, streamer, tokenizer):
    mask = inputs.get("attention_mask")
    if mask is not None and bool((mask == 1).all()):
        mask = None  # as transformers does before building its processors (no padding to skip)
    seq = inputs["input_ids"]  # (B, prompt + t): what the processors and stopping criteria read
    processors, criteria = checked_decoding(model, gc, seq, mask, tokenizer)
    t0 = time.perf_counter()
    pre = prefill(model, adapter, method, inputs, request)
    logits = pre.logits
    _sync(logits.device)
    t1 = time.perf_counter()
    device = logits.device
    if device != seq.device:  # a model spread by accelerate: its head is elsewhere; the processors follow it
        seq = seq.to(device)
        processors, criteria = build_decoding(model, gc, seq, None if mask is None else mask.to(device), tokenizer)
    gen = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    pad = gc._pad_token_tensor
    pad_done = gc._eos_token_tensor is not None and pad is not None  # as transformers: pad only with EOS criteria
    unfinished = torch.ones(seq.shape[0], dtype=torch.bool, device=device)
    out, step_logits = [], []
    for t in range(gc.max_new_tokens):
        raw = logits.to(device=device, dtype=torch.float32, copy=True)  # as transformers: fp32 (B, V) per step
        if keep_logits:
            step_logits.append(raw.clone())
        scores = processors(seq, raw)
        tok = next_tokens(scores, gc.do_sample, gen)
        if pad_done:
            tok = torch.where(unfinished, tok, pad.to(device))
        seq = torch.cat([seq, tok[:, None]], dim=1)
        out.append(tok)
        unfinished = unfinished & ~criteria(seq, None)
        if streamer is not None:
            streamer.put(tok.cpu())
        if not bool(unfinished.any()) or t == gc.max_new_tokens - 1:
            break
        logits = decode_step(model, adapter, pre, tok, t)
    _sync(device)
    pre.timing = {"prefill": t1 - t0, "decode": time.perf_counter() - t1, "decode_steps": len(out) - 1}
    return torch.stack(out, dim=1), pre, step_logits


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
