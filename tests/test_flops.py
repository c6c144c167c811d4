"""Analytic FLOPs: hand-computed values on small shapes (arithmetic written out), the paper's Table 7 numbers, and
a cross-check against torch.utils.flop_counter.FlopCounterMode on a tiny random Qwen2.5-VL (eager attention, so the
attention products are matmuls the counter sees)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from glimpseprune.bench import flops as F
from glimpseprune.bench.efficiency import FrozenEncodeAdapter, build_model, make_variant, parse_variant, synth_inputs
from glimpseprune.bench.flops import kv_cache_bytes, n_kept_for
from glimpseprune.bench.shapes import ModelShape, TextShape, VIPShape, VisionShape, load_shape
from glimpseprune.config import GlimpseConfig
from glimpseprune.registry import get_adapter
from glimpseprune.runtime.engine import prefill

# hidden 8, 2 layers, 2 query heads / 1 KV head of head_dim 4 (q width 8, kv width 4), intermediate 16, vocab 32
T = TextShape(hidden_size=8, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=16, vocab_size=32)
V = VisionShape(depth=2, hidden_size=4, num_heads=1, intermediate_size=8, out_hidden_size=8, fullatt_blocks=(1,))
SMALL = ModelShape("small", T, V, VIPShape(8, 8, 2, 16), prune_layer=0)


def test_attention_pairs():
    assert F.attention_pairs(3, 0, causal=True) == 6  # 1 + 2 + 3
    assert F.attention_pairs(3, 0, causal=False) == 9  # 3 * 3
    assert F.attention_pairs(1, 5, causal=True) == 6  # one decode query: 5 cached keys + itself
    assert F.attention_pairs(2, 5, causal=True) == 2 * 5 + 3
    assert F.attention_pairs(2, 5, causal=False) == 2 * 7


def test_text_layer_hand_computed():
    f = F.text_layer_flops(T, n_new=3, n_past=0, causal=True)
    q = 2 * 3 * 8 * 8  # 384
    kv = 2 * (2 * 3 * 8 * 4)  # k and v, width 4 (GQA): 384
    o = 2 * 3 * 8 * 8  # 384
    assert f.proj == q + kv + o == 1152
    assert f.attn == 2 * 2 * 8 * 6 == 192  # (QK^T + AV) * q width 8 * 6 causal pairs
    assert f.ffn == 3 * 2 * 3 * 8 * 16 == 2304  # gate, up, down
    assert f.total == 3648
    assert F.text_layer_flops(T, 3, 0, causal=False).attn == 2 * 2 * 8 * 9 == 288


def test_decode_step_hand_computed():
    # one token, 5 cached: proj 2*8*8 + 2*(2*8*4) + 2*8*8 = 384; attn 2*2*8*6 = 192; ffn 3*2*8*16 = 768; head 2*8*32
    assert F.decode_step_flops(SMALL, 5, lm_head=False) == 2 * (384 + 192 + 768) == 2688
    assert F.decode_step_flops(SMALL, 5) == 2688 + 512
    assert F.decode_flops(SMALL, 5, 2) == F.decode_step_flops(SMALL, 5) + F.decode_step_flops(SMALL, 6)


def test_prefill_full_and_pruned_hand_computed():
    full = F.prefill_flops(SMALL, n_text=2, n_vis=4, causal=True)
    assert full.tokens_per_layer == (6, 6) and full.kv_len == 6 and full.equivalent_tokens == 6
    assert full.layers == 2 * F.text_layer_flops(T, 6).total
    assert full.lm_head == 2 * 8 * 32  # the last prompt token only
    # prune after layer 0 keeping 1 of 4 visual tokens, plus one glimpse token in layers 0..K
    cut = F.prefill_flops(SMALL, n_text=2, n_vis=4, n_kept=1, prune_layer=0, n_extra=1, causal=True)
    assert cut.tokens_per_layer == (7, 3) and cut.kv_len == 3
    assert cut.equivalent_tokens == (7 + 3) / 2
    assert cut.layers == F.text_layer_flops(T, 7).total + F.text_layer_flops(T, 3).total
    before = F.prefill_flops(SMALL, n_text=2, n_vis=4, n_kept=1, prune_layer=-1, n_extra=1)
    assert before.tokens_per_layer == (3, 3)  # K = -1: no extra token, every layer on the kept sequence
    with pytest.raises(ValueError):
        F.prefill_flops(SMALL, 2, 4, n_kept=5, prune_layer=0)


def test_vit_hand_computed():
    # (t, h, w) = (1, 10, 12) patches -> 5 x 6 merged tokens; windows of 4 x 4 merged tokens (112 / 14 / 2):
    # row sizes [4, 1], column sizes [4, 2] -> windows of 16, 8, 4, 2 merged = 64, 32, 16, 8 patches
    assert F.vit_attention_pairs(V, (1, 10, 12), window=True) == 64**2 + 32**2 + 16**2 + 8**2 == 5440
    assert F.vit_attention_pairs(V, (1, 10, 12), window=False) == 120**2
    f = F.vit_flops(V, [(1, 10, 12)])
    assert f["patch_embed"] == 2 * 120 * (3 * 2 * 14 * 14) * 4
    assert f["linear"] == 2 * (2 * 120 * 4 * 12 + 2 * 120 * 4 * 4 + 3 * 2 * 120 * 4 * 8)  # 2 blocks
    assert f["window_attn"] == 1 * 2 * 2 * 4 * 5440  # block 0
    assert f["full_attn"] == 1 * 2 * 2 * 4 * 14400  # block 1
    assert f["merger"] == 2 * 30 * 16 * 16 + 2 * 30 * 16 * 8  # 30 merged tokens, 4*4 = 16 wide
    assert f["total"] == sum(v for k, v in f.items() if k != "total")


def test_vip_hand_computed():
    g = GlimpseConfig(base_model_type="qwen2_5_vl", base_hidden_size=8, base_num_layers=2, base_num_heads=2,
                      base_vision_width=4, base_vision_depth=2, prune_layer=0, vision_taps=(1,), vip_width=8,
                      cond_width=8, vip_heads=2, vip_mlp_width=16)
    f = F.vip_flops(g, grids=[(2, 2), (1, 3)], n_keys=10, text=T)  # S = 7 tokens, 16 + 9 = 25 pairs
    inputs = 2 * 7 * 2 * 8  # attention features (2 heads x 1 layer); the condition projection runs in the ViT
    assert f["conditions"] == 2 * 7 * 4 * 8
    # attention: q.k at width 16, p.v at width 16 too (v is padded to the q/k width for the fused kernel)
    block = 2 * (2 * 7 * 16 * 16) + 2 * (2 * 7 * 8 * 8) + 2 * 25 * (16 + 16) + 3 * 2 * 7 * 8 * 16
    assert f["vip"] == inputs + block + 2 * 7 * 8 == 16272
    assert f["glimpse_scores"] == 2 * 8 * 8 + 2 * 8 * 10  # q projection of one token + logits over 10 keys
    assert f["glimpse_vectors"] == 2 * 8 * 8  # one glimpse layer (0) up to K = 0: Linear(8, 8) on one vector
    assert f["total"] == 16272 + 288 + 128


def test_table7_consistency():
    """Qwen2.5-VL-7B, 5041 visual + 33 text = 5074 tokens, pruned after layer 18 to 203 (paper: 5073.9 -> 202.5)."""
    s = load_shape("qwen2_5_vl_7b")
    full = F.prefill_flops(s, 33, 5041, causal=False)
    gp = F.prefill_flops(s, 33, 5041, 170, 18, n_extra=1, causal=False, glimpse=s.glimpse_config(), grids=[(71, 71)])
    assert gp.kv_len == 203
    assert full.layers / 1e12 == pytest.approx(77.8, rel=0.02)  # paper: 77.8 T (mean over samples of n^2 is larger)
    assert gp.llm / full.llm == pytest.approx(0.691, abs=0.005)  # paper: 69.1 %
    assert F.decode_flops(s, 5074, 22, lm_head=False) / 1e9 == pytest.approx(333.4, rel=0.01)  # 22 tokens
    assert F.decode_flops(s, 203, 24, lm_head=False) / 1e9 == pytest.approx(317.4, rel=0.01)  # 24.2 tokens


def test_sweep_monotone():
    s = load_shape("qwen2_5_vl_scaled_cpu")
    rows = F.prune_layer_sweep(s, 64, 2025, 0.04, causal=False)
    assert [r["prune_layer"] for r in rows] == list(range(-1, 8))
    ratios = [r["ratio"] for r in rows]
    assert ratios == sorted(ratios) and ratios[0] < 0.1 and ratios[-1] > 1.0  # K = L-1: glimpse + VIP overhead only
    assert rows[0]["equivalent_tokens"] == 64 + 81


# ------------------------------------------------------------------ FlopCounterMode cross-checks (tiny model)

TINY = ModelShape("tiny", TextShape(64, 2, 4, 2, 96, 512), VisionShape(2, 32, 2, 48, 64, fullatt_blocks=(1,)),
                  VIPShape(16, 16, 2, 32), prune_layer=0)


def _count(fn) -> tuple[int, dict]:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops(), {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}


@pytest.fixture(scope="module")
def eager_model():
    return build_model(TINY, attn="eager")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_decoder_layer_matches_flop_counter(attn, eager_model):
    model = eager_model if attn == "eager" else build_model(TINY, attn="sdpa")
    n, layer = 10, model.model.language_model.layers[0]
    h = torch.randn(1, n, 64)
    rope = model.model.language_model.rotary_emb(h, torch.arange(n).view(1, 1, n).expand(3, 1, n))
    with torch.no_grad():
        total, ops = _count(lambda: layer(h, attention_mask=torch.zeros(1, 1, n, n), position_embeddings=rope))
    want = F.text_layer_flops(TINY.text, n, 0, causal=False)  # explicit mask: every pair is computed
    assert ops["aten.addmm"] + ops["aten.mm"] == want.linear  # q/k/v (with bias: addmm), o and the SwiGLU
    if attn == "eager":  # the attention products are bmm; the counter does not see CPU SDPA kernels
        assert total == want.total


def test_vision_encoder_matches_flop_counter(eager_model):
    inputs = synth_inputs(TINY, (5, 6), 10, 1)  # 10 x 12 patches: windows of several sizes
    with torch.no_grad():
        total, _ = _count(lambda: eager_model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]))
    assert total == F.vit_flops(TINY.vision, [(1, 10, 12)])["total"]


@pytest.mark.parametrize("spec", ["full", "mask:0.25@0", "glimpse:0.25@0"])
def test_engine_prefill_matches_flop_counter(spec, eager_model):
    """The whole LLM prefill through the runtime (ViT replayed) vs prefill_flops(causal=False)."""
    grid, n_text = (4, 4), 10
    inputs = synth_inputs(TINY, grid, n_text, 1)
    v = parse_variant(spec)
    method, request = make_variant(v, TINY, [16], "cpu")
    adapter = FrozenEncodeAdapter(get_adapter(eager_model))
    adapter.prime(eager_model, inputs, method)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):  # the VIP's fused CPU kernel is not in FlopCounterMode's table
        total, _ = _count(lambda: prefill(eager_model, adapter, method, inputs, request))
    K = v.layer(TINY)
    g = TINY.glimpse_config(K) if v.method == "glimpse" else None
    want = F.prefill_flops(TINY, n_text, 16, None if v.method == "full" else 4, K, n_extra=1 if g else 0,
                           causal=False, glimpse=g, grids=[grid])
    assert total == want.llm


# ------------------------------------------------------------------ video


def _g_small():
    return GlimpseConfig(base_model_type="qwen2_5_vl", base_hidden_size=8, base_num_layers=2, base_num_heads=2,
                         base_vision_width=4, base_vision_depth=2, prune_layer=0, vision_taps=(1,), vip_width=8,
                         cond_width=8, vip_heads=2, vip_mlp_width=16)


def test_vip_on_video_attends_over_all_frames_hand_computed():
    """Two frame-groups of one video (2 x 2 each) and an image (1 x 3): with groups the video is one attention span of
    8 tokens, 8^2 + 3^2 = 73 pairs; without, every grid alone: 16 + 16 + 9 = 41 pairs. Only the pairs term moves."""
    g, grids = _g_small(), [(2, 2), (2, 2), (1, 3)]
    joint = F.vip_flops(g, grids, n_keys=14, text=T, groups=[0, 0, 1])
    inputs = 2 * 11 * 2 * 8  # S = 11 tokens
    block = 2 * (2 * 11 * 16 * 16) + 2 * (2 * 11 * 8 * 8) + 2 * 73 * (16 + 16) + 3 * 2 * 11 * 8 * 16
    assert joint["vip"] == inputs + block + 2 * 11 * 8 == 27728
    alone = F.vip_flops(g, grids, n_keys=14, text=T)
    assert joint["vip"] - alone["vip"] == 2 * (73 - 41) * (16 + 16) == 2048
    assert F.vip_flops(g, grids, 14, T, groups=[0, 1, 2]) == alone
    assert joint["conditions"] == alone["conditions"] and joint["glimpse_scores"] == alone["glimpse_scores"]


def test_video_grid_and_text_tokens_hand_computed():
    s7, s8 = load_shape("qwen2_5_vl_7b"), load_shape("qwen3_vl_8b")
    assert F.video_grid(s7, 16, 448, 448) == (8, (16, 16))  # 28 px per merged token, 2 frames per group
    assert F.video_grid(s7, 5, 300, 200) == (3, (7, 11))  # 5 frames: the last group padded; 200 / 28 = 7.1, 10.7
    assert F.video_grid(s8, 16, 448, 448) == (8, (14, 14))  # 32 px per merged token
    with pytest.raises(ValueError):
        F.video_grid(s8, 0, 448, 448)
    assert F.video_text_tokens(s7, 16, 2.0) == 0  # Qwen2.5-VL: time is in M-RoPE, no text
    # Qwen3-VL, per group "<t seconds>" = "<", digits, ".", digit, " seconds", ">" plus the group's start / end
    assert F.video_text_tokens(s8, 16, 2.0) == 8 * (6 + 2)  # 0.2 .. 7.2 s: one integer digit each
    assert F.video_text_tokens(s8, 12, 0.25) == (6 + 2) + 5 * (7 + 2)  # 2.0 s, then 10.0 .. 42.0 s


def test_video_variant_hand_computed():
    """One video of 3 frame-groups of 2 x 3 merged tokens on SMALL: 18 visual tokens, the ViT on its (3, 4, 6) patch
    grid == three images of (1, 4, 6), the VIP over all 18 tokens at once."""
    video = F.variant_cost(SMALL, "glimpse", 0.25, 0, 5, (2, 3), causal=True, frame_groups=3)
    assert video["n_vis"] == 18 and video["n_kept"] == 4 and video["kv_len"] == 5 + 4
    vit = F.vit_flops(V, [(3, 4, 6)])
    g = SMALL.glimpse_config(0)
    # the VIP's projections of the taps (one per VIP block, tap width -> condition width, 18 tokens) run beside the ViT
    cond = g.n_vip_layers * 2 * 18 * g.base_vision_width * g.cond_width
    assert video["vip_condition_flops"] == cond > 0
    assert video["vit_flops"] - cond == vit["total"] == F.vit_flops(V, [(1, 4, 6)] * 3)["total"]
    P = 72  # patches: 3 groups x 4 x 6; one window of 24 patches per frame (2 x 3 merged < 4 x 4)
    assert vit["window_attn"] == vit["full_attn"] == 2 * 2 * 4 * (3 * 24**2)
    assert vit["merger"] == 2 * 18 * 16 * 16 + 2 * 18 * 16 * 8 and vit["patch_embed"] == 2 * P * (3 * 2 * 14 * 14) * 4
    assert video["vip_flops"] == F.vip_flops(g, [(2, 3)] * 3, 5 + 18 + 1, T, [0, 0, 0])["total"]
    per_frame = F.vip_flops(g, [(2, 3)] * 3, 5 + 18 + 1, T)["total"]
    assert g.n_vip_layers == 2  # two VIP blocks, each with the pairs term at q/k width 8 + 8
    assert video["vip_flops"] - per_frame == 2 * (2 * (18**2 - 3 * 6**2) * (16 + 16)) == 27648
    want = F.prefill_flops(SMALL, 5, 18, 4, 0, n_extra=1, causal=True, glimpse=g, grids=[(2, 3)] * 3,
                           groups=[0, 0, 0])
    assert video["prefill_llm_flops"] == want.llm and want.tokens_per_layer == (5 + 18 + 1, 5 + 4)
    image = F.variant_cost(SMALL, "glimpse", 0.25, 0, 5, (2, 3), causal=True)
    assert image["n_vis"] == 6 and image["vit_flops"] == F.vit_flops(V, [(1, 4, 6)])["total"] + cond // 3
    full = F.variant_cost(SMALL, "full", None, None, 5, (2, 3), causal=True)
    assert full["vit_flops"] == F.vit_flops(V, [(1, 4, 6)])["total"] and full["vip_condition_flops"] == 0


def _video_inputs(shape, grid, t, n_text, seed=0) -> dict:
    """Processor-like Qwen2.5-VL inputs of one video: t frame-groups of (h, w) merged tokens in one placeholder run."""
    ids, v, (h, w), m = shape.token_ids(), shape.vision, grid, shape.vision.spatial_merge_size
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, min(ids.values()), (1, n_text - 2), generator=g)
    vid = torch.full((1, t * h * w), ids["video"])
    input_ids = torch.cat([text[:, :3], torch.full((1, 1), ids["vision_start"]), vid,
                           torch.full((1, 1), ids["vision_end"]), text[:, 3:]], dim=1)
    pixels = torch.randn(t * h * w * m * m, v.in_channels * v.temporal_patch_size * v.patch_size ** 2, generator=g)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "mm_token_type_ids": (input_ids == ids["video"]).long() * 2, "pixel_values_videos": pixels,
            "video_grid_thw": torch.tensor([[t, h * m, w * m]]), "second_per_grid_ts": torch.tensor([1.0])}


def test_video_vit_matches_flop_counter(eager_model):
    """The eager ViT on a video of 3 frame-groups of 10 x 12 patches (windows within each frame) == vit_flops."""
    pixels = torch.randn(3 * 120, 3 * 2 * 14 * 14)
    with torch.no_grad():
        total, _ = _count(lambda: eager_model.model.visual(pixels, grid_thw=torch.tensor([[3, 10, 12]])))
    assert total == F.vit_flops(TINY.vision, [(3, 10, 12)])["total"]


@pytest.mark.parametrize("spec", ["full", "glimpse:0.25@0"])
def test_engine_prefill_on_video_matches_flop_counter(spec, eager_model):
    """The LLM prefill of a 3-frame-group video through the runtime (the glimpse VIP scoring the video jointly) vs
    prefill_flops with the video's grids and groups (causal=False)."""
    grid, t, n_text = (2, 3), 3, 10
    inputs = _video_inputs(TINY, grid, t, n_text)
    v = parse_variant(spec)
    method, request = make_variant(v, TINY, [18], "cpu")
    adapter = FrozenEncodeAdapter(get_adapter(eager_model))
    adapter.prime(eager_model, inputs, method)
    assert adapter.encode(eager_model, inputs, tuple(method.vision_taps())).grid_groups == [0, 0, 0]
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        total, _ = _count(lambda: prefill(eager_model, adapter, method, inputs, request))
    K = v.layer(TINY)
    g = TINY.glimpse_config(K) if v.method == "glimpse" else None
    want = F.prefill_flops(TINY, n_text, 18, None if v.method == "full" else 4, K, n_extra=1 if g else 0,
                           causal=False, glimpse=g, grids=[grid] * t, groups=[0] * t)
    assert total == want.llm
    assert total == F.variant_cost(TINY, v.method, v.keep, K, n_text, grid, causal=False, frame_groups=t)[
        "prefill_llm_flops"]


