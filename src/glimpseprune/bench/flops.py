"""Analytic FLOPs of Qwen2.5-VL- and Qwen3-VL-style models, full and pruned: pure functions of a ``ModelShape`` and
token counts.

Conventions (every function here follows them):

* A multiply-add counts as **2 FLOPs**: a (m x k) @ (k x n) product is 2*m*k*n FLOPs.
* Only matrix products are counted: linear layers, the two attention products (Q K^T and A V), the ViT's
  patch-embedding convolution. Norms, RoPE, softmax, activations, biases, residual adds, gathers and the embedding
  lookup are not (each is O(tokens * width), well under 1 % of a layer).
* Attention over GQA: Q and O have width ``num_heads * head_dim``, K and V ``num_kv_heads * head_dim``; the score
  and value products run over all ``num_heads`` query heads: 2 * 2 * num_heads * head_dim FLOPs per query-key pair.
* ``causal`` is always explicit. causal=True counts the pairs a causal model needs: n_new * n_past +
  n_new (n_new + 1) / 2. causal=False counts every pair: n_new * (n_past + n_new). The latter is what a kernel
  executes when it gets an explicit mask (this runtime's prefill passes one only for a left-padded batch; without
  padding SDPA runs its causal kernel), and what upstream's ``cal_flops.py`` counts (it has no causal halving).
* FFN: SwiGLU with three matrices (gate, up, down): 3 * 2 * n * hidden * intermediate (the LLMs of both families;
  the ViT MLP has two matrices in Qwen3-VL, ``VisionShape.gated_mlp=False``).
* Qwen3-VL DeepStack: its extra ViT mergers (one per ``deepstack_blocks`` entry) are counted in ``vit_flops``; its
  additions to the LLM's hidden states (after layers 0, 1, 2, at the visual tokens) are elementwise, not counted.
* LM head: prefill counts it for the **last prompt token only** (``lm_head_tokens=1``; the runtime computes logits
  only there); each decode step counts it for its one token (``lm_head=True``). Upstream counts no LM head at all.
* Video: a clip of F frames is t = ceil(F / temporal_patch_size) frame-groups of h x w merged tokens (t * h * w
  visual tokens; ``video_grid``). The ViT attends within each frame-group (like t images); the VIP attends over all
  of a video's tokens at once (one span of (t * h * w)^2 pairs, ``groups``); Qwen3-VL's per-group timestamp text is
  extra prompt text (``video_text_tokens``).
* Pruned prefill: layers 0..K run on the full prompt plus ``n_extra`` tokens (the glimpse token), layers K+1..L-1
  on the kept sequence (text + kept visual tokens); K = -1 prunes before the first layer. The VIP and the glimpse
  query's logits are counted separately (``vip_flops``), the ViT separately again (``vit_flops``).

Example (paper Table 7, Qwen2.5-VL-7B, 5073.9 -> 202.5 tokens, pruning after layer 18)::

    shape = load_shape("qwen2_5_vl_7b")
    full = prefill_flops(shape, n_text=33, n_vis=5041, causal=False)
    gp = prefill_flops(shape, n_text=33, n_vis=5041, n_kept=170, prune_layer=18, n_extra=1, causal=False)
    gp.layers / full.layers  # ~0.69
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import GlimpseConfig
from .shapes import ModelShape, TextShape, VisionShape

MAC_FLOPS = 2  # FLOPs per multiply-add


def matmul_flops(m: int, k: int, n: int) -> int:
    """(m x k) @ (k x n): 2 * m * k * n FLOPs."""
    return MAC_FLOPS * m * k * n


def attention_pairs(n_new: int, n_past: int = 0, causal: bool = True) -> int:
    """Query-key pairs of n_new new queries against n_past cached keys plus the n_new new keys."""
    if causal:
        return n_new * n_past + n_new * (n_new + 1) // 2
    return n_new * (n_past + n_new)


@dataclass(frozen=True)
class LayerFlops:
    proj: int  # q, k, v, o projections
    attn: int  # Q K^T and A V
    ffn: int  # SwiGLU gate, up, down

    @property
    def linear(self) -> int:
        return self.proj + self.ffn

    @property
    def total(self) -> int:
        return self.proj + self.attn + self.ffn


def text_layer_flops(t: TextShape, n_new: int, n_past: int = 0, causal: bool = True) -> LayerFlops:
    """One decoder layer processing n_new tokens with n_past tokens already in its KV cache."""
    H = t.hidden_size
    proj = matmul_flops(n_new, H, t.q_width) + 2 * matmul_flops(n_new, H, t.kv_width) + matmul_flops(
        n_new, t.q_width, H)
    attn = 2 * MAC_FLOPS * t.q_width * attention_pairs(n_new, n_past, causal)
    ffn = 3 * matmul_flops(n_new, H, t.intermediate_size)
    return LayerFlops(proj, attn, ffn)


def lm_head_flops(t: TextShape, n_tokens: int = 1) -> int:
    return matmul_flops(n_tokens, t.hidden_size, t.vocab_size)


def _window_sizes(n: int, w: int) -> list[int]:
    return [w] * (n // w) + ([n % w] if n % w else [])


def vit_attention_pairs(v: VisionShape, grid_thw: tuple[int, int, int], window: bool) -> int:
    """Query-key pairs of one ViT block for one image/video given as (t, h, w) in patches (``image_grid_thw``).

    Full-attention blocks attend within each frame; window blocks within windows of ``window_tokens`` merged tokens
    per side (edge windows are smaller), i.e. (merge^2 * tokens in window)^2 pairs per window.
    """
    t, h, w = grid_thw
    m = v.spatial_merge_size
    if not window:
        return t * (h * w) ** 2
    ws = v.window_tokens
    rows, cols = _window_sizes(h // m, ws), _window_sizes(w // m, ws)
    return t * sum((m * m * a * b) ** 2 for a in rows for b in cols)


def vit_flops(v: VisionShape, grids_thw: list[tuple[int, int, int]]) -> dict[str, int]:
    """The Qwen2.5-VL / Qwen3-VL vision encoder on images given as (t, h, w) patch grids. Keys: patch_embed, linear
    (qkv, proj and MLP of all blocks: SwiGLU, or fc1/fc2 when not ``gated_mlp``), window_attn, full_attn, merger
    (normed 2x2 concat -> MLP), deepstack_mergers (one more merger per DeepStack block; 0 for Qwen2.5-VL), total."""
    D, I, m2 = v.hidden_size, v.intermediate_size, v.spatial_merge_size ** 2
    P = sum(t * h * w for t, h, w in grids_thw)
    patch = matmul_flops(P, v.in_channels * v.temporal_patch_size * v.patch_size ** 2, D)
    n_mlp = 3 if v.gated_mlp else 2
    per_block = matmul_flops(P, D, 3 * D) + matmul_flops(P, D, D) + n_mlp * matmul_flops(P, D, I)
    n_full = len(v.fullatt_blocks)
    win_pairs = sum(vit_attention_pairs(v, g, True) for g in grids_thw)
    full_pairs = sum(vit_attention_pairs(v, g, False) for g in grids_thw)
    window_attn = (v.depth - n_full) * 2 * MAC_FLOPS * D * win_pairs
    full_attn = n_full * 2 * MAC_FLOPS * D * full_pairs
    merger = matmul_flops(P // m2, m2 * D, m2 * D) + matmul_flops(P // m2, m2 * D, v.out_hidden_size)
    out = {"patch_embed": patch, "linear": v.depth * per_block, "window_attn": window_attn, "full_attn": full_attn,
           "merger": merger, "deepstack_mergers": len(v.deepstack_blocks) * merger}
    out["total"] = sum(out.values())
    return out


def vip_flops(g: GlimpseConfig, grids: list[tuple[int, int]], n_keys: int, text: TextShape | None = None,
              groups: list[int] | None = None) -> dict[str, int]:
    """The GlimpsePrune overhead: the VIP over merged-token grids [(h, w), ...] (attention within each image; a
    video's frame-groups, one grid each, share one attention span when ``groups`` gives them one id, as
    ``Encoded.grid_groups`` does: (t * h * w)^2 pairs, not t * (h * w)^2), the glimpse query's logits over its n_keys
    keys (prompt + itself) at each attention layer, recomputed from that layer's q projection (needs ``text``;
    skipped when None), and the glimpse vectors (Linear H -> H of each glimpse layer's embedding, layers 0..K). Keys:
    vip, glimpse_scores, glimpse_vectors, total (what runs in the LLM prefill) and conditions: the projections of the
    vision taps to the VIP's condition width, which run inside the vision encoder (as the taps are made), so they are
    not in ``total``."""
    from ..modules.vip import spans  # the VIP's own grouping of grids into attention spans

    S = sum(h * w for h, w in grids)
    pairs = sum(sum(h * w for h, w in span) ** 2 for span in spans(grids, groups))
    qk, W = g.vip_width + g.cond_width, g.vip_width
    n_attn = len(g.attn_layers) * g.base_num_heads
    conditions = g.n_vip_layers * matmul_flops(S, g.base_vision_width, g.cond_width)
    inputs = matmul_flops(S, n_attn, W)
    # attention as executed: q.k at the q/k width, and p.v at the q/k width too, because the VIP pads v to it so that
    # SDPA can take its fused kernel (the padded columns are zero and dropped)
    block = (2 * matmul_flops(S, qk, qk) + 2 * matmul_flops(S, W, W) + MAC_FLOPS * pairs * 2 * max(qk, W)
             + 3 * matmul_flops(S, W, g.vip_mlp_width))
    vip = inputs + g.n_vip_layers * block + matmul_flops(S, W, 1)
    scores = 0
    if text is not None:
        scores = len(g.attn_layers) * (matmul_flops(1, text.hidden_size, text.q_width)
                                       + MAC_FLOPS * text.q_width * n_keys)
    n_vec = sum(1 for i in g.glimpse_layers if i <= g.prune_layer)  # glimpse vectors used in layers 0..K
    vectors = n_vec * matmul_flops(1, g.base_hidden_size, g.base_hidden_size)
    return {"vip": vip, "glimpse_scores": scores, "glimpse_vectors": vectors, "total": vip + scores + vectors,
            "conditions": conditions}


@dataclass(frozen=True)
class PrefillCost:
    """FLOPs of one sample's prefill, by part; ``llm`` is what a prefill timer around the decoder sees."""

    layers: int
    lm_head: int
    vip: int
    vit: int
    tokens_per_layer: tuple[int, ...]
    kv_len: int
    per_layer: tuple[int, ...] = field(default=(), repr=False)
    conditions: int = 0  # the VIP's projections of the vision taps: they run beside the ViT, in ``vit`` if counted

    @property
    def llm(self) -> int:
        return self.layers + self.lm_head + self.vip

    @property
    def total(self) -> int:
        return self.llm + self.vit

    @property
    def equivalent_tokens(self) -> float:
        """Layer-averaged equivalent tokens: the mean over layers of the tokens each layer processes."""
        return sum(self.tokens_per_layer) / len(self.tokens_per_layer)


def tokens_per_layer(n_layers: int, n_full: int, n_kept: int, prune_layer: int | None, n_extra: int = 0
                     ) -> list[int]:
    """Tokens each layer processes: n_full + n_extra in layers 0..K, n_kept after; n_full everywhere if K is None."""
    if prune_layer is None:
        return [n_full] * n_layers
    if not -1 <= prune_layer < n_layers:
        raise ValueError(f"prune_layer {prune_layer} outside [-1, {n_layers - 1}]")
    return [n_full + n_extra if i <= prune_layer else n_kept for i in range(n_layers)]


def prefill_flops(shape: ModelShape, n_text: int, n_vis: int, n_kept: int | None = None,
                  prune_layer: int | None = None, n_extra: int = 0, causal: bool = True, lm_head_tokens: int = 1,
                  glimpse: GlimpseConfig | None = None, grids: list[tuple[int, int]] | None = None,
                  include_vit: bool = False, groups: list[int] | None = None) -> PrefillCost:
    """Prefill of one prompt of n_text text + n_vis visual tokens (per sample; a batch of equal prompts is B times).

    Full run: prune_layer=None (or n_kept=None). Pruned run: layers 0..prune_layer on n_text + n_vis + n_extra
    tokens, the rest on n_text + n_kept; the cache then holds n_text + n_kept entries (``kv_len``).
    glimpse: count the VIP and the glimpse logits (``vip_flops``); grids: merged-token grid per image and per video
    frame-group, as ``Encoded.grids`` (default one image of n_vis tokens in one row; only the VIP's attention and the
    ViT depend on it); groups: the VIP's attention span of each grid (``Encoded.grid_groups``: a video's frame-groups
    together; None: each grid alone). include_vit: add the vision encoder (pass the real grids: its window attention
    depends on them; a video's frame-groups cost what its (t, h, w) grid costs, the ViT attending within frames).
    """
    t, L = shape.text, shape.text.num_layers
    n_full = n_text + n_vis
    if n_kept is not None and not 0 <= n_kept <= n_vis:
        raise ValueError(f"n_kept {n_kept} outside [0, n_vis={n_vis}]")
    K = prune_layer if n_kept is not None else None
    extra = n_extra if K is not None and K >= 0 else 0
    tokens = tokens_per_layer(L, n_full, n_text + (n_kept if n_kept is not None else n_vis), K, extra)
    per_layer = tuple(text_layer_flops(t, n, 0, causal).total for n in tokens)
    grids = grids or [(1, n_vis)]
    vip = conditions = 0
    if glimpse is not None and K is not None and K >= 0:
        counted = vip_flops(glimpse, grids, n_full + extra, t, groups)
        vip, conditions = counted["total"], counted["conditions"]
    vit = 0
    if include_vit:
        m = shape.vision.spatial_merge_size
        vit = vit_flops(shape.vision, [(1, h * m, w * m) for h, w in grids])["total"] + conditions
    return PrefillCost(layers=sum(per_layer), lm_head=lm_head_flops(t, lm_head_tokens), vip=vip, vit=vit,
                       tokens_per_layer=tuple(tokens), kv_len=tokens[-1] if K is None else n_text + n_kept,
                       per_layer=per_layer, conditions=conditions)


def decode_step_flops(shape: ModelShape, cache_len: int, lm_head: bool = True) -> int:
    """One decode step (one new token) with cache_len entries already cached in every layer."""
    t = shape.text
    layers = t.num_layers * text_layer_flops(t, 1, cache_len).total
    return layers + (lm_head_flops(t, 1) if lm_head else 0)


def decode_flops(shape: ModelShape, kv_len: int, n_steps: int, lm_head: bool = True) -> int:
    """n_steps decode steps starting from a cache of kv_len entries (step i sees kv_len + i cached entries).

    Upstream's "decode FLOPs" (Table 7) is this with n_steps = generated tokens and lm_head=False; this runtime
    runs n_generated - 1 decode steps (the first token comes from the prefill logits).
    """
    return sum(decode_step_flops(shape, kv_len + i, lm_head) for i in range(n_steps))


def kv_cache_bytes(t: TextShape, kv_len: int, bytes_per_value: int = 2, batch: int = 1) -> int:
    """Keys and values of every layer: 2 * L * num_kv_heads * head_dim * kv_len values per sample."""
    return 2 * t.num_layers * t.kv_width * kv_len * bytes_per_value * batch


def n_kept_for(n_vis: int, keep_frac: float, min_keep: int = 1) -> int:
    """Kept visual tokens at a fixed fraction: max(min_keep, floor(frac * n_vis)), as ``select_tokens`` does."""
    import math

    return min(n_vis, max(min_keep, int(math.floor(keep_frac * n_vis + 1e-9))))


def prune_layer_sweep(shape: ModelShape, n_text: int, n_vis: int, keep_frac: float, layers: list[int] | None = None,
                      causal: bool = True, glimpse: bool = True, grids: list[tuple[int, int]] | None = None
                      ) -> list[dict]:
    """Analytic prefill cost vs pruning layer K (default: -1..L-1). One row per K with the LLM prefill FLOPs, their
    ratio to the full prefill, the layer-averaged equivalent tokens and the initial KV length. With glimpse=True
    the glimpse token and the VIP are counted (for K >= 0)."""
    L = shape.text.num_layers
    full = prefill_flops(shape, n_text, n_vis, causal=causal)
    n_kept = n_kept_for(n_vis, keep_frac)
    rows = []
    for K in layers if layers is not None else range(-1, L):
        gcfg = shape.glimpse_config(K) if glimpse and K >= 0 else None
        cost = prefill_flops(shape, n_text, n_vis, n_kept, K, n_extra=1 if gcfg else 0, causal=causal,
                             glimpse=gcfg, grids=grids)
        rows.append({"prune_layer": K, "prefill_flops": cost.llm, "ratio": cost.llm / full.llm,
                     "equivalent_tokens": cost.equivalent_tokens, "kv_len": cost.kv_len, "n_kept": n_kept,
                     "vip_flops": cost.vip})
    return rows


def variant_cost(shape: ModelShape, method: str, keep: float | None, prune_layer: int | None, n_text: int,
                 grid: tuple[int, int], causal: bool, frame_groups: int = 1) -> dict:
    """Per-sample counts of one benchmark variant on one image of (h, w) merged tokens -- or, with ``frame_groups``
    t > 1, one video of t frame-groups of (h, w) each (``video_grid``: t * h * w visual tokens, the ViT on its
    (t, h, w) grid, the VIP attending over all frames jointly) -- for method "full" (no pruning), "mask" (fixed keep
    masks after layer K, no extra tokens) or "glimpse" (plus the glimpse token and the VIP)."""
    n_vis = frame_groups * grid[0] * grid[1]
    n_kept = None if method == "full" else n_kept_for(n_vis, keep)
    gcfg = shape.glimpse_config(prune_layer) if method == "glimpse" else None
    cost = prefill_flops(shape, n_text, n_vis, n_kept, prune_layer, n_extra=1 if gcfg else 0, causal=causal,
                         glimpse=gcfg, grids=[grid] * frame_groups, groups=[0] * frame_groups)
    m = shape.vision.spatial_merge_size
    # the ViT, plus a glimpse variant's projections of the vision taps to the VIP's condition width (run beside it)
    vit = vit_flops(shape.vision, [(frame_groups, grid[0] * m, grid[1] * m)])["total"] + cost.conditions
    return {"prune_layer": prune_layer, "n_vis": n_vis, "n_kept": n_vis if n_kept is None else n_kept,
            "kv_len": cost.kv_len, "equivalent_tokens": cost.equivalent_tokens, "prefill_llm_flops": cost.llm,
            "layers_flops": cost.layers, "vip_flops": cost.vip, "lm_head_flops": cost.lm_head, "vit_flops": vit,
            "vip_condition_flops": cost.conditions,
            "decode_step_flops": decode_step_flops(shape, cost.kv_len), "causal": causal}


# --------------------------------------------------------------------------- video


def video_grid(shape: ModelShape, n_frames: int, width: int, height: int) -> tuple[int, tuple[int, int]]:
    """(t, (h, w)) of a clip of n_frames frames of width x height pixels: t = ceil(n_frames / temporal_patch_size)
    frame-groups (the last one padded), each of h x w merged tokens, h = round(height / (patch * merge)) (at least 1),
    likewise w -- the rounding of the processors' resize, without their pixel budgets (pick a frame size within them).

    >>> from glimpseprune.bench.shapes import load_shape
    >>> video_grid(load_shape("qwen2_5_vl_7b"), 16, 448, 448)
    (8, (16, 16))
    """
    if n_frames < 1 or width < 1 or height < 1:
        raise ValueError(f"a video needs >= 1 frame of >= 1 x 1 px, got {n_frames} frames of {width}x{height}")
    v = shape.vision
    factor = v.patch_size * v.spatial_merge_size
    return -(-n_frames // v.temporal_patch_size), (max(1, round(height / factor)), max(1, round(width / factor)))


def video_text_tokens(shape: ModelShape, n_frames: int, fps: float) -> int:
    """Text tokens a video adds besides its own outer <|vision_start|> / <|vision_end|> (counted in n_text like an
    image's): 0 for Qwen2.5-VL (time is in M-RoPE); for Qwen3-VL, per frame-group its timestamp "<{t:.1f} seconds>"
    (``qwen3_vl_processing.group_times``) and its inner <|vision_start|> / <|vision_end|>. A timestamp is counted as
    the Qwen2 tokenizer splits it: "<", one token per digit, ".", " seconds", ">" (e.g. "<0.2 seconds>": 6 tokens).

    >>> from glimpseprune.bench.shapes import load_shape
    >>> video_text_tokens(load_shape("qwen3_vl_8b"), 16, 2.0)  # 8 groups at 0.2 .. 7.2 s: 8 * (6 + 2)
    64
    """
    if shape.model_type != "qwen3_vl":
        return 0
    from ..adapters.qwen3_vl_processing import group_times

    times = group_times(range(n_frames), fps, shape.vision.temporal_patch_size)
    return sum(len(f"{t:.1f}") + 3 + 2 for t in times)
