"""GlimpsePrune+ RL pieces: GRPO math on hand-computed numbers, and group rollouts on the pruned schedule (one shared
prefill = G independent ones; teacher-forced log-probs = the decode's own distribution)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_batch, stock_new_tokens

import glimpseprune as gp
from glimpseprune.methods.glimpse import GlimpseMethod
from glimpseprune.registry import get_adapter
from glimpseprune.runtime.engine import decode_step, prefill
from glimpseprune.runtime.rollout import completion_logprobs, expand_prefill, sample_group
from glimpseprune.training.rl.grpo import group_advantages, grpo_loss, k3_kl, sft_loss

# ------------------------------------------------------------------ math


def test_group_advantages_hand_computed():
    a = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0]), G=3, eps=1e-4)
    # group 1: mean 1/3, population std sqrt(2)/3 = 0.4714; group 2: mean 2/3, same std
    s = math.sqrt(2) / 3 + 1e-4
    want = [2 / 3 / s, -1 / 3 / s, -1 / 3 / s, -2 / 3 / s, 1 / 3 / s, 1 / 3 / s]
    assert torch.allclose(a, torch.tensor(want), atol=1e-6)
    assert torch.equal(group_advantages(torch.tensor([0.7, 0.7, 0.7, 0.7]), G=4), torch.zeros(4))
    # scale=False (Dr. GRPO): r - mean only, so a nearly-sure group's rare miss weighs 1 - 1/G, not sqrt(G - 1)
    a = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]), G=4, scale=False)
    assert torch.allclose(a, torch.tensor([0.75, -0.25, -0.25, -0.25, 0.0, 0.0, 0.0, 0.0]))
    miss = group_advantages(torch.tensor([0.0, 1.0, 1.0, 1.0]), G=4)
    assert miss[0] == pytest.approx(-0.75 / (math.sqrt(3) / 4 + 1e-4)) and miss[0] < -1.7  # scaled: -sqrt(3)
    with pytest.raises(ValueError, match="multiple of G"):
        group_advantages(torch.ones(5), G=2)


def test_k3_kl_hand_computed():
    kl = k3_kl(torch.log(torch.tensor([0.5, 0.2])), torch.log(torch.tensor([0.25, 0.2])))
    # d = log(0.25/0.5) = -log 2: e^d - d - 1 = 0.5 + 0.693147 - 1; equal probabilities: 0
    assert torch.allclose(kl, torch.tensor([0.5 + math.log(2) - 1, 0.0]), atol=1e-6)


def test_equal_rewards_give_no_policy_gradient_and_single_update_gradient_is_minus_a_grad_logp():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.1], [-3.0, -1.0], [-0.2, -0.4]], requires_grad=True)
    mask = torch.tensor([[True, True], [True, False], [True, True], [True, True]])
    adv = group_advantages(torch.tensor([0.3, 0.3, 1.0, 0.0]), G=2)  # group 1 all equal
    loss, _ = grpo_loss(logp, logp.detach(), None, adv, mask, beta=0.0)
    loss.backward()
    assert torch.equal(logp.grad[:2], torch.zeros(2, 2))  # the equal-reward group: no gradient
    # rows 3-4: d loss / d logp[r, t] = -A_r / (n_tokens_r * R), R = 4 rows
    a = adv[2:]
    assert torch.allclose(logp.grad[2:], (-a[:, None] / (2 * 4)).expand(2, 2), atol=1e-6)


def test_clipped_ratio_stops_the_gradient_beyond_the_clip():
    logp = torch.tensor([[0.5]], requires_grad=True)  # ratio e^0.5 = 1.65 > 1.2 with a positive advantage
    loss, _ = grpo_loss(logp, torch.zeros(1, 1), None, torch.tensor([1.0]), torch.ones(1, 1, dtype=torch.bool),
                        beta=0.0, clip_eps=0.2)
    loss.backward()
    assert loss.detach().item() == pytest.approx(-1.2) and float(logp.grad) == 0.0


def test_sft_loss_hand_computed():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -9.0], [-7.0, -7.0]], requires_grad=True)
    mask = torch.tensor([[True, True], [True, False], [False, False]])  # row 3: a prompt without a reference
    loss = sft_loss(logp, mask)
    assert float(loss.detach()) == pytest.approx((1.5 + 0.5) / 2)  # per-row token means 1.5 and 0.5; row 3 left out
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-0.25, -0.25], [-0.5, 0.0], [0.0, 0.0]]))
    none = sft_loss(logp, torch.zeros(3, 2, dtype=torch.bool))
    assert float(none.detach()) == 0.0 and none.requires_grad


# ------------------------------------------------------------------ rollouts on the pruned schedule


@pytest.fixture(scope="module")
def setup(model, processor, module):
    inputs = make_batch(processor, [[(56, 84)], [(84, 56)]], questions=["What is it?", "Which colour?"], seed=3)
    return model, get_adapter(model), GlimpseMethod(module=module), dict(inputs)


def test_g_rollouts_from_one_prefill_equal_g_independent_runs(setup):
    model, adapter, method, inputs = setup
    G, steps, seeds = 3, 5, [11, 12, 13, 21, 22, 23]
    with torch.no_grad():
        pre = prefill(model, adapter, method, inputs)
        toks, mask = sample_group(model, adapter, expand_prefill(model, adapter, pre, G), steps, [-1], 0, 1.0, seeds)
        # the tiny random model's next-token distribution is near-uniform, so seeded tokens alone would match from
        # another prompt's cache too: one decode step's logits from each copy are compared as well
        probe = torch.zeros(2 * G, dtype=torch.long)
        copies = decode_step(model, adapter, expand_prefill(model, adapter, pre, G), probe, 0)
        for b in range(2):
            one = {k: v[b:b + 1] if torch.is_tensor(v) and v.shape[0] == 2 else v for k, v in inputs.items()}
            if "pixel_values" in inputs:  # one image per sample, rows in batch order
                n = [int(t.prod()) for t in inputs["image_grid_thw"]]
                start = sum(n[:b])
                one["pixel_values"] = inputs["pixel_values"][start:start + n[b]]
                one["image_grid_thw"] = inputs["image_grid_thw"][b:b + 1]
            # trim sample b's left padding so it is a batch of its own
            keep = one["attention_mask"][0].bool()
            for k in ("input_ids", "attention_mask", "mm_token_type_ids"):
                if k in one:
                    one[k] = one[k][:, keep]
            alone = decode_step(model, adapter, prefill(model, adapter, method, one), probe[:1], 0)
            for g in range(G):
                torch.testing.assert_close(copies[b * G + g], alone[0], atol=1e-5, rtol=1e-5)
                single = prefill(model, adapter, method, one)
                t1, _ = sample_group(model, adapter, single, steps, [-1], 0, 1.0, [seeds[b * G + g]])
                assert torch.equal(t1[0], toks[b * G + g]), (b, g)
    assert mask.all()  # no eos id -1: every row runs all steps


def test_teacher_forced_logprobs_equal_the_decode_distribution(setup):
    model, adapter, method, inputs = setup
    G = 2
    with torch.no_grad():
        pre = prefill(model, adapter, method, inputs)
        ex = expand_prefill(model, adapter, pre, G)
        toks, _ = sample_group(model, adapter, ex, 4, [-1], 0, 1.0, [1, 2, 3, 4])
        # the decode's own log-probs of the sampled tokens, step by step from a fresh expanded prefill
        ex2 = expand_prefill(model, adapter, pre, G)
        want, logits = [], ex2.logits
        for t in range(toks.shape[1]):
            want.append(torch.log_softmax(logits.float(), -1).gather(-1, toks[:, t:t + 1]).squeeze(-1))
            logits = decode_step(model, adapter, ex2, toks[:, t], t)
        got = completion_logprobs(model, adapter, expand_prefill(model, adapter, pre, G), toks)
    assert torch.allclose(got, torch.stack(want, dim=1), atol=1e-5)
    assert pre.cache.get_seq_length(0) == pre.key_mask.shape[1]  # expansion never touched the original cache


# mutation audit: rules a one-line change could break unnoticed

def test_grpo_loss_adds_beta_times_the_masked_k3_kl():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.1]])
    ref = torch.tensor([[-1.5, -2.0], [-0.2, -9.0]])
    mask = torch.tensor([[True, True], [True, False]])
    adv = torch.zeros(2)  # no policy term: the loss is the KL term alone
    k = k3_kl(logp, ref)
    kl_rows = torch.stack([(k[0, 0] + k[0, 1]) / 2, k[1, 0]])  # row 2's masked token left out
    loss, stats = grpo_loss(logp, logp, ref, adv, mask, beta=0.1)
    assert stats["kl"] == pytest.approx(float(kl_rows.mean()), rel=1e-6)
    assert float(loss) == pytest.approx(0.1 * float(kl_rows.mean()), rel=1e-6)
    loss0, _ = grpo_loss(logp, logp, ref, adv, mask, beta=0.0)
    assert float(loss0) == 0.0


# mutation audit, round 2: rules a one-line change could break unnoticed

def test_a_rollout_stops_at_its_first_eos_and_is_masked_after_it(model, processor, module):
    """``sample_group``: a row runs up to and including its first EOS; every later slot holds ``pad`` and is masked
    out (the GRPO loss must not score them), while the other rows go on. The pad id here is not an EOS id."""
    adapter = get_adapter(model)
    method = GlimpseMethod(module=module)
    inputs = dict(make_batch(processor, [[(56, 84)], [(84, 56)]], questions=["What is it?", "Which colour?"], seed=3))
    G, steps, seeds, pad = 2, 8, [11, 12, 21, 22], 0
    with torch.no_grad():
        pre = prefill(model, adapter, method, inputs)
        free, free_mask = sample_group(model, adapter, expand_prefill(model, adapter, pre, G), steps, [-1], pad, 1.0,
                                       seeds)
        eos = int(free[0, 1])  # row 0's second token becomes the EOS id
        assert eos != pad and free_mask.all()
        toks, mask = sample_group(model, adapter, expand_prefill(model, adapter, pre, G), steps, [eos], pad, 1.0,
                                  seeds)
    first = {r: (free[r] == eos).nonzero().flatten()[0].item() if (free[r] == eos).any() else None
             for r in range(free.shape[0])}
    assert first[0] == 1
    assert any(f is None or f >= 3 for f in first.values())  # some row runs on: the batch does not stop at once
    for r, f in first.items():
        n = toks.shape[1] if f is None else f + 1  # up to and including the first EOS
        assert torch.equal(toks[r, :n], free[r, :n]), r
        assert mask[r, :n].all(), r
        assert (toks[r, n:] == pad).all() and not mask[r, n:].any(), r


def test_expanded_prefill_lists_and_logprob_temperature(model, processor, module):
    """``expand_prefill`` repeats each sample's per-sample lists G times in a row (rows b*G .. b*G+G-1, like its
    tensors), and ``completion_logprobs`` divides the logits by the sampling temperature."""
    from glimpseprune.runtime.rollout import completion_logprobs

    adapter = get_adapter(model)
    method = GlimpseMethod(module=module)
    inputs = dict(make_batch(processor, [[(56, 84)], [(112, 56)]], questions=["What is it?", "Which colour?"], seed=3))
    G = 2
    with torch.no_grad():
        pre = prefill(model, adapter, method, inputs)
        assert pre.n_vis[0] != pre.n_vis[1]
        ex = expand_prefill(model, adapter, pre, G)
        assert ex.n_vis == [pre.n_vis[0]] * G + [pre.n_vis[1]] * G
        assert [m.numel() for m in ex.keep_masks] == ex.n_vis and ex.kv_len == [pre.kv_len[0]] * G + [pre.kv_len[1]] * G
        toks = torch.tensor([[5, 6], [7, 8], [9, 10], [11, 12]])
        hot = completion_logprobs(model, adapter, expand_prefill(model, adapter, pre, G), toks, temperature=0.5)
    want0 = torch.log_softmax(ex.logits.float() / 0.5, dim=-1).gather(-1, toks[:, :1]).squeeze(-1)
    torch.testing.assert_close(hot[:, 0], want0, atol=1e-5, rtol=1e-5)


# mutation audit, round 3: rules a one-line change could break unnoticed

def test_zero_temperature_rollouts_equal_stock_greedy_per_prompt(model, processor, three):
    """At temperature 0 ``sample_group`` is greedy: with every token kept (method ``full``), each of a prompt's G
    copies equals stock ``generate`` on the left-padded batch, row by row (its first token from that prompt's
    prefill logits, later ones at the right positions), and stops at either of the model's EOS ids. The mask runs up
    to and including the first EOS; no decode step runs after the last token, and the cache holds every token at
    its position."""
    adapter = get_adapter(model)
    eos, pad = list(model.generation_config.eos_token_id), model.generation_config.pad_token_id
    n_new, G = 12, 2
    ref = stock_new_tokens(model, three, max_new_tokens=n_new, do_sample=False)
    with torch.no_grad():
        pre = prefill(model, adapter, gp.make_method("full"), dict(three))
        ex = expand_prefill(model, adapter, pre, G)
        toks, mask = sample_group(model, adapter, ex, n_new, eos, pad, 0.0, list(range(3 * G)))
        cache_len = ex.key_mask.shape[1]
        # one more step over the extended cache: the stock forward on prompt + tokens (the tiny model's logits move
        # by ~2e-3 when the decoded tokens sit one position off, too little to change its greedy tokens)
        last = decode_step(model, adapter, ex, toks[:, -1], n_new - 1)
        full = dict(three)
        for key, fill in (("input_ids", ref), ("attention_mask", torch.ones_like(ref)),
                          ("mm_token_type_ids", torch.zeros_like(ref))):
            full[key] = torch.cat([three[key], fill.to(three[key].dtype)], dim=1)
        want = model(**full).logits[:, -1]
    assert ref.shape == (3, n_new) and len({tuple(r[:1].tolist()) for r in ref}) == 3  # prompts start apart
    ends = [next((t for t, x in enumerate(r.tolist()) if x in eos), None) for r in ref]
    assert ends[0] is None and ends[2] is not None and ref[2, ends[2]] == eos[1]  # one row stops mid-way
    assert torch.equal(toks, ref.repeat_interleave(G, dim=0))
    for r in range(3 * G):
        n = n_new if ends[r // G] is None else ends[r // G] + 1
        assert mask[r, :n].all() and not mask[r, n:].any(), r
    assert cache_len == pre.key_mask.shape[1] + n_new - 1
    torch.testing.assert_close(last, want.repeat_interleave(G, dim=0), atol=1e-4, rtol=0)


def test_group_size_and_seed_count_are_checked_and_stage_masks_repeated(setup):
    """``expand_prefill`` refuses G < 1 by name and repeats each compaction's per-sample keep masks G times in a row;
    ``sample_group`` refuses a seed list of another length than its rows (too few or too many)."""
    model, adapter, method, inputs = setup
    with torch.no_grad():
        pre = prefill(model, adapter, method, inputs)
        with pytest.raises(ValueError, match="G must be >= 1, got 0"):
            expand_prefill(model, adapter, pre, 0)
        ex = expand_prefill(model, adapter, pre, 2)
        for seeds in ([1, 2, 3], [1, 2, 3, 4, 5]):
            with pytest.raises(ValueError, match=f"{len(seeds)} seeds for 4 rollouts"):
                sample_group(model, adapter, ex, 2, [-1], 0, 1.0, seeds)
    assert len(pre.stage_keep_masks) == 1 and len(ex.stage_keep_masks) == 1
    a, b = pre.stage_keep_masks[0]
    assert [m.tolist() for m in ex.stage_keep_masks[0]] == [a.tolist(), a.tolist(), b.tolist(), b.tolist()]
