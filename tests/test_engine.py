"""Engine correctness against stock transformers (the external oracle), on each tiny random model family (Qwen2.5-VL,
LLaVA) in fp32."""

from __future__ import annotations

import pytest
import torch
from conftest import IMG_A, IMG_B, IMG_C, make_batch, stock_new_tokens
from oracle import dropped_positions, masking, oracle_model, stock_generate
from transformers import DynamicCache, Qwen2Config

import glimpseprune as gp
from glimpseprune.runtime.cache import repeat_cache
from glimpseprune.runtime.engine import DEFAULT_MAX_NEW_TOKENS, prefill, resolve_generation_config
from glimpseprune.runtime.masks import attention_mask, causal_mask, check_left_padded
from glimpseprune.runtime.train import forward_train

N_NEW = 8


def pad_id(processor):
    return processor.tokenizer.pad_token_id


def keep_all_methods(module):
    return {"full": gp.get_method("full")(),
            "glimpse_t0": gp.make_method("glimpse", module, gp.SelectionConfig(threshold=0.0))}


@pytest.mark.parametrize("specs", [[IMG_A], [IMG_A, IMG_B, IMG_C], [[]], [[], [], []]],
                         ids=["img-b1", "img-b3", "text-b1", "text-b3"])
@pytest.mark.parametrize("method_name", ["full", "glimpse_t0"])
def test_keep_all_equals_stock(family, specs, method_name):
    model, processor = family.model, family.processor
    inputs = family.batch(specs)
    method = keep_all_methods(family.module)[method_name]
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        ref = family.stock_logits(inputs)
        pre = prefill(model, gp.get_adapter(model), method, inputs, all_logits=True)
    assert pre.logits.shape == ref.shape  # nothing pruned: same length
    assert sum(pre.n_kept) == sum(pre.n_vis)
    torch.testing.assert_close(pre.logits[valid], ref[valid], atol=1e-5, rtol=0)
    stock_tokens, _ = stock_generate(model, inputs, N_NEW, pad_token_id=pad_id(processor))
    out = gp.apply(model, method, processor=processor).generate(inputs, max_new_tokens=N_NEW)
    assert torch.equal(out.sequences, stock_tokens)


def _random_keep(n_vis, seed, frac=0.3):
    g = torch.Generator().manual_seed(seed)
    masks = []
    for n in n_vis:
        m = torch.rand(n, generator=g) < frac
        if n:
            m[0] = True
        masks.append(m)
    return masks


