"""Grouped execution after the last compaction (``runtime/groups.py``): the plan is a pure function of the kept
lengths, and a grouped prefill gives the same logits, cache and tokens as one padded batch (and as the stock model
masked the same way, through the engine's oracle tests that run mixed batches)."""

from __future__ import annotations

import pytest
import torch
from conftest import IMG_A, IMG_B, IMG_C

import glimpseprune as gp
from glimpseprune.runtime.engine import decode_step, prefill
from glimpseprune.runtime.groups import plan_groups


def test_plan_groups():
    assert plan_groups([100]) is None  # one sample
    assert plan_groups([50, 50, 50]) is None  # nothing padded
    assert plan_groups([100, 95, 90]) is None  # < 20 % of the slots would be saved
    assert plan_groups([8, 250, 16, 256]) == [[3, 1], [2, 0]]  # 47 % saved with two groups
    groups = plan_groups(list(range(8, 264, 16)))  # kept counts 8 ... 248: about half the slots padding
    assert groups is not None and 2 <= len(groups) <= 4
    assert sorted(b for g in groups for b in g) == list(range(16))
    lengths = list(range(8, 264, 16))
    cost = sum(len(g) * max(lengths[b] for b in g) for g in groups)
    assert cost <= 0.7 * len(lengths) * max(lengths)
    assert plan_groups([8, 250, 16, 256], min_saving=0.6) is None


def _keep(n_vis, fracs, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, f in zip(n_vis, fracs):
        m = torch.zeros(n, dtype=torch.bool)
        m[torch.randperm(n, generator=g)[:max(1, int(f * n))]] = True
        out.append(m)
    return out


@pytest.mark.parametrize("specs", [[IMG_A, IMG_C, IMG_A], [IMG_B, IMG_A, []]], ids=["three-images", "mixed"])
def test_grouped_equals_one_padded_batch(family, specs):
    model = family.model
    adapter = gp.get_adapter(model)
    inputs = family.batch(specs, questions=["What colour is the square?", "Is there a star?", "Count them."])
    n_vis = (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
    keep = _keep(n_vis, [1.0, 0.05, 0.5][:len(specs)])
    method = gp.make_method("mask")
    with torch.no_grad():
        pres = {g: prefill(model, adapter, method, inputs, {"keep_masks": keep}, all_logits=True, group=g)
                for g in (False, True)}
    lengths = pres[True].key_mask.sum(1).tolist()
    assert plan_groups(lengths) is not None, lengths  # the batch really is grouped
    a, b = pres[False], pres[True]
    valid = a.key_mask
    assert torch.equal(valid, b.key_mask) and a.kv_len == b.kv_len
    torch.testing.assert_close(b.logits[valid], a.logits[valid], atol=1e-5, rtol=0)
    for la, lb in zip(a.cache.layers, b.cache.layers):
        sel = valid[:, None, :, None].expand_as(la.keys)
        torch.testing.assert_close(lb.keys[sel], la.keys[sel], atol=1e-5, rtol=0)
        torch.testing.assert_close(lb.values[sel], la.values[sel], atol=1e-5, rtol=0)
    tok = a.logits[torch.arange(len(specs)), -1].argmax(-1)
    with torch.no_grad():
        for step in range(3):
            la, lb = decode_step(model, adapter, a, tok, step), decode_step(model, adapter, b, tok, step)
            torch.testing.assert_close(lb, la, atol=1e-5, rtol=0)
            tok = la.argmax(-1)


def test_plan_groups_boundaries_by_hand():
    """[4, 1]: one batch costs 2 * 4 = 8 slots, two groups 4 + 1 = 5: a saving of exactly 3/8, enough for
    min_saving=0.375 (the bar is inclusive). [21, 19]: one group costs 42, two cost 40; 42 is within the 5 % slack
    of the best plan (42 <= 40 * 1.05), so the fewer groups win and nothing is split."""
    assert plan_groups([4, 1], min_saving=0.375) == [[0], [1]]
    assert plan_groups([4, 1], min_saving=0.376) is None
    assert plan_groups([21, 19], min_saving=0.0) is None
    assert plan_groups([22, 19], min_saving=0.0) == [[0], [1]]  # 44 > 42: the two groups win
