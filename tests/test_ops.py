"""Pure ops and modules: token selection, 2D RoPE, the VIP, and the released architecture's parameter counts."""

from __future__ import annotations

import doctest

import pytest
import torch

import glimpseprune.ops.select as select_mod
from glimpseprune.config import GlimpseConfig, SelectionConfig, preset
from glimpseprune.modules.glimpse import GlimpseModule
from glimpseprune.modules.vip import VIP
from glimpseprune.ops.rope2d import apply_rope, grid_positions, rope2d_angles
from glimpseprune.ops.select import select_tokens, select_with


def kept(mask: torch.Tensor) -> list[int]:
    return torch.nonzero(mask).flatten().tolist()


def top_indices(probs: torch.Tensor, k: int) -> list[int]:
    return sorted(torch.argsort(probs, descending=True)[:k].tolist())


# ----------------------------------------------------------------------------------------------------- selection


def test_select_docstring_examples():
    result = doctest.testmod(select_mod, verbose=False)
    assert result.attempted >= 2 and result.failed == 0


def test_threshold_keeps_exactly_strictly_greater():
    probs = torch.tensor([0.9, 0.5, 0.50001, 0.2, 0.7, 0.49999, 0.0, 1.0])
    mask = select_tokens(probs, threshold=0.5, min_keep=0)
    assert mask.dtype == torch.bool and mask.shape == probs.shape
    assert kept(mask) == [0, 2, 4, 7]  # 0.5 itself is not > 0.5
    assert mask.tolist() == (probs > 0.5).tolist()


@pytest.mark.parametrize("threshold", [0.0, 0.25, 0.6, 0.95])
def test_threshold_matches_rule_on_random_scores(threshold):
    g = torch.Generator().manual_seed(1)
    probs = torch.rand(97, generator=g)
    mask = select_tokens(probs, threshold=threshold, min_keep=0)
    assert torch.equal(mask, probs > threshold)


def test_threshold_one_keeps_nothing_without_floor():
    probs = torch.tensor([1.0, 0.99, 0.3])
    assert kept(select_tokens(probs, threshold=1.0, min_keep=0)) == []


def test_max_keep_ratio_caps_to_floor_ratio_n_highest():
    g = torch.Generator().manual_seed(2)
    probs = 0.6 + 0.4 * torch.rand(10, generator=g)  # every token passes threshold 0.5
    mask = select_tokens(probs, threshold=0.5, max_keep_ratio=0.35)  # floor(3.5) = 3
    assert int(mask.sum()) == 3
    assert kept(mask) == top_indices(probs, 3)


def test_max_keep_ratio_only_caps_never_adds():
    probs = torch.tensor([0.9, 0.1, 0.8, 0.2, 0.3, 0.1, 0.0, 0.4, 0.45, 0.05])
    mask = select_tokens(probs, threshold=0.5, max_keep_ratio=0.5)  # 2 pass, cap 5: unchanged
    assert kept(mask) == [0, 2]


def test_max_keep_ratio_cap_among_passing_is_the_top_scorers():
    probs = torch.tensor([0.55, 0.99, 0.1, 0.8, 0.6, 0.7, 0.2, 0.3])
    mask = select_tokens(probs, threshold=0.5, max_keep_ratio=0.25)  # 5 pass, cap floor(2.0) = 2
    assert kept(mask) == [1, 3]


def test_min_keep_floor_keeps_top_scorers_when_nothing_passes():
    probs = torch.tensor([0.1, 0.3, 0.05, 0.2, 0.25])
    assert kept(select_tokens(probs, threshold=0.5, min_keep=1)) == [1]
    assert kept(select_tokens(probs, threshold=0.5, min_keep=3)) == [1, 3, 4]
    assert kept(select_tokens(probs, threshold=0.5, min_keep=0)) == []


def test_min_keep_tops_up_partial_pass_with_next_best():
    probs = torch.tensor([0.9, 0.4, 0.3, 0.2])
    assert kept(select_tokens(probs, threshold=0.5, min_keep=3)) == [0, 1, 2]