def test_docstring_examples():
    import doctest

    assert doctest.testmod(F, verbose=False).failed == 0


# mutation audit: rules a one-line change could break unnoticed

def test_kv_cache_bytes_counts_keys_and_values():
    t = TextShape(hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128,
                  vocab_size=100)
    assert kv_cache_bytes(t, kv_len=10, bytes_per_value=2, batch=1) == 2 * 3 * (2 * 16) * 10 * 2


def test_n_kept_for_never_exceeds_the_visual_tokens():
    assert n_kept_for(3, 0.5, min_keep=5) == 3
    assert n_kept_for(10, 0.25) == 2


def test_vip_with_two_attention_layers_hand_computed():
    """A module fed by two LLM layers (upstream ``selected_layers``, e.g. attn_layers=(0, 1)): the VIP's input
    projection reads 2 layers x 2 heads = 4 attention columns, and the glimpse query's logits are recomputed at both
    layers."""
    g = GlimpseConfig(base_model_type="qwen2_5_vl", base_hidden_size=8, base_num_layers=2, base_num_heads=2,
                      base_vision_width=4, base_vision_depth=2, prune_layer=1, attn_layers=(0, 1), vision_taps=(1,),
                      vip_width=8, cond_width=8, vip_heads=2, vip_mlp_width=16)
    f = F.vip_flops(g, grids=[(2, 2)], n_keys=10, text=T)  # S = 4 tokens, 4^2 = 16 pairs
    inputs = 2 * 4 * (2 * 2) * 8  # 256: (S x 4 attention columns) @ (4 x 8)
    block = 2 * (2 * 4 * 16 * 16) + 2 * (2 * 4 * 8 * 8) + 2 * 16 * (16 + 16) + 3 * 2 * 4 * 8 * 16  # 9216, one block
    assert f["vip"] == inputs + block + 2 * 4 * 8 == 9536
    assert f["glimpse_scores"] == 2 * (2 * 8 * 8 + 2 * 8 * 10) == 576  # q projection + logits, at each of 2 layers
    assert f["glimpse_vectors"] == 2 * (2 * 8 * 8) == 256  # glimpse layers 0 and 1, both <= K = 1
    assert f["total"] == 9536 + 576 + 256


