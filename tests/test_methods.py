"""Every registered pruning method, on each tiny model family: budgets, no NaN, pruned == masked (against the stock
model, cached and uncached; for merging methods the stock model is also fed the merged input embeddings),
keep-everything == ``full``, batch == one by one; plus the pure selection ops (budget, farthest-point, DPP, pooled
grids, windowed quotas, merging) on hand-made inputs, config validation, and methods that never name a model
family."""

from __future__ import annotations

import contextlib
import dataclasses
import doctest
import itertools
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import IMG_A, IMG_B, IMG_C, QUESTIONS
from oracle import masking_stages, oracle_model, stage_drop_layers, stock_generate, visual_positions

import glimpseprune as gp
import glimpseprune.ops.budget as budget_mod
import glimpseprune.ops.diversity as diversity_mod
import glimpseprune.ops.dpp as dpp_mod
import glimpseprune.ops.merge as merge_mod
import glimpseprune.ops.pooling as pooling_mod
from glimpseprune.ops.budget import keep_count, topk_keep
from glimpseprune.ops.diversity import cosine_distance, farthest_point_select
from glimpseprune.ops.dpp import conditional_dpp_select, conditional_kernel, dpp_greedy_map, minmax_normalize
from glimpseprune.ops.merge import attention_received, group_mean, nearest_target
from glimpseprune.ops.pooling import pooled_cells, split_budget, window_ids, window_quota_keep
from glimpseprune.runtime.engine import prefill

METHODS = gp.list_methods()
MASKED = ("mask", "oracle")  # methods that read keep masks from the request
MERGING = ("downsample", "visionzip", "vscan")  # methods that also rewrite the input embeddings of kept tokens
N_NEW = 4
SPECS = [IMG_A, IMG_B, []]  # mixed sizes, a two-image sample, a text-only sample


def _random_keep(n_vis, seed, frac=0.3):
    g = torch.Generator().manual_seed(seed)
    masks = [torch.rand(n, generator=g) < frac for n in n_vis]
    for m in masks:
        if m.numel():
            m[0] = True
    return masks


def build(name: str, family, keep_ratio: float = 0.3):
    """A method of the registry with a non-trivial budget (the family's random module for ``glimpse``)."""
    if name == "glimpse":
        return gp.make_method("glimpse", family.module)
    if name == "early_glimpse":
        return gp.make_method("early_glimpse", family.early_module)
    fields = {f.name for f in dataclasses.fields(gp.get_method(name).config_class)}
    return gp.make_method(name, **({"keep_ratio": keep_ratio} if "keep_ratio" in fields else {}))


def build_keep_all(name: str, family):
    """The method configured to keep every visual token (budget 100 %)."""
    cls = gp.get_method(name)
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    if name == "glimpse":
        return gp.make_method("glimpse", family.module, gp.SelectionConfig(threshold=0.0))
    if name == "early_glimpse":
        return gp.make_method("early_glimpse", family.early_module, gp.SelectionConfig(threshold=0.0))
    if "keep_ratio" in fields:
        return gp.make_method(name, keep_ratio=1.0, **({"lam": 1.0} if "lam" in fields else {}))
    if name in ("full", *MASKED):
        return gp.make_method(name)
    pytest.fail(f"test_methods needs a keep-everything setting for the new method {name!r}")


def request_masks(name, n_vis, seed=4):
    return {"keep_masks": _random_keep(n_vis, seed)} if name in MASKED else {}


def pad_id(family):
    return family.processor.tokenizer.pad_token_id


@contextlib.contextmanager
def input_rows_replaced(model, inputs, image_token_id, merged):
    """The stock model fed a merging method's input embeddings: ``merged`` is ``scratch["merged_embeds"]`` (per
    sample None or (visual-token indices, rows)); those visual tokens' LLM input rows are overwritten at every call
    that covers the whole prompt (the prefill, or each uncached step)."""
    vis = visual_positions(inputs, image_token_id)  # one placeholder id, or several (image and video)

    def hook(module, args, kwargs):
        emb = kwargs.get("inputs_embeds")
        if emb is None or emb.shape[1] < vis.shape[1]:
            return None
        emb = emb.clone()
        for b, record in enumerate(merged or []):
            if record is not None and record[0].numel():
                emb[b, vis[b].nonzero().squeeze(-1)[record[0].cpu()]] = record[1].to(emb.dtype)
        kwargs["inputs_embeds"] = emb
        return args, kwargs

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


# ----------------------------------------------------------------------------------------------- every method


@pytest.mark.parametrize("name", METHODS)
def test_budget_and_bookkeeping(family, name):
    """A mixed batch: each sample keeps exactly the method's budget (or <= n_vis when dynamic), logits are finite,
    the cache holds exactly the kept tokens, and generation runs."""
    method = build(name, family)
    inputs = family.batch(SPECS)
    n_vis = [family.n_vis(s) for s in SPECS]
    out = gp.apply(family.model, method, processor=family.processor).generate(
        inputs, max_new_tokens=N_NEW, return_logits=True, **request_masks(name, n_vis))
    assert out.n_vis == n_vis and out.sequences.shape[0] == 3
    for b, n in enumerate(n_vis):
        expected = method.budget(n)
        if expected is None:
            assert 0 <= out.n_kept[b] <= n
        else:
            assert out.n_kept[b] == expected, (b, n, out.n_kept)
    assert out.n_kept[2] == 0
    if name not in ("full", "glimpse", "early_glimpse", *MASKED):  # the fixed-budget methods really prune here
        assert 0 < out.n_kept[0] < n_vis[0] and 0 < out.n_kept[1] < n_vis[1]
    lengths = inputs["attention_mask"].sum(1).tolist()
    assert out.kv_len == [L - (n - k) for L, n, k in zip(lengths, n_vis, out.n_kept)]
    assert all(bool(torch.isfinite(lg).all()) for lg in out.step_logits)
    assert [tuple(m.shape) for m in out.image_keep_masks] == family.grids(IMG_A) + family.grids(IMG_B)