def test_min_keep_beyond_n_keeps_everything():
    probs = torch.tensor([0.1, 0.2])
    assert select_tokens(probs, threshold=0.9, min_keep=5).all()


def test_min_keep_wins_over_a_zero_cap():
    probs = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.95])
    mask = select_tokens(probs, threshold=0.5, max_keep_ratio=0.1, min_keep=1)  # cap floor(0.5) = 0
    assert kept(mask) == [4]


@pytest.mark.parametrize(
    "n, ratio, min_keep",
    [(10, 0.25, 1), (10, 0.05, 1), (10, 0.05, 0), (7, 1.0, 1), (100, 0.333, 1), (16, 0.5, 12), (3, 0.5, 9)],
)
def test_fixed_keep_ratio_keeps_exactly_max_minkeep_floor(n, ratio, min_keep):
    g = torch.Generator().manual_seed(n)
    probs = torch.rand(n, generator=g)
    expected_k = min(n, max(min_keep, int(ratio * n)))
    mask = select_tokens(probs, fixed_keep_ratio=ratio, min_keep=min_keep)
    assert int(mask.sum()) == expected_k
    assert kept(mask) == top_indices(probs, expected_k)


def test_fixed_keep_ratio_ignores_threshold_and_refuses_a_cap():
    probs = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.1, 0.05, 0.02, 0.01])
    # threshold 0.95 would keep nothing; fixed ratio 0.5 keeps 4
    mask = select_tokens(probs, threshold=0.95, fixed_keep_ratio=0.5)
    assert kept(mask) == [0, 1, 2, 3]
    # a cap beside a fixed ratio would be ignored (it was, silently): refused
    with pytest.raises(ValueError, match="max_keep_ratio 0.125 would be ignored"):
        select_tokens(probs, threshold=0.95, max_keep_ratio=0.125, fixed_keep_ratio=0.5)


def test_ties_still_keep_exact_counts():
    probs = torch.full((10,), 0.7)
    assert int(select_tokens(probs, fixed_keep_ratio=0.3).sum()) == 3
    assert int(select_tokens(probs, threshold=0.5, max_keep_ratio=0.4).sum()) == 4
    assert int(select_tokens(torch.full((10,), 0.2), threshold=0.5, min_keep=2).sum()) == 2


def test_single_token():
    low, high = torch.tensor([0.1]), torch.tensor([0.9])
    assert select_tokens(low, threshold=0.5).tolist() == [True]  # min_keep=1 default
    assert select_tokens(low, threshold=0.5, min_keep=0).tolist() == [False]
    assert select_tokens(high, threshold=0.5, min_keep=0).tolist() == [True]
    assert select_tokens(low, fixed_keep_ratio=0.5).tolist() == [True]  # max(1, floor(0.5)) = 1
    assert select_tokens(low, fixed_keep_ratio=0.5, min_keep=0).tolist() == [False]
    assert select_tokens(high, threshold=0.5, max_keep_ratio=0.5, min_keep=0).tolist() == [False]  # cap 0


def test_empty_input():
    empty = torch.empty(0)
    assert select_tokens(empty).shape == (0,)
    assert select_tokens(empty, fixed_keep_ratio=0.5).shape == (0,)


def test_budget_is_joint_over_the_images_of_a_sample():
    # image A (6 tokens) scores high, image B (4 tokens) low: a joint budget spends it all on A
    probs = torch.cat([torch.linspace(0.6, 0.9, 6), torch.linspace(0.1, 0.4, 4)])
    assert kept(select_tokens(probs, fixed_keep_ratio=0.5)) == [1, 2, 3, 4, 5]  # all from A
    assert kept(select_tokens(probs, threshold=0.5, max_keep_ratio=0.3)) == [3, 4, 5]
    assert kept(select_tokens(probs, threshold=0.95, min_keep=2)) == [4, 5]


def test_select_rejects_bad_input():
    with pytest.raises(ValueError, match="1-D"):
        select_tokens(torch.rand(2, 3))
    with pytest.raises(ValueError, match="threshold"):
        select_tokens(torch.rand(3), threshold=1.5)
    with pytest.raises(ValueError, match="fixed_keep_ratio"):
        select_tokens(torch.rand(3), fixed_keep_ratio=0.0)