@pytest.mark.parametrize("use_cache", [True, False], ids=["oracle-cached", "oracle-uncached"])
@pytest.mark.parametrize("specs", [[IMG_A], [IMG_B]], ids=["one-image", "two-images"])
def test_pruning_equals_masking(family, specs, use_cache):
    """Our compacted prefill + cached decoding == stock model with the dropped keys masked. With use_cache=False
    the oracle recomputes the whole sequence at every step, so this also shows cached == uncached decoding."""
    model, processor = family.model, family.processor
    inputs = family.batch(specs)
    n_vis = (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
    keep = _random_keep(n_vis, seed=1)
    pm = gp.apply(model, "mask", processor=processor)
    out = pm.generate(inputs, max_new_tokens=N_NEW, keep_masks=keep, return_logits=True)
    K = out.prune_layer
    assert K == gp.config.default_prune_layer(model.config.text_config.num_hidden_layers)
    assert out.n_kept == [int(k.sum()) for k in keep] and out.n_kept[0] < n_vis[0]
    assert out.kv_len[0] == int(inputs["attention_mask"][0].sum()) - (n_vis[0] - out.n_kept[0])
    oracle = oracle_model(family.model_dir)
    with masking(dropped_positions(inputs, model.config.image_token_id, keep), K), torch.no_grad():
        ref_tokens, ref_logits = stock_generate(oracle, inputs, N_NEW, use_cache=use_cache,
                                                pad_token_id=pad_id(processor))
    assert torch.equal(out.sequences, ref_tokens)
    assert len(out.step_logits) == len(ref_logits)
    for ours, ref in zip(out.step_logits, ref_logits):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_prune_before_llm_equals_masking(family):
    """K = -1 (drop before the first layer) matches hiding the tokens from every layer."""
    model, processor = family.model, family.processor
    inputs = family.batch([IMG_C])
    keep = _random_keep([family.n_vis(IMG_C)], seed=3)
    out = gp.apply(model, "mask", prune_layer=-1).generate(inputs, max_new_tokens=N_NEW, keep_masks=keep,
                                                           return_logits=True)
    oracle = oracle_model(family.model_dir)
    with masking(dropped_positions(inputs, model.config.image_token_id, keep), -1), torch.no_grad():
        ref_tokens, ref_logits = stock_generate(oracle, inputs, N_NEW, pad_token_id=pad_id(processor))
    assert torch.equal(out.sequences, ref_tokens)
    torch.testing.assert_close(out.step_logits[0], ref_logits[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("method_name", ["glimpse", "mask"])
def test_mixed_batch_equals_single(family, mixed_specs, method_name):
    """Different image sizes, a two-image sample and a text-only sample: batch == one by one."""
    model, processor = family.model, family.processor
    kw = {"module": family.module} if method_name == "glimpse" else {}
    pm = gp.apply(model, method_name, processor=processor, **kw)
    questions = ["What colour is the square?", "Which picture has more circles?", "Is it sunny?"]
    batch = family.batch(mixed_specs, questions)
    n_vis = (batch["input_ids"] == model.config.image_token_id).sum(1).tolist()
    assert n_vis == [family.n_vis(s) for s in mixed_specs] and n_vis[2] == 0
    keep = _random_keep(n_vis, seed=2) if method_name == "mask" else None
    out = pm.generate(batch, max_new_tokens=N_NEW, keep_masks=keep)
    assert 0 < out.n_kept[0] < out.n_vis[0] and 0 < out.n_kept[1] < out.n_vis[1]
    assert out.n_kept[2] == out.n_vis[2] == 0
    for b, spec in enumerate(mixed_specs):
        single = family.batch([spec], [questions[b]], seed=10 * b)
        one = pm.generate(single, max_new_tokens=N_NEW, keep_masks=None if keep is None else [keep[b]])
        assert torch.equal(one.keep_masks[0], out.keep_masks[b])
        n = one.sequences.shape[1]
        assert torch.equal(one.sequences[0], out.sequences[b, :n])
        assert bool((out.sequences[b, n:] == pad_id(processor)).all())


def test_glimpse_never_influences_answer(family):
    """With the same keep mask, glimpse pruning and mask pruning give identical logits: the glimpse token is gone."""
    model = family.model
    inputs = family.batch([IMG_A, IMG_C])
    g = gp.apply(model, "glimpse", module=family.module).generate(inputs, max_new_tokens=N_NEW, return_logits=True)
    m = gp.apply(model, "mask").generate(inputs, max_new_tokens=N_NEW, keep_masks=g.keep_masks, return_logits=True)
    assert torch.equal(g.sequences, m.sequences)
    for a, b in zip(g.step_logits, m.step_logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_image_keep_masks_follow_grids(family):
    inputs = family.batch([IMG_B])
    out = gp.apply(family.model, "glimpse", module=family.module).generate(inputs, max_new_tokens=2)
    assert [tuple(m.shape) for m in out.image_keep_masks] == family.grids(IMG_B)
    assert sum(int(m.sum()) for m in out.image_keep_masks) == out.n_kept[0]


def test_sampling_is_seeded(family):
    inputs = family.batch([IMG_A, IMG_C])
    pm = gp.apply(family.model, "glimpse", module=family.module)
    a = pm.generate(inputs, max_new_tokens=N_NEW, do_sample=True, temperature=5.0, seed=7)
    b = pm.generate(inputs, max_new_tokens=N_NEW, do_sample=True, temperature=5.0, seed=7)
    c = pm.generate(inputs, max_new_tokens=N_NEW, do_sample=True, temperature=5.0, seed=8)
    greedy = pm.generate(inputs, max_new_tokens=N_NEW)
    assert torch.equal(a.sequences, b.sequences)
    assert not torch.equal(a.sequences, c.sequences) or not torch.equal(a.sequences, greedy.sequences)


@pytest.mark.parametrize("name", gp.list_methods())
def test_every_method_runs(family, name):
    """Every registered method prunes (or not) a mixed batch of each family, with consistent bookkeeping."""
    inputs = family.batch([IMG_A, IMG_B, []])
    n_vis = [family.n_vis(IMG_A), family.n_vis(IMG_B), 0]
    kw = {"keep_masks": _random_keep(n_vis, seed=4)} if name in ("mask", "oracle") else {}
    module = {"glimpse": family.module, "early_glimpse": family.early_module}.get(name)  # others take none
    method = gp.make_method(name, module)
    out = gp.apply(family.model, method, processor=family.processor).generate(inputs, max_new_tokens=3, **kw)
    assert out.n_vis == n_vis and out.sequences.shape[0] == 3 and len(out.texts) == 3
    assert all(0 <= k <= n for k, n in zip(out.n_kept, n_vis))
    assert [tuple(m.shape) for m in out.image_keep_masks] == family.grids(IMG_A) + family.grids(IMG_B)
    lengths = inputs["attention_mask"].sum(1).tolist()
    assert out.kv_len == [L - (n - k) for L, n, k in zip(lengths, n_vis, out.n_kept)]


def test_cache_keyword_follows_the_signature():
    """The runtime hands a module its KV cache under the keyword it takes: transformers 5.24 renamed
    ``past_key_values`` to ``cache`` (the old name warns there and goes in 5.40); 5.19-5.23 take the old one."""
    import functools

    from transformers.masking_utils import create_causal_mask

    from glimpseprune.runtime.cache import cache_param

    def new(x, cache=None): ...

    def old(x, past_key_values=None): ...

    @functools.wraps(new)
    def deprecated(*args, **kwargs): ...  # what transformers' deprecate_kwarg wraps around a renamed forward

    def open_ended(x, **kwargs): ...

    assert (cache_param(new), cache_param(old), cache_param(deprecated)) == ("cache", "past_key_values", "cache")
    assert cache_param(open_ended) == cache_param(create_causal_mask) in ("cache", "past_key_values")


def test_no_deprecated_cache_keyword_reaches_transformers(family):
    """A grouped prefill and cached decoding pass transformers no keyword it deprecates (from 5.24 the old cache
    keyword warns on every call, and breaks in 5.40): every decoder-layer call goes through ``run_layer``."""
    import warnings

    from glimpseprune.runtime.engine import decode_step
    from glimpseprune.runtime.groups import plan_groups

    model = family.model
    adapter = gp.get_adapter(model)
    inputs = family.batch([IMG_B, IMG_A, []])
    n_vis = (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
    keep = [torch.arange(n) < max(1, int(f * n)) for n, f in zip(n_vis, [1.0, 0.05, 0.0])]
    with warnings.catch_warnings(record=True) as seen, torch.no_grad():
        warnings.simplefilter("always")
        pre = prefill(model, adapter, gp.make_method("mask"), inputs, {"keep_masks": keep}, group=True)
        for step in range(2):
            decode_step(model, adapter, pre, pre.logits.argmax(-1), step)
    assert plan_groups(pre.kv_len) is not None, pre.kv_len  # the layers after K really ran in groups
    assert not [str(w.message) for w in seen if "past_key_values" in str(w.message)]


# mutation audit: rules a one-line change could break unnoticed

def test_repeat_cache_puts_the_g_copies_of_a_row_next_to_each_other():
    """rows b*G .. b*G+G-1 of the repeated cache are row b (the order expand_prefill's other fields use)."""
    src = DynamicCache()
    B, G = 3, 2
    for layer in range(2):
        k = torch.arange(B, dtype=torch.float32).view(B, 1, 1, 1).expand(B, 2, 4, 8) + 10 * layer
        src.update(k.clone(), -k.clone(), layer)
    cfg = Qwen2Config(num_hidden_layers=2, hidden_size=16, num_attention_heads=2, num_key_value_heads=2)
    out = repeat_cache(src, cfg, G)
    for layer in range(2):
        for b in range(B):
            for g in range(G):
                assert torch.equal(out.layers[layer].keys[b * G + g], src.layers[layer].keys[b])
                assert torch.equal(out.layers[layer].values[b * G + g], src.layers[layer].values[b])


def test_all_zero_attention_row_is_refused_by_name():
    check_left_padded(torch.tensor([[0, 1, 1], [1, 1, 1]]))  # left padding: fine
    with pytest.raises(ValueError, match="all-zero attention_mask"):
        check_left_padded(torch.tensor([[1, 1, 1], [0, 0, 0]]))


# mutation audit, round 2: rules a one-line change could break unnoticed

def test_inference_glimpse_sits_where_training_put_it(family):
    """The VIP's scores at inference (glimpse token appended at position next_pos, read after layer K) equal those
    of the training forward, which places the glimpse at next_pos too (``runtime/train.py``): a module trained there
    must be scored there. Moving the glimpse's position id at either place changes the scores."""
    model = family.model
    adapter = gp.get_adapter(model)
    method = gp.make_method("glimpse", family.module)
    inputs = family.batch([IMG_A, IMG_C])  # two lengths: left padding in the batch
    suffix = torch.full((2, 2), 5, dtype=torch.long)
    with torch.no_grad():
        pre = prefill(model, adapter, method, inputs)
        train = forward_train(model, adapter, method, inputs, suffix, torch.ones(2, 2, dtype=torch.bool))
    assert len(pre.scratch["vip_logits"]) == len(train.vip_logits) == 2
    for ours, trained in zip(pre.scratch["vip_logits"], train.vip_logits):
        torch.testing.assert_close(ours, trained, atol=1e-4, rtol=0)


def test_a_finished_row_stays_finished_when_pad_is_not_an_eos_id(model, pm, three):
    """With an EOS id that is not the pad id, a row that stopped gets pad on every later step, as stock generate
    does (its ``unfinished`` flags only ever turn off). Rows whose pad is also an EOS id cannot tell."""
    n_new = 16
    plain = pm.generate(three, max_new_tokens=n_new)
    row = plain.sequences[0].tolist()
    extra = row[4]
    at = row.index(extra)  # its first occurrence
    pad = model.generation_config.pad_token_id
    assert extra != pad
    out = pm.generate(three, max_new_tokens=n_new, eos_token_id=[extra])
    assert out.sequences.shape[1] > at + 2  # other rows run on for at least two more steps
    assert out.sequences[0, at].item() == extra
    assert (out.sequences[0, at + 1:] == pad).all()
    assert torch.equal(out.sequences, stock_new_tokens(model, three, max_new_tokens=n_new, eos_token_id=[extra]))


def test_no_decode_step_runs_after_the_last_token(pm, one):
    """T new tokens take the prefill and T - 1 decode steps: the last token is never fed back (that step's logits
    would be thrown away). ``timing["decode_steps"]`` reports them, and each step adds one cache column."""
    n_new = 4
    out = pm.generate(one, max_new_tokens=n_new)
    assert out.sequences.shape[1] == n_new  # no EOS in these few steps
    assert out.timing["decode_steps"] == n_new - 1
    assert out.prefill.key_mask.shape[1] == out.kv_len[0] + n_new - 1
    assert out.prefill.cache.get_seq_length(0) == out.kv_len[0] + n_new - 1


def test_default_max_new_tokens_is_32():
    """Documented default (README / api.generate): 32 new tokens when neither the call nor its config says;
    transformers' own default is 20."""
    from transformers import GenerationConfig

    assert DEFAULT_MAX_NEW_TOKENS == 32
    assert resolve_generation_config().max_new_tokens == 32
    assert resolve_generation_config(GenerationConfig(max_new_tokens=5)).max_new_tokens == 5
    assert resolve_generation_config(max_new_tokens=7).max_new_tokens == 7


# mutation audit


def test_causal_mask_by_hand():
    """Two queries (the last two of three keys): query i sees key j iff j <= i and key j is real; a row whose keys
    are all padding stays finite (the dtype's minimum, not -inf)."""
    m = causal_mask(torch.tensor([[True, True, True], [False, False, False]]), 2, torch.float32)
    lo = torch.finfo(torch.float32).min
    assert m.shape == (2, 1, 2, 3)
    assert m[0, 0].tolist() == [[0.0, 0.0, lo], [0.0, 0.0, 0.0]]
    assert torch.isfinite(m).all() and bool((m[1] == lo).all())


def test_attention_mask_checks_the_key_mask_length(model):
    cfg = model.config.text_config
    hidden = torch.zeros(1, 3, cfg.hidden_size)
    with pytest.raises(ValueError, match="prefill key mask covers 4 keys for 3 queries"):
        attention_mask(cfg, hidden, torch.ones(1, 4, dtype=torch.bool))
    cache = DynamicCache(config=cfg)
    cache.update(torch.zeros(1, cfg.num_key_value_heads, 5, 16), torch.zeros(1, cfg.num_key_value_heads, 5, 16), 0)
    with pytest.raises(ValueError, match=r"key mask covers 7 keys but the cache holds 5 \+ 1 new"):
        attention_mask(cfg, hidden[:, :1], torch.ones(1, 7, dtype=torch.bool), cache)
    attention_mask(cfg, hidden[:, :1], torch.ones(1, 6, dtype=torch.bool), cache)  # 5 + 1: accepted


def test_qwen2_5_vl_taps_are_merge_pooled_in_raster_order(model, one, monkeypatch):
    """With ViT block 0 made the identity, tap 0 is the patch embedding's rows (the processor's order: each 2x2 merge
    group contiguous, the groups in raster order) averaged over each merge group; the ViT reorders its rows into
    windows before block 0, so this holds only if the tap is put back into raster order (the tiny ViT's 112 px
    windows split the 8 x 8-token image into four)."""
    visual = model.model.visual
    monkeypatch.setattr(visual.blocks[0], "forward", lambda hidden_states, *a, **k: hidden_states)
    with torch.no_grad():
        enc = gp.get_adapter(model).encode(model, dict(one), taps=(0,))
        rows = visual.patch_embed(one["pixel_values"])
    torch.testing.assert_close(enc.vision_feats[0], rows.view(-1, 4, rows.shape[-1]).mean(dim=1))


def test_qwen2_5_vl_encode_errors_are_named(model, processor, one):
    adapter, depth = gp.get_adapter(model), len(model.model.visual.blocks)
    two = dict(make_batch(processor, [IMG_B]))  # images of 24 and 32 tokens: swapping their grids keeps the total
    two["image_grid_thw"] = two["image_grid_thw"].flip(0)
    with pytest.raises(ValueError, match="image 0: its grid gives 32 visual tokens but the prompt holds 24"):
        adapter.encode(model, two)
    with pytest.raises(ValueError, match=rf"vision tap {depth} outside the ViT's blocks \[0, {depth - 1}\]"):
        adapter.encode(model, dict(one), taps=(depth,))
    no_grid = {k: v for k, v in one.items() if k != "image_grid_thw"}
    with pytest.raises(ValueError, match="pixel_values and image_grid_thw must be given together"):
        adapter.encode(model, no_grid)


def test_placeholder_runs_and_layout_by_hand():
    """Runs that touch either end of a row count: image id 7 and video id 9, a 2 x 2 merge."""
    from types import SimpleNamespace

    from glimpseprune.adapters.qwen2_5_vl import _layout, image_runs

    ids = torch.tensor([[7, 7, 1, 9, 9, 1, 7], [1, 1, 1, 1, 1, 1, 1]])
    assert image_runs(ids, 7) == [[2, 1], []] and image_runs(ids, 9) == [[2], []]
    cfg = SimpleNamespace(image_token_id=7, video_token_id=9)
    grids = {"image": torch.tensor([[1, 2, 4], [1, 2, 2]]), "video": torch.tensor([[2, 2, 2]])}
    # the video (t = 2) lists its two frame-groups in place, between the two images
    assert _layout(ids, cfg, grids, 2) == ([(1, 2), (1, 1), (1, 1), (1, 1)], [0, 0, 0, 0], [-1, 0, 0, -1])


def test_a_module_pruning_after_layer_0_gets_its_glimpse_at_inference(model, processor):
    """K = 0 is a layer: the glimpse token is appended at inference as in training (the VIP scores agree)."""
    from conftest import small_glimpse_config

    torch.manual_seed(0)
    module = gp.GlimpseModule(small_glimpse_config(model, prune_layer=0, attn_layers=(0,))).eval()
    adapter, method = gp.get_adapter(model), gp.make_method("glimpse", module)
    inputs = make_batch(processor, [IMG_A, IMG_C])
    with torch.no_grad():
        pre = prefill(model, adapter, method, inputs)
        train = forward_train(model, adapter, method, inputs, torch.full((2, 1), 5), torch.ones(2, 1, dtype=torch.bool))
    assert pre.prune_layer == 0
    for ours, trained in zip(pre.scratch["vip_logits"], train.vip_logits, strict=True):
        torch.testing.assert_close(ours, trained, atol=1e-4, rtol=0)
