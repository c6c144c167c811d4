"""Group rollouts on the pruned schedule (GlimpsePrune+): one pruned prefill per prompt, G sampled completions
decoded from copies of its compacted cache, and the log-probabilities of given completions computed on the same
schedule as inference (visual tokens dropped after K, answer tokens attending the compacted cache).

* ``expand_prefill(pre, G)``: a ``PrefillResult`` whose batch holds every sample G times (rows b*G .. b*G+G-1), the
  cache repeated along the batch (differentiable: ``repeat_interleave``), so the expensive pruned prefill runs once.
* ``sample_group``: G completions per prompt, each row drawing from its own ``torch.Generator`` (seeded per rollout),
  so a row's tokens do not depend on which other rows share its batch.
* ``completion_logprobs``: log p(completion token t | prompt, tokens < t) for every row, with gradients when enabled.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..adapters.base import Adapter
from .cache import repeat_cache, run_layer
from .engine import PrefillResult, decode_step
from .masks import attention_mask


def expand_prefill(model, adapter: Adapter, pre: PrefillResult, G: int) -> PrefillResult:
    """Every sample of ``pre`` repeated G times in a row (a new cache; ``pre`` is not modified)."""
    if G < 1:
        raise ValueError(f"G must be >= 1, got {G}")
    cache = repeat_cache(pre.cache, adapter.text_config(model), G)
    rep = lambda xs: [x for x in xs for _ in range(G)]  # noqa: E731
    return replace(pre, logits=pre.logits.repeat_interleave(G, dim=0), cache=cache,
                   key_mask=pre.key_mask.repeat_interleave(G, dim=0), next_pos=pre.next_pos.repeat_interleave(G, dim=0),
                   keep_masks=rep(pre.keep_masks), n_vis=rep(pre.n_vis), kv_len=rep(pre.kv_len), scratch={},
                   stage_keep_masks=[rep(m) for m in pre.stage_keep_masks], timing={})


def _sample(logits: torch.Tensor, temperature: float, gens: list[torch.Generator]) -> torch.Tensor:
    probs = torch.softmax(logits.float() / max(temperature, 1e-5), dim=-1)
    return torch.cat([torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(gens)])


@torch.no_grad()
def sample_group(model, adapter: Adapter, pre: PrefillResult, max_new_tokens: int, eos: list[int], pad: int,
                 temperature: float, seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one completion per row of an (expanded) prefill; row r draws with a generator seeded ``seeds[r]``.

    Returns (tokens (R, T), mask (R, T) bool): a completion runs up to and including its first EOS; later slots hold
    ``pad`` and are masked out. ``pre``'s cache and key mask are extended in place."""
    R = pre.logits.shape[0]
    if len(seeds) != R:
        raise ValueError(f"{len(seeds)} seeds for {R} rollouts")
    device = pre.logits.device
    gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    eos_t = torch.tensor(eos, device=device)
    done = torch.zeros(R, dtype=torch.bool, device=device)
    toks, masks = [], []
    logits = pre.logits
    for t in range(max_new_tokens):
        tok = _sample(logits, temperature, gens)
        masks.append(~done)
        tok = torch.where(done, torch.full_like(tok, pad), tok)
        toks.append(tok)
        done = done | torch.isin(tok, eos_t)
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        logits = decode_step(model, adapter, pre, tok, t)
    return torch.stack(toks, dim=1), torch.stack(masks, dim=1)


def forward_suffix(model, adapter: Adapter, pre: PrefillResult, tokens: torch.Tensor) -> torch.Tensor:
    """Logits (R, T, V) of ``tokens`` (R, T) fed after the prefill in one chunk (teacher forcing), attending the
    compacted cache with causal attention among themselves. Extends the cache (use a fresh or expanded one)."""
    R, T = tokens.shape
    hidden = adapter.embed_tokens(model, tokens)
    steps = torch.arange(T, device=tokens.device)
    pos = pre.next_pos[:, None] + steps  # (R, T)
    one = adapter.decode_positions(pre.next_pos)  # (P, R, 1): the layout of this family's position ids
    positions = pos.unsqueeze(0).expand(one.shape[0], R, T)
    rope = adapter.rotary(model, hidden, positions)
    key_mask = torch.cat([pre.key_mask, torch.ones(R, T, dtype=torch.bool, device=tokens.device)], dim=1)
    mask = attention_mask(adapter.text_config(model), hidden, key_mask, pre.cache)
    for layer in adapter.layers(model):
        hidden = run_layer(layer, hidden, mask, rope, pre.cache)
    return adapter.logits(model, hidden)


def completion_logprobs(model, adapter: Adapter, pre: PrefillResult, tokens: torch.Tensor,
                        temperature: float = 1.0) -> torch.Tensor:
    """log p(tokens[:, t] | prompt, tokens[:, :t]) (R, T) on the pruned schedule of ``pre`` (an expanded prefill
    with one row per completion). Token 0 is scored by the prefill's last-position logits (pruned at K, exactly as
    at inference), tokens 1.. by one teacher-forced chunk over the compacted cache. Differentiable when grad is on.
    ``temperature`` divides the logits, as when the tokens were sampled."""
    first = pre.logits[:, None]  # (R, 1, V)
    rest = forward_suffix(model, adapter, pre, tokens[:, :-1]) if tokens.shape[1] > 1 else first[:, :0]
    logits = torch.cat([first, rest], dim=1).float() / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)