def test_select_with_uses_config_knobs():
    g = torch.Generator().manual_seed(3)
    probs = torch.rand(40, generator=g)
    for cfg in (
        SelectionConfig(),
        SelectionConfig(threshold=0.2, max_keep_ratio=0.3),
        SelectionConfig(threshold=0.99, min_keep=4),
        SelectionConfig(fixed_keep_ratio=0.1, min_keep=0),
    ):
        expected = select_tokens(probs, cfg.threshold, cfg.max_keep_ratio, cfg.min_keep, cfg.fixed_keep_ratio)
        assert torch.equal(select_with(cfg, probs), expected)
    assert int(select_with(SelectionConfig(fixed_keep_ratio=0.1, min_keep=0), probs).sum()) == 4


def test_top_k_steps_rank_by_the_logits_not_the_saturated_probabilities():
    """fp32 sigmoid is exactly 1.0 above a logit of ~16.6 and 0.0 below ~-104: the fixed count, the cap and the floor
    rank by ``rank`` (the logits) so that they keep the most confident tokens, not any of the tied ones."""
    logits = torch.tensor([20.0, 30.0, 25.0, 18.0, -1.0, 2.0, 40.0, 17.0])
    probs = torch.sigmoid(logits)
    assert int((probs == 1.0).sum()) == 6  # the ties the probabilities alone cannot order
    assert kept(select_tokens(probs, fixed_keep_ratio=0.25, rank=logits)) == [1, 6]
    assert kept(select_tokens(probs, threshold=0.5, max_keep_ratio=0.25, rank=logits)) == [1, 6]
    low = torch.tensor([-120.0, -110.0, -200.0, -105.0])
    assert kept(select_tokens(torch.sigmoid(low), min_keep=1, rank=low)) == [3]
    assert kept(select_with(SelectionConfig(fixed_keep_ratio=0.25), probs, rank=logits)) == [1, 6]
    with pytest.raises(ValueError, match="rank must have the shape"):
        select_tokens(probs, rank=logits[:3])


def test_ties_go_to_the_lower_index():
    assert kept(select_tokens(torch.full((6,), 0.7), fixed_keep_ratio=0.5)) == [0, 1, 2]
    assert kept(select_tokens(torch.tensor([0.2, 0.9, 0.9, 0.9]), threshold=0.5, max_keep_ratio=0.5)) == [1, 2]


def test_select_low_precision_probs():
    probs = torch.tensor([0.9, 0.2, 0.6, 0.1], dtype=torch.bfloat16)
    assert kept(select_tokens(probs, fixed_keep_ratio=0.5)) == [0, 2]


# ---------------------------------------------------------------------------------------------------------- rope2d


def test_grid_positions_raster_order():
    assert grid_positions(2, 3).tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]