def test_text_layer_with_head_dim_not_hidden_over_heads_hand_computed():
    """head_dim 8 with hidden 8 and 2 heads (as Qwen3-VL-4B / 32B: q width 4096 / 8192 != hidden 2560 / 5120):
    q and o have width num_heads * head_dim = 16, k and v num_kv_heads * head_dim = 8, the attention products 16."""
    t = TextShape(hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=16, vocab_size=32,
                  head_dim=8)
    f = F.text_layer_flops(t, n_new=3, n_past=0, causal=True)
    assert f.proj == 2 * 3 * 8 * 16 + 2 * (2 * 3 * 8 * 8) + 2 * 3 * 16 * 8 == 2304  # q (8 -> 16), k, v (8 -> 8), o
    assert f.attn == 2 * 2 * 16 * 6 == 384  # (QK^T + AV) at q width 16, 6 causal pairs
    assert f.ffn == 3 * 2 * 3 * 8 * 16 == 2304


def test_sweep_rows_hand_computed():
    """prune_layer_sweep on SMALL (2 layers), 2 text + 4 visual tokens, 1 kept, causal. Per layer on n tokens:
    linear 2 * (8*8 + 2*8*4 + 8*8 + 3*8*16) = 1152 per token, attention 2 * 2 * 8 = 32 per pair (n (n+1) / 2 pairs):
    n = 7: 8064 + 32 * 28 = 8960; n = 6: 6912 + 32 * 21 = 7584; n = 3: 3456 + 32 * 6 = 3648. LM head 2 * 8 * 32."""
    head = 2 * 8 * 32  # 512
    full = 2 * 7584 + head  # 15680
    # VIP of SMALL.glimpse_config(K): taps (1, 0) -> 2 blocks; one grid of 1 x 4, S = 4, 16 pairs; 7 keys (6 + glimpse)
    block = 2 * (2 * 4 * 16 * 16) + 2 * (2 * 4 * 8 * 8) + 2 * 16 * (16 + 16) + 3 * 2 * 4 * 8 * 16  # 9216
    vip = 2 * 4 * 2 * 8 + 2 * block + 2 * 4 * 8  # attention inputs (1 layer x 2 heads), 2 blocks, output
    assert vip == 18624
    scores = 2 * 8 * 8 + 2 * 8 * 7  # 240
    rows = F.prune_layer_sweep(SMALL, n_text=2, n_vis=4, keep_frac=0.25, causal=True)
    assert [(r["prune_layer"], r["n_kept"], r["kv_len"], r["equivalent_tokens"]) for r in rows] == [
        (-1, 1, 3, 3.0), (0, 1, 3, (7 + 3) / 2), (1, 1, 3, 7.0)]  # the cache holds 2 + 1 whatever K, even K = L - 1
    assert rows[0]["prefill_flops"] == 2 * 3648 + head == 7808  # K = -1: no glimpse token, no VIP
    assert rows[1]["prefill_flops"] == 8960 + 3648 + head + vip + scores + 128 == 32112  # one glimpse vector (layer 0)
    assert rows[2]["prefill_flops"] == 2 * 8960 + head + vip + scores + 2 * 128 == 37552  # two glimpse vectors
    assert rows[1]["vip_flops"] == vip + scores + 128
    assert [r["ratio"] for r in rows] == [7808 / full, 32112 / full, 37552 / full]