@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "uncached"])
@pytest.mark.parametrize("name", METHODS)
def test_pruned_equals_masked(family, name, use_cache):
    """Our compacted prefill + cached decoding == the stock model hiding the same dropped tokens from the same layers
    (uncached: recomputing the whole sequence every step), for every method and its own keep masks. A merging method
    also rewrites kept tokens' input embeddings: the stock model gets the same rows (``input_rows_replaced``), and
    ``test_merged_rows_are_group_means`` checks that the rows are what the method says."""
    method = build(name, family)
    inputs = family.batch([IMG_B, IMG_C])
    n_vis = [family.n_vis(IMG_B), family.n_vis(IMG_C)]
    out = gp.apply(family.model, method).generate(inputs, max_new_tokens=N_NEW, return_logits=True,
                                                  **request_masks(name, n_vis))
    pre = out.prefill
    assert len(pre.stage_keep_masks) == len(pre.prune_layers)
    merged = pre.scratch.get("merged_embeds")
    assert (merged is not None and any(r is not None and r[0].numel() for r in merged)) == (name in MERGING)
    drop = stage_drop_layers(inputs, family.image_token_id, pre.prune_layers, pre.stage_keep_masks)
    ref_model = oracle_model(family.model_dir)
    with masking_stages(drop), input_rows_replaced(ref_model, inputs, family.image_token_id, merged), \
            torch.no_grad():
        ref_tokens, ref_logits = stock_generate(ref_model, inputs, N_NEW, use_cache=use_cache,
                                                pad_token_id=pad_id(family))
    assert torch.equal(out.sequences, ref_tokens)
    for ours, ref in zip(out.step_logits, ref_logits):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", METHODS)
def test_keep_everything_equals_full(family, name):
    """At a 100 % budget every method is the unpruned model: same greedy tokens, same logits."""
    inputs = family.batch(SPECS)
    n_vis = [family.n_vis(s) for s in SPECS]
    kw = {"keep_masks": [torch.ones(n, dtype=torch.bool) for n in n_vis]} if name in MASKED else {}
    ref = gp.apply(family.model, "full").generate(inputs, max_new_tokens=N_NEW, return_logits=True)
    out = gp.apply(family.model, build_keep_all(name, family)).generate(inputs, max_new_tokens=N_NEW,
                                                                        return_logits=True, **kw)
    assert out.n_kept == n_vis
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.step_logits, ref.step_logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", METHODS)
def test_batch_equals_single(family, name):
    """A sample's keep mask and answer do not depend on the rest of the batch."""
    method = build(name, family)
    pm = gp.apply(family.model, method)
    n_vis = [family.n_vis(s) for s in SPECS]
    masks = request_masks(name, n_vis).get("keep_masks")
    out = pm.generate(family.batch(SPECS), max_new_tokens=N_NEW, keep_masks=masks)
    for b, spec in enumerate(SPECS):
        one = pm.generate(family.batch([spec], [QUESTIONS[b]], seed=10 * b), max_new_tokens=N_NEW,
                          keep_masks=None if masks is None else [masks[b]])
        assert torch.equal(one.keep_masks[0], out.keep_masks[b])
        n = one.sequences.shape[1]
        assert torch.equal(one.sequences[0], out.sequences[b, :n])


# ------------------------------------------------------------------------------------ method-specific behaviour


def test_pdrop_two_stages(family):
    """Two compaction layers: counts follow keep_ratio * lam^s of the ORIGINAL count, the second stage keeps a subset
    of the first, and pruned == masked with per-stage drop layers (cached decoding)."""
    method = gp.make_method("pdrop", layers=(0, 2), keep_ratio=0.5, lam=0.5)
    inputs = family.batch([IMG_A, IMG_C])
    n_vis = [family.n_vis(IMG_A), family.n_vis(IMG_C)]
    out = gp.apply(family.model, method).generate(inputs, max_new_tokens=N_NEW, return_logits=True)
    pre = out.prefill
    assert pre.prune_layers == (0, 2) and out.prune_layer == 0
    assert pre.stage_kept == [[n // 2 for n in n_vis], [n // 4 for n in n_vis]]
    assert out.n_kept == pre.stage_kept[-1] == [method.budget(n) for n in n_vis]
    for first, second in zip(*pre.stage_keep_masks):
        assert bool((second <= first).all()) and int(second.sum()) < int(first.sum())
    drop = stage_drop_layers(inputs, family.image_token_id, pre.prune_layers, pre.stage_keep_masks)
    assert set(drop[drop < 10**9].tolist()) == {0, 2}
    with masking_stages(drop), torch.no_grad():
        ref_tokens, ref_logits = stock_generate(oracle_model(family.model_dir), inputs, N_NEW,
                                                pad_token_id=pad_id(family))
    assert torch.equal(out.sequences, ref_tokens)
    for ours, ref in zip(out.step_logits, ref_logits):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_pdrop_default_schedule():
    m = gp.make_method("pdrop")
    assert m.prune_layers(32) == (7, 15, 23) and m.prune_layer(32) == 7  # upstream layer_list [8, 16, 24]
    assert m.prune_layers(28) == (6, 13, 20)
    assert [m.stage_count(576, s) for s in range(3)] == [288, 144, 72] and m.budget(576) == 72
    with pytest.raises(ValueError, match="at least 4 LLM layers"):
        m.prune_layers(3)


def test_multi_stage_cannot_revive_tokens(family):
    """The runtime refuses a later stage that keeps a token an earlier stage dropped."""
    from glimpseprune.methods.base import PruningMethod

    class Reviver(PruningMethod):
        name = "reviver_test"

        def prune_layers(self, n_layers):
            return (0, 1)

        def select(self, state):
            return [torch.arange(n, device=state.device) % 2 == state.stage for n in state.enc.n_vis]

    with pytest.raises(ValueError, match="earlier stage dropped"):
        gp.apply(family.model, Reviver()).generate(family.batch([IMG_C]), max_new_tokens=1)


def test_prune_layers_must_increase(family):
    with pytest.raises(ValueError, match="strictly increasing"):
        gp.apply(family.model, "pdrop", layers=(1, 1))
    with pytest.raises(ValueError, match=r"prune layer 9 is outside the LLM's layer range \[-1, 3\]"):
        gp.apply(family.model, "pdrop", layers=(1, 9)).generate(family.batch([IMG_C]), max_new_tokens=1)


def test_random_is_seeded(family):
    inputs = family.batch([IMG_A])
    masks = [gp.apply(family.model, "random", keep_ratio=0.25, seed=s).generate(inputs, max_new_tokens=1)
             .keep_masks[0] for s in (3, 3, 4)]
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])


def test_fastv_matches_hand_computed_attention(family):
    """fastv's pick is the top-k of the last prompt token's head-mean softmax attention in layer K of the stock
    model (eager attention weights), restricted to the visual keys."""
    from transformers import AutoModelForImageTextToText

    inputs = family.batch([IMG_C])
    k = 1
    out = gp.apply(family.model, "fastv", keep_ratio=0.25, prune_layer=k).generate(inputs, max_new_tokens=1)
    ref = AutoModelForImageTextToText.from_pretrained(family.model_dir, local_files_only=True).eval()
    ref.set_attn_implementation({"text_config": "eager", "vision_config": "sdpa"})
    with torch.no_grad():
        attn = ref(**inputs, output_attentions=True).attentions[k]  # (1, heads, L, L), one unpadded sample
    scores = attn[0, :, -1].mean(dim=0)[inputs["input_ids"][0] == family.image_token_id]
    n = scores.numel()
    assert torch.equal(out.keep_masks[0], topk_keep(scores, max(1, int(0.25 * n))))