def test_rope2d_angles_layout():
    head_dim = 16
    pos = torch.tensor([[3, 0], [0, 5]])
    ang = rope2d_angles(pos, head_dim)
    assert ang.shape == (2, head_dim)
    q = head_dim // 4
    assert torch.equal(ang[:, : head_dim // 2], ang[:, head_dim // 2 :])  # duplicated halves
    assert torch.all(ang[0, q : 2 * q] == 0) and torch.all(ang[0, :q] != 0)  # row-only position: col part zero
    assert torch.all(ang[1, :q] == 0) and torch.all(ang[1, q : 2 * q] != 0)  # col-only position: row part zero
    with pytest.raises(ValueError, match="divisible by 4"):
        rope2d_angles(pos, 6)


def test_rope_preserves_norms():
    g = torch.Generator().manual_seed(4)
    pos = grid_positions(5, 7)
    x = torch.randn(3, pos.shape[0], 32, generator=g)
    y = apply_rope(x, rope2d_angles(pos, 32))
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y[:, 1:], x[:, 1:])  # it actually rotates (position (0,0) is the identity)
    torch.testing.assert_close(y[:, 0], x[:, 0])


def _rope_dot(q, k, p_q, p_k, head_dim):
    pos = torch.tensor([p_q, p_k])
    ang = rope2d_angles(pos, head_dim)
    rq = apply_rope(q[None], ang[0:1])[0]
    rk = apply_rope(k[None], ang[1:2])[0]
    return torch.dot(rq.double(), rk.double()).item()


def test_rope_dot_depends_only_on_relative_offset():
    head_dim = 32
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(head_dim, generator=g), torch.randn(head_dim, generator=g)
    base = _rope_dot(q, k, (1, 2), (3, 5), head_dim)
    for shift in [(4, 7), (0, 9), (11, 0), (6, 6)]:
        moved = _rope_dot(q, k, (1 + shift[0], 2 + shift[1]), (3 + shift[0], 5 + shift[1]), head_dim)
        assert moved == pytest.approx(base, rel=1e-4, abs=1e-4)
    # the offset itself matters, along each axis separately
    assert _rope_dot(q, k, (1, 2), (4, 5), head_dim) != pytest.approx(base, rel=1e-3, abs=1e-3)
    assert _rope_dot(q, k, (1, 2), (3, 6), head_dim) != pytest.approx(base, rel=1e-3, abs=1e-3)
    assert _rope_dot(q, k, (1, 2), (1, 2), head_dim) == pytest.approx(torch.dot(q, k).item(), rel=1e-4, abs=1e-4)


# -------------------------------------------------------------------------------------------------------------- VIP


def tiny_vip_config(**kw) -> GlimpseConfig:
    fields = dict(
        base_model_type="test", base_hidden_size=16, base_num_layers=4, base_num_heads=3, base_vision_width=8,
        base_vision_depth=4, prune_layer=2, vision_taps=(3, 1), vip_width=16, cond_width=16, vip_heads=2,
        vip_mlp_width=32,
    )
    return GlimpseConfig(**{**fields, **kw})


def vip_inputs(cfg: GlimpseConfig, n_tok: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    attn = torch.randn(n_tok, len(cfg.attn_layers) * cfg.base_num_heads, generator=g)
    conds = [torch.randn(n_tok, cfg.base_vision_width, generator=g) for _ in cfg.vision_taps]
    return attn, conds


@pytest.fixture(scope="module")
def vip():
    torch.manual_seed(0)
    return GlimpseModule(tiny_vip_config()).vip.eval()


def test_vip_one_finite_logit_per_token(vip):
    cfg = tiny_vip_config()
    grids = [(2, 3), (3, 2), (1, 1)]
    attn, conds = vip_inputs(cfg, 13, seed=0)
    with torch.no_grad():
        out = vip(attn, conds, grids)
    assert out.shape == (13,) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert out.std() > 0


def test_vip_images_are_independent(vip):
    cfg = tiny_vip_config()
    grids = [(2, 3), (3, 4)]  # image A: 6 tokens, image B: 12
    n_a = 6
    attn, conds = vip_inputs(cfg, 18, seed=1)
    attn2, conds2 = attn.clone(), [c.clone() for c in conds]
    g = torch.Generator().manual_seed(2)
    attn2[n_a:] = torch.randn(12, attn.shape[1], generator=g)
    for c in conds2:
        c[n_a:] = torch.randn(12, c.shape[1], generator=g)
    with torch.no_grad():
        out1 = vip(attn, conds, grids)
        out2 = vip(attn2, conds2, grids)
        alone = vip(attn[:n_a], [c[:n_a] for c in conds], grids[:1])
    torch.testing.assert_close(out2[:n_a], out1[:n_a], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(alone, out1[:n_a], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out2[n_a:], out1[n_a:])  # B's logits do depend on B's features


def test_vip_tokens_within_an_image_interact(vip):
    cfg = tiny_vip_config()
    attn, conds = vip_inputs(cfg, 6, seed=3)
    attn2 = attn.clone()
    attn2[5] += 1.0
    with torch.no_grad():
        out1, out2 = vip(attn, conds, [(2, 3)]), vip(attn2, conds, [(2, 3)])
    assert not torch.allclose(out1[:5], out2[:5])  # global attention within the image


def test_vip_rejects_mismatched_inputs(vip):
    cfg = tiny_vip_config()
    attn, conds = vip_inputs(cfg, 6, seed=4)
    with pytest.raises(ValueError, match="image grids hold 9"):
        vip(attn, conds, [(3, 3)])
    with pytest.raises(ValueError, match="expects 2 vision features, got 1"):
        vip(attn, conds[:1], [(2, 3)])


def test_vip_depth_follows_vision_taps():
    assert len(VIP(tiny_vip_config(vision_taps=(3, 2, 1))).layers) == 3


# ------------------------------------------------------------------------------------------- released parameter counts


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    "name, vip_params, glimpse_params",
    [("qwen2_5_vl_7b", 9_454_081, 12_952_576), ("qwen2_5_vl_3b", 9_451_009, 4_272_128)],
)
def test_released_parameter_counts(name, vip_params, glimpse_params):
    # Upstream reports the VIP ("attn_fuser", last output head only) and the glimpse-token part
    # (learnable_embeddings + le_proj + le_norm) separately; our module holds both.
    cfg = preset(name)
    with torch.device("meta"):
        mod = GlimpseModule(cfg)
    assert n_params(mod.vip) == vip_params
    assert n_params(mod) - n_params(mod.vip) == glimpse_params
    assert n_params(mod) == vip_params + glimpse_params
    assert len(mod.vip.layers) == 4
    assert mod.glimpse_embeddings.shape == (cfg.base_num_layers, 1, cfg.base_hidden_size)


def test_ratio_floor_tolerates_float_error():
    # 0.29 * 100 is 28.999... in floating point; the documented floor(r * n) is 29
    probs = torch.linspace(0.0, 1.0, 100)
    assert int(select_tokens(probs, fixed_keep_ratio=0.29).sum()) == 29
    assert int(select_tokens(probs, threshold=0.0, max_keep_ratio=0.29).sum()) == 29


def test_farthest_point_fill_keeps_the_seed_then_the_farthest_rows():
    from glimpseprune.ops.diversity import farthest_point_fill, farthest_point_select

    pts = torch.tensor([[1.0, 0.0], [0.99, 0.14], [0.0, 1.0], [-1.0, 0.05], [0.0, -1.0]])
    seed = torch.tensor([True, False, False, False, False])
    # from row 0 (angle 0): row 3 (~177 degrees) is farthest; then, from {0, 3}, row 2 is at min(1, ~0.95) and
    # row 4 at min(1, ~1.05) = 1: row 4
    assert farthest_point_fill(pts, seed, 2).tolist() == [True, False, False, True, False]
    assert farthest_point_fill(pts, seed, 3).tolist() == [True, False, False, True, True]
    assert farthest_point_fill(pts, seed, 1).tolist() == seed.tolist()  # the seed fills the budget
    assert farthest_point_fill(pts, seed, 9).all()  # k clipped to n
    none = torch.zeros(5, dtype=torch.bool)
    assert int(farthest_point_fill(pts, none, 1).nonzero()) == int(farthest_point_select(pts, 1))
    with pytest.raises(ValueError, match="more than the 1 to keep"):
        farthest_point_fill(pts, torch.tensor([True, True, False, False, False]), 1)


def test_farthest_point_fill_holds_no_rows_by_seeds_matrix():
    """The distances of every row to the seed were one (n, s) matrix, and s grows with the budget (so with n): 178 MB
    twice at 20k tokens. Now CHUNK rows at a time, with the same picks as the whole matrix gives."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from glimpseprune.ops.diversity import CHUNK, farthest_point_fill, unit_rows

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.numel = max(self.numel, t.numel())
            return out

    g = torch.Generator().manual_seed(0)
    n, s = 3 * CHUNK, 600
    x = torch.randn(n, 8, generator=g)
    seed = torch.zeros(n, dtype=torch.bool)
    seed[torch.randperm(n, generator=g)[:s]] = True
    with Largest() as big:
        keep = farthest_point_fill(x, seed, s + 3)
    assert big.numel <= CHUNK * s, big.numel
    u = unit_rows(x)  # the whole-matrix reference of the first pick
    dist = (1.0 - u @ u[seed].T).amin(dim=1).masked_fill(seed, float("-inf"))
    assert bool(keep[int(dist.argmax())]) and int(keep.sum()) == s + 3 and bool(keep[seed].all())


def test_rope2d_angles_by_hand():
    """head_dim 8: two frequencies per axis, theta^(-0/4) = 1 and theta^(-2/4) = 1/100 for theta = 10^4. Position
    (row 2, col 3): [2, 0.02 | 3, 0.03] (row angles, then column angles), the whole duplicated for the two halves."""
    ang = rope2d_angles(torch.tensor([[2, 3]]), 8)
    torch.testing.assert_close(ang, torch.tensor([[2.0, 0.02, 3.0, 0.03, 2.0, 0.02, 3.0, 0.03]]))


def test_apply_rope_rotates_each_pair_forwards():
    """head_dim 4 pairs dimension i with i + 2 (rotate-half layout). A quarter turn of the pair (0, 2) sends e_0 to
    e_2 and e_2 to -e_0 (x cos + rotate_half(x) sin, rotate_half([a, b, c, d]) = [-c, -d, a, b]); the pair (1, 3) at
    angle 0 is untouched."""
    ang = torch.tensor([[torch.pi / 2, 0.0, torch.pi / 2, 0.0]])
    out = apply_rope(torch.tensor([[1.0, 5.0, 0.0, 7.0], [0.0, 5.0, 1.0, 7.0]])[:, None], ang)
    torch.testing.assert_close(out[:, 0], torch.tensor([[0.0, 5.0, 1.0, 7.0], [-1.0, 5.0, 0.0, 7.0]]))


# mutation audit: the VIP against its definition written out by hand


def _rms(x, norm):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def _naive_vip(vip, act, attn, conds, grids, groups=None):
    """The VIP from its definition, one attention span (an image, or a video's frames) and one head at a time, with
    an explicit softmax; each frame's 2D RoPE from ``rope2d_angles`` / ``apply_rope`` (checked by hand above) on its
    own (row, col) grid; the activation is transformers' ACT2FN of the config's ``vip_act``."""
    from transformers.activations import ACT2FN

    groups = list(range(len(grids))) if groups is None else groups
    spans, start = [], 0  # (token slice, (n, 2) positions) per span
    for i, (h, w) in enumerate(grids):
        if i and groups[i] == groups[i - 1]:
            sl, pos = spans[-1]
            spans[-1] = (slice(sl.start, start + h * w), torch.cat([pos, grid_positions(h, w)]))
        else:
            spans.append((slice(start, start + h * w), grid_positions(h, w)))
        start += h * w
    x = attn @ vip.attn_in_proj.weight.T + vip.attn_in_proj.bias
    for layer, proj, cond in zip(vip.layers, vip.cond_in_projs, conds):
        c = cond @ proj.weight.T + proj.bias
        a, H = layer.attn, layer.attn.heads
        n = _rms(x, layer.norm1)
        u = torch.cat([n, c], dim=-1)
        q, k, v = u @ a.q_proj.weight.T, u @ a.k_proj.weight.T, n @ a.v_proj.weight.T
        dqk, dv = q.shape[-1] // H, v.shape[-1] // H
        o = torch.zeros_like(v)
        for sl, pos in spans:
            ang = rope2d_angles(pos, dqk, a.theta)
            for j in range(H):
                qj = apply_rope(q[sl, j * dqk:(j + 1) * dqk][None], ang)[0]
                kj = apply_rope(k[sl, j * dqk:(j + 1) * dqk][None], ang)[0]
                p = torch.softmax(qj @ kj.T / dqk**0.5, dim=-1)
                o[sl, j * dv:(j + 1) * dv] = p @ v[sl, j * dv:(j + 1) * dv]
        x = x + o @ a.o_proj.weight.T
        act = ACT2FN[act] if isinstance(act, str) else act
        n, mlp = _rms(x, layer.norm2), layer.mlp
        g = act(n @ mlp.gate_proj.weight.T + mlp.gate_proj.bias) * (n @ mlp.up_proj.weight.T + mlp.up_proj.bias)
        x = x + g @ mlp.down_proj.weight.T + mlp.down_proj.bias
    return (x @ vip.out_proj.weight.T + vip.out_proj.bias)[:, 0]


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_pytorch_tanh", "relu"])
def test_vip_equals_its_definition_written_out(act):
    """Every weight random (norms and biases too), q/k wider than v (2 heads: 16 vs 8 per head), cond_width !=
    vip_width, non-square grids, and a video span of two frames next to a lone image."""
    cfg = tiny_vip_config(cond_width=8, vip_act=act)
    torch.manual_seed(0)
    vip = VIP(cfg).eval()
    with torch.no_grad():
        for p in vip.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p.dim() == 1 and p.shape[0] == cfg.vip_width else 0.0))
    grids, groups = [(2, 3), (3, 2), (3, 2), (1, 4)], [0, 1, 1, 2]
    attn, conds = vip_inputs(cfg, 22, seed=7)
    a64, c64 = attn.double(), [c.double() for c in conds]
    with torch.no_grad():
        vip.double()
        want = _naive_vip(vip, act, a64, c64, grids, groups).float()
        torch.testing.assert_close(vip(a64, c64, grids, groups=groups), want, rtol=1e-5, atol=1e-5)
        want = _naive_vip(vip, act, a64, c64, grids).float()  # each grid its own span
        torch.testing.assert_close(vip(a64, c64, grids), want, rtol=1e-5, atol=1e-5)
        for sl, span, ids in ((slice(0, 6), grids[:1], None), (slice(6, 18), grids[1:3], [5, 5])):  # one span
            a, c = a64[sl], [x[sl] for x in c64]
            want = _naive_vip(vip, act, a, c, span, ids).float()
            torch.testing.assert_close(vip(a, c, span, groups=ids), want, rtol=1e-5, atol=1e-5)
        out16 = vip.to(torch.bfloat16)(attn, conds, grids, groups=groups)
    assert out16.dtype == torch.float32  # logits come back in fp32 whatever the module's dtype


def test_vip_names_each_input_that_misses_the_grids(vip):
    cfg = tiny_vip_config()
    attn, conds = vip_inputs(cfg, 6, seed=4)
    with pytest.raises(ValueError, match=r"cover 6 tokens \(attention features\) and \[6, 5\] \(vision features\) "
                                         r"but the image grids hold 6"):
        vip(attn, [conds[0], conds[1][:5]], [(2, 3)])
    with pytest.raises(ValueError, match="VIP got 3 group ids for 2 grids"):
        vip(attn, conds, [(1, 3), (1, 3)], groups=[0, 0, 1])


def test_glimpse_vectors_by_hand():
    """Glimpse layer l's vector is RMSNorm(glimpse_proj(its own row of glimpse_embeddings)) with the norm's weight
    and ``glimpse_eps``; one layer at a time or batched over the glimpse layers <= ``upto``."""
    torch.manual_seed(0)
    mod = GlimpseModule(tiny_vip_config(glimpse_layers=(0, 1, 3), glimpse_norm_eps=0.5)).eval()
    with torch.no_grad():
        mod.glimpse_norm.weight.normal_()
        for row, layer in enumerate((0, 1, 3)):
            e = mod.glimpse_embeddings[row, 0] @ mod.glimpse_proj.weight.T + mod.glimpse_proj.bias
            want = e * torch.rsqrt(e.pow(2).mean() + 0.5) * mod.glimpse_norm.weight
            torch.testing.assert_close(mod.glimpse_vector(layer), want)
            torch.testing.assert_close(mod.glimpse_vectors()[layer], want)
        assert mod.glimpse_vector(2) is None
        assert list(mod.glimpse_vectors(upto=1)) == [0, 1] and list(mod.glimpse_vectors(upto=3)) == [0, 1, 3]