def test_variant_decode_step_and_vit_in_prefill_hand_computed():
    """variant_cost's decode step runs on the compacted cache (kv_len), and prefill_flops(include_vit=True) adds the
    ViT on the merged grid's patches (2 x 2 merged -> 4 x 4 patches) plus the VIP's condition projections."""
    # one decode token on SMALL with c cached: per layer 1152 (linear) + 32 * (c + 1) (pairs); 2 layers; head 512
    glimpse = F.variant_cost(SMALL, "glimpse", 0.25, 0, 2, (2, 2), causal=True)
    assert glimpse["kv_len"] == 2 + 1
    assert glimpse["decode_step_flops"] == 2 * (1152 + 32 * (3 + 1)) + 512 == 3072
    full = F.variant_cost(SMALL, "full", None, None, 2, (2, 2), causal=True)
    assert full["decode_step_flops"] == 2 * (1152 + 32 * (6 + 1)) + 512 == 3264
    # ViT on (1, 4, 4) patches, P = 16: patch embed, 2 blocks of qkv / proj / SwiGLU, one 2 x 2 merged window (16
    # patches, 256 pairs) in block 0 and the full image (256 pairs) in block 1, merger on 4 merged tokens of width 16
    vit = (2 * 16 * (3 * 2 * 14 * 14) * 4 + 2 * (2 * 16 * 4 * 12 + 2 * 16 * 4 * 4 + 3 * 2 * 16 * 4 * 8)
           + 2 * 2 * 4 * 256 + 2 * 2 * 4 * 256 + 2 * 4 * 16 * 16 + 2 * 4 * 16 * 8)
    assert vit == 172032 == F.vit_flops(V, [(1, 4, 4)])["total"]
    cond = 2 * (2 * 4 * 4 * 8)  # 2 taps, 4 visual tokens, tap width 4 -> condition width 8
    cost = F.prefill_flops(SMALL, 2, 4, 1, 0, n_extra=1, glimpse=SMALL.glimpse_config(0), grids=[(2, 2)],
                           include_vit=True)
    assert cost.conditions == cond and cost.vit == vit + cond == 172544