def test_glimpse_attn_token_never_influences_answer(family):
    """The appended mean-of-text query is dropped at K: same logits as ``mask`` with the same keep masks."""
    inputs = family.batch([IMG_A, IMG_C])
    g = gp.apply(family.model, "glimpse_attn", keep_ratio=0.3).generate(inputs, max_new_tokens=N_NEW,
                                                                        return_logits=True)
    m = gp.apply(family.model, "mask").generate(inputs, max_new_tokens=N_NEW, keep_masks=g.keep_masks,
                                                return_logits=True)
    assert g.prune_layer == m.prune_layer
    assert torch.equal(g.sequences, m.sequences)
    for a, b in zip(g.step_logits, m.step_logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    last = gp.apply(family.model, "glimpse_attn", keep_ratio=0.3, query="last_token").generate(inputs,
                                                                                             max_new_tokens=1)
    assert last.n_kept == g.n_kept


def test_oracle_takes_per_image_grids(family):
    """Per-image (h, w) masks (as adapter.box_masks returns them) equal the same masks given per sample."""
    inputs = family.batch([IMG_B, IMG_C])
    grids = family.grids(IMG_B) + family.grids(IMG_C)
    g = torch.Generator().manual_seed(0)
    per_image = [torch.rand(h, w, generator=g) < 0.4 for h, w in grids]
    per_sample = [torch.cat([per_image[0].flatten(), per_image[1].flatten()]), per_image[2].flatten()]
    a = gp.apply(family.model, "oracle", prune_layer=-1).generate(inputs, max_new_tokens=2,
                                                                  keep_masks=[m.numpy() for m in per_image])
    b = gp.apply(family.model, "oracle", prune_layer=-1).generate(inputs, max_new_tokens=2, keep_masks=per_sample)
    assert [torch.equal(x, y) for x, y in zip(a.keep_masks, per_sample)] == [True, True]
    assert torch.equal(a.sequences, b.sequences) and a.prune_layer == -1
    assert gp.make_method("oracle").prune_layer(4) == gp.config.default_prune_layer(4)
    with pytest.raises(ValueError, match="needs keep_masks"):
        gp.apply(family.model, "oracle").generate(inputs, max_new_tokens=1)
    with pytest.raises(ValueError, match="per-image"):
        gp.apply(family.model, "oracle").generate(inputs, max_new_tokens=1, keep_masks=per_image[:2])


def test_divprune_and_cdpruner_use_llm_input_embeddings(family):
    """Both select on the visual embeddings entering the LLM (checked by recomputing the pick from the adapter)."""
    from glimpseprune.methods.cdpruner import question_embedding

    inputs = family.batch([IMG_A])
    adapter = gp.get_adapter(family.model)
    with torch.no_grad():
        enc = adapter.encode(family.model, inputs)
    vis = enc.embeds[0, enc.vis_mask[0]]
    n = vis.shape[0]
    k = max(1, int(0.2 * n))
    div = gp.apply(family.model, "divprune", keep_ratio=0.2).generate(inputs, max_new_tokens=1)
    assert sorted(div.keep_masks[0].nonzero().flatten().tolist()) == sorted(farthest_point_select(vis, k).tolist())
    cdp = gp.apply(family.model, "cdpruner", keep_ratio=0.2).generate(inputs, max_new_tokens=1)
    q = question_embedding(enc.embeds[0], enc.attn_mask[0], enc.vis_mask[0])
    r = minmax_normalize(torch.nn.functional.cosine_similarity(vis.float(), q[None], dim=-1))
    want = conditional_dpp_select(vis, r, k)
    assert sorted(cdp.keep_masks[0].nonzero().flatten().tolist()) == sorted(want.tolist())
    assert div.prune_layer == cdp.prune_layer == -1


def test_question_embedding_reads_text_after_the_images():
    embeds = torch.arange(6, dtype=torch.float32)[:, None].repeat(1, 2)  # row i = (i, i)
    valid = torch.tensor([False, True, True, True, True, True])
    vis = torch.tensor([False, False, True, True, False, False])
    from glimpseprune.methods.cdpruner import question_embedding

    assert question_embedding(embeds, valid, vis).tolist() == [4.5, 4.5]  # rows 4 and 5 only
    vis_last = torch.tensor([False, False, False, False, True, True])
    assert question_embedding(embeds, valid, vis_last).tolist() == [2.0, 2.0]  # nothing after: all text (1, 2, 3)


def _llm_input_visual(family, inputs):
    """Per sample, the visual embeddings (n_vis_b, H) entering the LLM, from the adapter."""
    with torch.no_grad():
        enc = gp.get_adapter(family.model).encode(family.model, inputs)
    return [enc.embeds[b, enc.vis_mask[b]].float() for b in range(enc.embeds.shape[0])]


def _group_rows(vis, into):
    """{kept token: mean of the tokens folding into it} for the kept tokens that absorb at least one other."""
    return {int(t): vis[into == t].mean(dim=0) for t in into.unique() if t >= 0 and int((into == t).sum()) > 1}


def _assert_merged(record, want: dict):
    idx, rows = record
    assert sorted(idx.tolist()) == sorted(want)
    for i, row in zip(idx.tolist(), rows):
        torch.testing.assert_close(row, want[i], atol=1e-5, rtol=1e-5)


def test_downsample_pools_cells_into_their_centre_token(family):
    """keep_ratio 1/4 of an 8 x 8 grid: a 4 x 4 grid of 2 x 2 cells, each kept as its (upper-left) centre token
    with the mean of the cell as its input embedding; a two-image sample splits the budget by token counts."""
    inputs = family.batch([IMG_A, IMG_B])
    out = gp.apply(family.model, "downsample", keep_ratio=0.25).generate(inputs, max_new_tokens=1)
    assert out.prune_layer == -1 and out.n_kept == [16, family.n_vis(IMG_B) // 4]
    grid = out.keep_masks[0].view(8, 8)
    assert grid.nonzero().tolist() == [[r, c] for r in range(0, 8, 2) for c in range(0, 8, 2)]
    vis = _llm_input_visual(family, inputs)[0].view(8, 8, -1)
    want = {r * 8 + c: vis[r:r + 2, c:c + 2].reshape(4, -1).mean(dim=0) for r in range(0, 8, 2)
            for c in range(0, 8, 2)}
    _assert_merged(out.prefill.scratch["merged_embeds"][0], want)
    shares = split_budget([h * w for h, w in family.grids(IMG_B)], out.n_kept[1])
    assert [int(m.sum()) for m in out.image_keep_masks[1:3]] == shares


def test_visionzip_keeps_dominant_and_merges_contextual(family):
    """Dominant = top attention received (the parameter-free proxy, recomputed here), unchanged; the contextual
    targets are the rest at an even stride, each the mean of itself and the rest tokens most cosine-similar to it."""
    inputs = family.batch([IMG_A])
    vis = _llm_input_visual(family, inputs)[0]
    n = vis.shape[0]
    k = max(1, int(0.3 * n))
    n_ctx = int(0.15 * k + 1e-9)
    out = gp.apply(family.model, "visionzip", keep_ratio=0.3, dominant_frac=0.85).generate(inputs, max_new_tokens=1)
    dominant = topk_keep(attention_received(vis), k - n_ctx)
    rest = (~dominant).nonzero().squeeze(-1)
    targets = rest[[i * rest.numel() // n_ctx for i in range(n_ctx)]]
    cos = torch.nn.functional.normalize(vis[rest], dim=-1) @ torch.nn.functional.normalize(vis[targets], dim=-1).T
    into = torch.arange(n)
    into[rest] = targets[cos.argmax(dim=1)]
    into[targets] = targets
    assert torch.equal(out.keep_masks[0], dominant | torch.isin(torch.arange(n), targets))
    _assert_merged(out.prefill.scratch["merged_embeds"][0], _group_rows(vis, into))
    plain = gp.apply(family.model, "visionzip", keep_ratio=0.3, dominant_frac=1.0).generate(inputs, max_new_tokens=1)
    assert torch.equal(plain.keep_masks[0], topk_keep(attention_received(vis), k))
    assert plain.prefill.scratch["merged_embeds"][0][0].numel() == 0  # no contextual tokens: nothing merged


def test_vscan_two_stage_schedule(family):
    """Stage 1 before the LLM keeps scan_count (local quota picks + global top-k) and folds every other token into
    its most similar kept one; stage 2 after mid_layer keeps budget() of those by the last prompt token's attention."""
    m = gp.make_method("vscan")
    assert m.prune_layers(28) == (-1, 13) and m.prune_layers(32) == (-1, 15)  # upstream layers 14 / 16
    assert gp.make_method("vscan", mid_layer=2).prune_layers(4) == (-1, 2)
    assert m.scan_count(576) == 191 and m.budget(576) == 63
    method = gp.make_method("vscan", keep_ratio=0.2, mid_keep=0.5, mid_layer=2)
    inputs = family.batch([IMG_A, IMG_C])
    n_vis = [family.n_vis(IMG_A), family.n_vis(IMG_C)]
    out = gp.apply(family.model, method).generate(inputs, max_new_tokens=2)
    pre = out.prefill
    assert pre.prune_layers == (-1, 2)
    assert pre.stage_kept == [[method.scan_count(n) for n in n_vis], [method.budget(n) for n in n_vis]]
    assert [method.scan_count(n) for n in n_vis] == [int(0.4 * n) for n in n_vis]  # 0.2 / 0.5 of n
    for first, second in zip(*pre.stage_keep_masks):
        assert bool((second <= first).all())
    vis = _llm_input_visual(family, inputs)[0]
    kept = pre.stage_keep_masks[0][0].nonzero().squeeze(-1)
    unit = torch.nn.functional.normalize(vis, dim=-1)
    into = kept[(unit @ unit[kept].T).argmax(dim=1)]
    into[kept] = kept
    _assert_merged(pre.scratch["merged_embeds"][0], _group_rows(vis, into))
    local = window_quota_keep(attention_received(vis, window_ids(8, 8, 4)), window_ids(8, 8, 4), 12)
    assert bool((local <= pre.stage_keep_masks[0][0]).all())  # the local scan's 12 picks, 3 per 4 x 4 window
    plain = gp.apply(family.model, "vscan", keep_ratio=0.2, mid_keep=0.5, mid_layer=2, merge=False)
    plain_pre = plain.generate(inputs, max_new_tokens=1).prefill
    assert all(r[0].numel() == 0 for r in plain_pre.scratch["merged_embeds"])  # merge=False: pure selection
    assert torch.equal(plain_pre.stage_keep_masks[0][0], pre.stage_keep_masks[0][0])  # the same scan


# ------------------------------------------------------------------------------------------------ configs


BAD_CONFIGS = [
    ("random", {"keep_ratio": 0.0}), ("random", {"keep_ratio": 1.5}), ("random", {"seed": "x"}),
    ("random", {"prune_layer": -2}), ("fastv", {"prune_layer": -1}), ("fastv", {"keep_ratio": None}),
    ("divprune", {"keep_ratio": -0.1}), ("cdpruner", {"negate_relevance": "yes"}),
    ("glimpse_attn", {"query": "cls"}), ("glimpse_attn", {"prune_layer": -1}), ("oracle", {"prune_layer": "2"}),
    ("pdrop", {"lam": 0.0}), ("pdrop", {"layers": (3, 1)}), ("pdrop", {"layers": ()}), ("pdrop", {"layers": (-1, 2)}),
    ("downsample", {"keep_ratio": 0}), ("visionzip", {"dominant_frac": 1.5}), ("visionzip", {"keep_ratio": True}),
    ("vscan", {"mid_layer": -1}), ("vscan", {"mid_keep": 0.0}), ("vscan", {"window": 0}), ("vscan", {"merge": "yes"}),
    ("vscan", {"local_frac": 2}),
]


@pytest.mark.parametrize(("name", "kw"), BAD_CONFIGS, ids=[f"{n}-{next(iter(k))}" for n, k in BAD_CONFIGS])
def test_configs_reject_bad_values(name, kw):
    with pytest.raises(ValueError):
        gp.get_method(name).config_class(**kw)


@pytest.mark.parametrize("name", [n for n in METHODS if n not in ("glimpse", "early_glimpse")])
def test_configs_are_frozen_and_typed(name):
    cls = gp.get_method(name)
    cfg = cls.config_class()
    assert dataclasses.is_dataclass(cfg)
    for f in dataclasses.fields(cfg):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(cfg, f.name, getattr(cfg, f.name))
    assert isinstance(cls(cfg).config, cls.config_class)
    with pytest.raises(TypeError):
        cls(cfg, keep_ratio=0.5)  # a config object or keyword fields, not both


def test_method_files_never_name_a_model_family():
    """Methods talk to models only through the adapter and the runtime: no family names in methods/ (the registry
    names of the methods themselves are the only allowed strings, and none names a family)."""
    root = Path(gp.__file__).parent / "methods"
    pattern = re.compile(r"qwen|llava", re.IGNORECASE)
    allowed = {n for n in METHODS if pattern.search(n)}
    for path in sorted(root.glob("*.py")):
        text = path.read_text()
        for name in allowed:
            text = text.replace(f'"{name}"', "")
        hits = [line for line in text.splitlines() if pattern.search(line)]
        assert not hits, f"{path.name} names a model family: {hits}"


# ------------------------------------------------------------------------------------------------ pure ops


@pytest.mark.parametrize("mod", [budget_mod, diversity_mod, dpp_mod, pooling_mod, merge_mod],
                         ids=["budget", "diversity", "dpp", "pooling", "merge"])
def test_op_docstring_examples(mod):
    result = doctest.testmod(mod, verbose=False)
    assert result.attempted >= 1 and result.failed == 0


def test_keep_count_and_topk():
    assert [keep_count(n, 0.111) for n in (0, 1, 9, 10, 576)] == [0, 1, 1, 1, 63]
    assert keep_count(100, 0.29) == 29  # float-tolerant floor
    assert keep_count(7, 1.0) == 7 and keep_count(3, 0.1, min_keep=5) == 3
    with pytest.raises(ValueError, match="keep_ratio"):
        keep_count(10, 0.0)
    s = torch.tensor([0.5, float("nan"), 0.5, 0.9, 0.1])
    assert topk_keep(s, 2).tolist() == [True, False, False, True, False]  # tie -> lower index; NaN last
    assert topk_keep(s, 10, alive=torch.tensor([1, 1, 0, 0, 1]).bool()).tolist() == [True, True, False, False, True]
    assert topk_keep(torch.zeros(0), 3).tolist() == []
    # an alive NaN score ranks below every alive number but above every dead entry (it ties at -inf with them)
    nan = float("nan")
    alive = torch.tensor([False, True, True])
    assert topk_keep(torch.tensor([nan, 0.5, nan]), 2, alive=alive).tolist() == [False, True, True]
    assert topk_keep(torch.tensor([0.9, nan, 0.1]), 2, alive=alive).tolist() == [False, True, True]


@pytest.mark.parametrize(("name", "kw"), [("pdrop", {"lam": np.float32(0.5)}), ("vscan", {"mid_keep": np.float64(0.5)}),
                                          ("visionzip", {"dominant_frac": np.float32(0.5)}),
                                          ("random", {"seed": np.int64(3)})])
def test_configs_take_numpy_numbers(name, kw):
    """A number read from a numpy array is a number: accepted like the Python one (it was refused as not one)."""
    cfg = gp.get_method(name).config_class(**kw)
    assert getattr(cfg, next(iter(kw))) == next(iter(kw.values()))


def test_farthest_point_picks_one_per_cluster():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(4)[:3] * 5  # three orthogonal directions
    pts = torch.cat([c + 0.05 * torch.randn(6, 4, generator=g) for c in centres])  # 3 clusters of 6
    picks = farthest_point_select(pts, 3)
    assert sorted((picks // 6).tolist()) == [0, 1, 2]
    assert len(set(farthest_point_select(pts, 18).tolist())) == 18  # all distinct, k = n


def test_farthest_point_rule_and_edge_cases():
    # 1-D angles: the first pick has the largest nearest-neighbour distance, later picks maximise min distance
    angles = torch.tensor([0.0, 0.1, 0.2, 1.5, 3.0])
    pts = torch.stack([angles.cos(), angles.sin()], dim=1)
    picks = farthest_point_select(pts, 3).tolist()
    assert picks[0] == 4  # nearest neighbour 1.5 rad away
    assert picks[1] == 0  # farthest from 3.0 rad
    assert picks[2] == 3
    dup = torch.ones(4, 3)  # identical rows: still distinct picks
    assert sorted(farthest_point_select(dup, 4).tolist()) == [0, 1, 2, 3]
    assert farthest_point_select(pts, 0).tolist() == [] and farthest_point_select(pts, 9).numel() == 5
    assert farthest_point_select(pts[:1], 1).tolist() == [0]
    z = torch.zeros(3, 2)  # zero vectors: finite distances, no NaN
    assert bool(torch.isfinite(cosine_distance(z)).all())
    with pytest.raises(ValueError, match="2-D"):
        farthest_point_select(angles, 1)


def _greedy_by_determinants(L: torch.Tensor, k: int) -> list[int]:
    chosen: list[int] = []
    for _ in range(k):
        best = max((j for j in range(L.shape[0]) if j not in chosen),
                   key=lambda j: torch.linalg.det(L[chosen + [j]][:, chosen + [j]].double()).item())
        chosen.append(best)
    return chosen


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dpp_greedy_equals_determinant_greedy(seed):
    """The incremental-Cholesky greedy picks what the naive greedy on determinants picks, on random kernels."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(9, 6, generator=g)
    r = torch.rand(9, generator=g) + 0.1
    L = conditional_kernel(feats, r).double()
    assert dpp_greedy_map(L, 5).tolist() == _greedy_by_determinants(L, 5)


@pytest.mark.parametrize("seed", [0, 1])
def test_lazy_dpp_equals_kernel_dpp(seed):
    """conditional_dpp_select (kernel rows on demand) == greedy MAP on the materialized kernel."""
    g = torch.Generator().manual_seed(seed)
    feats, r = torch.randn(40, 8, generator=g), torch.rand(40, generator=g)
    assert conditional_dpp_select(feats, r, 12).tolist() == dpp_greedy_map(conditional_kernel(feats, r), 12).tolist()
    assert conditional_dpp_select(torch.ones(5, 3), r[:5], 5).tolist() == \
        dpp_greedy_map(conditional_kernel(torch.ones(5, 3), r[:5]), 5).tolist()


def test_farthest_point_is_chunk_independent(monkeypatch):
    """The chunked nearest-neighbour pass gives the picks of the one-matrix rule."""
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(50, 6, generator=g)
    dist = cosine_distance(feats)
    full = dist.masked_fill(torch.eye(50, dtype=torch.bool), float("inf")).amin(dim=0)
    monkeypatch.setattr(diversity_mod, "CHUNK", 7)
    torch.testing.assert_close(diversity_mod.nearest_neighbour_distance(diversity_mod.unit_rows(feats)), full)
    picks = farthest_point_select(feats, 10)
    assert picks[0] == torch.argmax(full)
    for i in range(1, 10):  # every later pick maximises the min distance to the earlier ones
        cand = dist[picks[:i]].amin(dim=0).masked_fill(torch.isin(torch.arange(50), picks[:i]), -1.0)
        assert picks[i] == torch.argmax(cand)


def test_dpp_prefers_relevant_and_diverse():
    feats = torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.7, 0.7]])
    r = torch.tensor([1.0, 0.95, 0.6, 0.1])
    picks = dpp_greedy_map(conditional_kernel(feats, r), 2).tolist()
    assert picks == [0, 2]  # the most relevant, then the orthogonal one over the near-duplicate
    assert not {0, 1} <= set(dpp_greedy_map(conditional_kernel(feats, torch.ones(4)), 2).tolist())


def test_dpp_degenerate_kernel_still_returns_k_distinct():
    feats = torch.ones(5, 3)  # rank-1 similarity: one pick exhausts the kernel
    r = torch.tensor([0.2, 0.9, 0.5, 0.0, 0.7])
    picks = dpp_greedy_map(conditional_kernel(feats, r), 4).tolist()
    assert picks[0] == 1 and picks[1:] == [4, 2, 0]  # the rest by quality r^2
    assert dpp_greedy_map(torch.zeros(3, 3), 3).tolist() == [0, 1, 2]
    assert dpp_greedy_map(torch.eye(2), 0).tolist() == []
    assert minmax_normalize(torch.tensor([2.0, 4.0, 3.0])).tolist() == pytest.approx([0.0, 1.0, 0.5], abs=1e-5)
    with pytest.raises(ValueError, match="square"):
        dpp_greedy_map(torch.ones(2, 3), 1)


def test_dpp_greedy_gains_never_increase():
    """Greedy marginal gains never increase (submodularity of log det on a PSD kernel): picks in order."""
    g = torch.Generator().manual_seed(5)
    L = conditional_kernel(torch.randn(8, 4, generator=g), torch.rand(8, generator=g) + 0.5).double()
    picks = dpp_greedy_map(L, 4).tolist()
    dets = [torch.linalg.det(L[picks[:i]][:, picks[:i]]).item() for i in range(1, 5)]
    gains = [dets[0]] + [b / a for a, b in itertools.pairwise(dets)]
    assert all(x >= -1e-9 for x in gains) and all(a >= b - 1e-9 for a, b in itertools.pairwise(gains))



def test_split_budget():
    assert split_budget([64, 24, 32], 36) == [19, 7, 10]
    assert split_budget([64, 24, 32], 120) == [64, 24, 32]  # everything: the counts themselves
    assert split_budget([100, 1], 2) == [1, 1] and split_budget([100, 1], 1) == [1, 0]  # no image vanishes if k allows
    assert split_budget([3, 3], 3) == [2, 1]  # ties to the lower index
    assert split_budget([], 0) == [] and split_budget([0, 5], 2) == [0, 2]
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        counts = torch.randint(1, 40, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g).tolist()
        k = int(torch.randint(0, sum(counts) + 1, (1,), generator=g))
        out = split_budget(counts, k)
        assert sum(out) == k and all(0 <= o <= c for o, c in zip(out, counts))
    with pytest.raises(ValueError, match="cannot share"):
        split_budget([2, 2], 5)


@pytest.mark.parametrize(("h", "w"), [(8, 8), (4, 6), (8, 4), (1, 5), (3, 7)])
def test_pooled_cells_partition_any_count(h, w):
    """Every c in [1, h * w] gives exactly c non-empty rectangular cells, each represented by a token inside it;
    c = h * w is the identity."""
    for c in range(1, h * w + 1):
        cell, rep = pooled_cells(h, w, c)
        assert cell.shape == (h * w,) and rep.shape == (c,)
        assert sorted(cell.unique().tolist()) == list(range(c))
        assert torch.equal(cell[rep], torch.arange(c))  # the representative lies in its own cell
        for cid in range(c):
            rc = (cell == cid).nonzero().squeeze(-1)
            rows, cols = rc // w, rc % w
            area = (int(rows.max() - rows.min()) + 1) * (int(cols.max() - cols.min()) + 1)
            assert area == rc.numel()  # a rectangle
    cell, rep = pooled_cells(h, w, h * w)
    assert torch.equal(cell, torch.arange(h * w)) and torch.equal(rep, torch.arange(h * w))


def test_pooled_cells_hand_examples():
    cell, rep = pooled_cells(8, 8, 16)  # 2 x 2 blocks, centre = upper-left of the four
    assert cell.view(8, 8)[:2, :4].tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]
    assert rep.tolist() == [r * 8 + c for r in range(0, 8, 2) for c in range(0, 8, 2)]
    cell, rep = pooled_cells(4, 6, 6)  # a 2 x 3 grid of 2 x 2 cells (aspect kept)
    assert torch.bincount(cell).tolist() == [4] * 6
    cell, rep = pooled_cells(3, 3, 1)
    assert cell.tolist() == [0] * 9 and rep.tolist() == [4]  # one cell: the centre token
    cell, _ = pooled_cells(6, 6, 7)  # prime count: 3 bands of 2 / 2 / 3 cells, not a 1 x 7 strip
    assert torch.bincount(cell).tolist() == [6, 6, 6, 6, 4, 4, 4]
    with pytest.raises(ValueError, match="cannot be pooled"):
        pooled_cells(2, 2, 5)


def test_window_quota_keep():
    win = window_ids(4, 4, 2)  # four 2 x 2 windows
    assert win.view(4, 4).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    scores = torch.zeros(16)
    scores[[0, 1, 4, 5]] = torch.tensor([9.0, 8.0, 7.0, 6.0])  # window 0 holds the four best
    keep = window_quota_keep(scores, win, 4)
    assert keep.view(4, 4).tolist() == [[True, False, True, False], [False, False, False, False],
                                         [True, False, True, False], [False, False, False, False]]
    keep = window_quota_keep(scores, win, 8)  # quota 2: the two best of window 0, then ties by index elsewhere
    assert keep.nonzero().squeeze(-1).tolist() == [0, 1, 2, 3, 8, 9, 10, 11]
    small = window_quota_keep(torch.arange(5.0), torch.tensor([0, 0, 0, 0, 1]), 4)  # quota 2, window 1 holds 1
    assert small.tolist() == [False, False, True, True, True]
    assert window_quota_keep(torch.ones(3), torch.zeros(3, dtype=torch.long), 0).tolist() == [False] * 3


def test_attention_received_and_merging_ops(monkeypatch):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 5, generator=g)
    groups = torch.arange(30) // 7  # groups of 7, 7, 7, 7, 2
    full = attention_received(x)
    grouped = attention_received(x, groups)
    assert float(full.sum()) == pytest.approx(30.0, abs=1e-4)
    assert torch.bincount(groups, weights=grouped).tolist() == pytest.approx([7, 7, 7, 7, 2], abs=1e-4)
    targets = torch.tensor([3, 17, 25])
    assign = nearest_target(x, targets)
    cos = torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(x[targets], dim=-1).T
    want = cos.argmax(dim=1)
    want[targets] = torch.arange(3)
    assert torch.equal(assign, want)
    monkeypatch.setattr(merge_mod, "CHUNK", 4)  # chunked rows give the same numbers
    torch.testing.assert_close(attention_received(x), full)
    torch.testing.assert_close(attention_received(x, groups), grouped)
    assert torch.equal(nearest_target(x, targets), assign)
    means, sizes = group_mean(x, assign, 3)
    for t in range(3):
        torch.testing.assert_close(means[t], x[assign == t].mean(dim=0))
    assert sizes.sum() == 30
    with pytest.raises(ValueError, match="at least one target"):
        nearest_target(x, torch.zeros(0, dtype=torch.long))


def test_visionzip_contextual_plan():
    from glimpseprune.methods.visionzip import contextual_plan

    vis = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0], [0.9, 0.0], [0.0, 0.8]])
    dominant = torch.tensor([True, False, False, False, False, False])
    into = contextual_plan(vis, dominant, 2)  # rest 1..5, targets at stride: rest[0] = 1, rest[2] = 3
    assert into.tolist() == [0, 1, 3, 3, 3, 1]  # 2 and 4 point along x, closer to token 3 than to token 1
    assert contextual_plan(vis, dominant, 0).tolist() == [0, -1, -1, -1, -1, -1]


# mutation audit, round 2: rules a one-line change could break unnoticed

@pytest.mark.parametrize("name, kw", [("fastv", {"keep_ratio": 0.25}),
                                      ("pdrop", {"layers": (0, 2), "keep_ratio": 0.5})])
def test_attention_scores_ignore_the_left_padding_of_a_batch(family, name, kw):
    """The query's attention is a softmax over its visible keys only (``query_attention``): the left padding of a
    shorter sample takes no share of it, so each sample's scores (and picks) in a padded batch are those it gets
    alone."""
    specs = [IMG_A, IMG_C, IMG_B]
    model, adapter = family.model, gp.get_adapter(family.model)
    method = gp.make_method(name, **kw)
    batch = family.batch(specs)
    assert not bool(batch["attention_mask"].bool().all())  # left padding present
    with torch.no_grad():
        pre = prefill(model, adapter, method, batch)
        for b, spec in enumerate(specs):
            alone = prefill(model, adapter, method, family.batch([spec], [QUESTIONS[b]], seed=10 * b))
            for stage, (got, want) in enumerate(zip(pre.scratch["attn_scores"], alone.scratch["attn_scores"])):
                torch.testing.assert_close(got[b], want[0], atol=1e-5, rtol=1e-4, msg=f"sample {b} stage {stage}")
            assert torch.equal(alone.keep_masks[0], pre.keep_masks[b])
            assert pre.n_kept[b] < pre.n_vis[b]


def test_the_runtime_refuses_repeated_or_out_of_range_layers_of_any_method(family):
    """The runtime's own checks, for a method whose config does not check its layers (pdrop's does, so its tests
    never reach these): a repeated compaction layer, and a prune layer past the last LLM layer in training."""
    from glimpseprune.methods.base import PruningMethod
    from glimpseprune.runtime.train import forward_train

    class Repeats(PruningMethod):
        name = "repeats_test"

        def prune_layers(self, n_layers):
            return (1, 1)

        def select(self, state):
            return list(state.keep_vis)

    class PastTheEnd(PruningMethod):
        name = "past_the_end_test"

        def prune_layer(self, n_layers):
            return n_layers

    inputs = family.batch([IMG_C])
    with pytest.raises(ValueError, match="strictly increasing"):
        gp.apply(family.model, Repeats()).generate(inputs, max_new_tokens=1)
    n_layers = len(gp.get_adapter(family.model).layers(family.model))
    with pytest.raises(ValueError, match=rf"prune layer {n_layers} is outside the LLM's layer range"):
        forward_train(family.model, gp.get_adapter(family.model), PastTheEnd(), dict(inputs),
                      torch.ones(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool))


def test_cdpruner_negate_relevance_flips_the_relevance(family):
    """``negate_relevance=True`` ranks by the NEGATED cosine to the question (upstream's sign), min-max normalised:
    the pick equals the conditional DPP on minmax(-cos), and differs from the default's."""
    from glimpseprune.methods.cdpruner import question_embedding
    from glimpseprune.ops.dpp import conditional_dpp_select, minmax_normalize

    inputs = family.batch([IMG_A])
    adapter = gp.get_adapter(family.model)
    with torch.no_grad():
        enc = adapter.encode(family.model, inputs)
    vis = enc.embeds[0, enc.vis_mask[0]]
    k = max(1, int(0.2 * vis.shape[0]))
    q = question_embedding(enc.embeds[0], enc.attn_mask[0], enc.vis_mask[0])
    cos = torch.nn.functional.cosine_similarity(vis.float(), q[None], dim=-1)
    want = sorted(conditional_dpp_select(vis, minmax_normalize(-cos), k).tolist())
    plain = sorted(conditional_dpp_select(vis, minmax_normalize(cos), k).tolist())
    assert want != plain  # the check can fail: the sign changes the pick on this input
    out = gp.apply(family.model, "cdpruner", keep_ratio=0.2, negate_relevance=True).generate(inputs, max_new_tokens=1)
    assert out.keep_masks[0].nonzero().flatten().tolist() == want


# mutation audit of ops/ and the peer methods: hand-worked examples a one-line change could break unnoticed

# Rows of V are the feature vectors; L = V V^T, so det(L_S) = det(V_S)^2 for three picks.
DPP_V = torch.tensor([[0.0, 2.0, 2.0], [0.0, 2.0, 1.0], [2.0, -1.0, 0.0], [-1.0, 2.0, 1.0]], dtype=torch.float64)


def test_dpp_third_pick_uses_the_residual_of_every_earlier_pick():
    """L = V V^T = [[8, 6, -2, 6], [6, 5, -2, 5], [-2, -2, 5, -4], [6, 5, -4, 6]]. Greedy MAP by hand:
    pick 0 (largest diagonal, 8); then det{0, j} = 8 L_jj - L_0j^2 = 4 / 36 / 12 for j = 1 / 2 / 3: pick 2; then
    det{0, 2, 1} = det(V_{0,2,1})^2 = (-4)^2 = 16 beats det{0, 2, 3} = 2^2 = 4: pick 1. Projecting the third
    candidate on the SECOND pick's direction alone (forgetting the first pick's part of it) picks 3 instead."""
    L = DPP_V @ DPP_V.T
    assert L.tolist() == [[8, 6, -2, 6], [6, 5, -2, 5], [-2, -2, 5, -4], [6, 5, -4, 6]]
    assert dpp_greedy_map(L, 3).tolist() == [0, 2, 1]
    # the lazy conditional form: unit rows times relevance = the rows of V, so its kernel is the same L
    assert conditional_dpp_select(DPP_V.float(), DPP_V.norm(dim=1).float(), 3).tolist() == [0, 2, 1]


def test_dpp_greedy_is_scale_invariant():
    """Scaling a kernel scales every marginal gain alike, so the picks stay [0, 2, 1]; the degeneracy floor is
    relative (eps * max diagonal): an absolute one would call every gain of L * 1e-8 degenerate and fill by the
    diagonal alone ([0, 3, 1]: 8, 6, 5 ...)."""
    L = DPP_V @ DPP_V.T
    assert dpp_greedy_map(L * 1e-8, 3).tolist() == [0, 2, 1]
    assert dpp_greedy_map(L * 1e8, 3).tolist() == [0, 2, 1]


def test_nearest_target_maps_every_target_to_itself_even_for_duplicates():
    """Rows 0 and 1 point the same way (cosine 1 to each other): each, being a target, still maps to ITSELF, not to
    the lower-positioned duplicate. Otherwise a kept token of a merge plan (vscan: kept[nearest_target(vis, kept)])
    folds into another and stops being kept: fewer tokens than the budget. Non-targets tie to the lower position."""
    pts = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    assert nearest_target(pts, torch.tensor([0, 1])).tolist() == [0, 1, 0, 0]
    assert nearest_target(pts, torch.tensor([1, 0])).tolist() == [1, 0, 0, 0]


def test_window_quota_rounds_the_quota_up():
    """k = 3 over 2 windows: the quota is ceil(3 / 2) = 2 per window, so 3 tokens come back (the two best of window 0,
    0.9 and 0.8, then the best of window 1, 0.3), not floor(3 / 2) = 1 per window and only 2 tokens."""
    s = torch.tensor([0.9, 0.8, 0.7, 0.1, 0.2, 0.3])
    keep = window_quota_keep(s, torch.tensor([0, 0, 0, 1, 1, 1]), 3)
    assert keep.tolist() == [True, True, False, False, False, True]


def test_ratio_budget_keeps_at_least_one_token():
    """Every ratio-based method keeps max(1, floor(keep_ratio * n_vis)): 0.01 of 36 tokens is one token, not none."""
    from glimpseprune.methods.common import ratio_count

    assert ratio_count(36, 0.01) == 1 and ratio_count(0, 0.01) == 0 and ratio_count(36, 0.5) == 18
    for name in ("fastv", "divprune", "cdpruner", "visionzip", "downsample", "random", "vscan"):
        assert gp.make_method(name, keep_ratio=0.01).budget(36) == 1, name


# vscan's before-LLM scan on hand-made embeddings. The parameter-free attention received: two identical tokens split
# their own queries evenly (1 each within their group); two mirror-image tokens ([0, 1], [0, -1]) also receive 1
# each; a large token aligned with others draws most of the attention of the group.


def test_vscan_local_frac_is_the_share_picked_by_the_local_scan():
    """One 1 x 4 image, 2-token windows {0, 1}, {2, 3}. Within each window every token receives exactly 1 (a mirror
    pair, an identical pair): the local scan takes the lower index of each window, {0, 2}. Over the whole image the
    two large aligned tokens 2 and 3 receive the most (about 1.44 each): the global scan takes {2, 3}."""
    from glimpseprune.methods.vscan import scan_keep

    v = torch.tensor([[0.0, 1.0], [0.0, -1.0], [3.0, 0.0], [3.0, 0.0]])
    assert scan_keep(v, [(1, 4)], 2, 0.0, 2).tolist() == [False, False, True, True]  # global scan only
    assert scan_keep(v, [(1, 4)], 2, 1.0, 2).tolist() == [True, False, True, False]  # local scan only
    assert scan_keep(v, [(1, 4)], 2, 0.5, 2).tolist() == [True, False, True, False]  # 1 local (token 0), 1 global


def test_vscan_windows_of_different_images_are_numbered_apart():
    """Two 1 x 2 images, window 2: one window per image. The local scan with m = 2 takes one token per window, the
    lower index of each identical / mirror pair: {0, 2}. Were both images one window (ids not offset by the first
    image's window count), its quota would be 2 and the large image-0 tokens would take both places."""
    from glimpseprune.methods.vscan import scan_keep

    v = torch.tensor([[3.0, 0.0], [3.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    assert scan_keep(v, [(1, 2), (1, 2)], 2, 1.0, 2).tolist() == [True, False, True, False]


# Image 0: two identical large tokens (each receives exactly 1 within its image). Image 1: token 2 = [2, 0] and a
# near-zero token 3: token 2's own query pays it e^(4/sqrt 2) / (e^(4/sqrt 2) + 1) = 0.944 and token 3's query
# about 0.498 (logits 0 and 0.007), so token 2 receives 1.44 > 1, the most of any token WITHIN its image. Pooled
# over both images, the large tokens 0 and 1 would receive the most (about 1.63 each).
TWO_IMAGES = torch.tensor([[3.0, 0.0], [3.0, 0.0], [2.0, 0.0], [0.0, 0.1]])


def test_vscan_global_scan_attends_within_each_image():
    from glimpseprune.methods.vscan import scan_keep

    assert attention_received(TWO_IMAGES, torch.tensor([0, 0, 1, 1])).tolist() == \
        pytest.approx([1.0, 1.0, 1.442, 0.558], abs=1e-3)
    assert scan_keep(TWO_IMAGES, [(1, 2), (1, 2)], 1, 0.0, 2).tolist() == [False, False, True, False]


def test_visionzip_dominant_tokens_attend_within_each_image():
    """dominant_frac = 1, k = 1: the one kept token is the top attention received within its own image (token 2),
    nothing is merged and the rest are dropped."""
    from types import SimpleNamespace

    enc = SimpleNamespace(grids=[(1, 2), (1, 2)], image_owner=[0, 0], n_vis=[4])
    method = gp.make_method("visionzip", keep_ratio=0.25, dominant_frac=1.0)
    assert method.plan(SimpleNamespace(enc=enc), 0, TWO_IMAGES, 1).tolist() == [-1, -1, 2, -1]


def test_downsample_plan_by_hand():
    """Two 1 x 3 images pooled to 3 cells: split_budget([3, 3], 3) = [2, 1] (the tie to the lower index). Image 0 in
    2 cells, columns {0} and {1, 2}, kept as tokens 0 and 1 (the left of the two middles); image 1 in one cell, its
    centre token 1, i.e. token 4 of the sample."""
    from glimpseprune.methods.downsample import pooling_plan

    assert pooling_plan([(1, 3), (1, 3)], 3).tolist() == [0, 1, 1, 4, 4, 4]
    assert pooling_plan([(1, 3), (1, 3)], 1).tolist() == [1, 1, 1, -1, -1, -1]  # fewer cells than images
