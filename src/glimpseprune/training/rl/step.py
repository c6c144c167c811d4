"""One GlimpsePrune+ (GRPO) step: G rollouts per prompt from one pruned prefill each, their rewards (with optional
off-policy guidance), group advantages, and the update on the same pruned schedule (``stage2.py`` runs the loop).

The config is a ``training.stage2.Stage2Config`` (imported for type checking only: stage2 imports this file)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ...config import SelectionConfig

if TYPE_CHECKING:
    from ..stage2 import Stage2Config


def question_text(cfg, q: str) -> str:
    return f"{q}\n{cfg.prompt_suffix}" if cfg.prompt_suffix else q


@dataclass
class Rollouts:
    """One batch of group rollouts: rows b*G .. b*G+G-1 answer prompt b."""

    inputs: dict
    keep_masks: list[torch.Tensor]  # per prompt, the visual tokens the rollouts saw
    tokens: torch.Tensor  # (R, T)
    mask: torch.Tensor  # (R, T) bool, up to and including the first EOS
    texts: list[str]
    rewards: torch.Tensor  # (R,)
    advantages: torch.Tensor  # (R,)
    stats: dict
    answers: list[str] | None = None  # per prompt, the reference answer (for the supervised term, sft_weight > 0)


class GRPOStep:
    """Rollouts, rewards and the GRPO loss for one batch of prompts (the model carries the LoRA adapter)."""

    def __init__(self, model, processor, module, cfg: Stage2Config, rewards):
        from ...api import make_method, module_method_name
        from ...registry import get_adapter

        self.model, self.processor, self.module, self.cfg, self.rewards = model, processor, module, cfg, rewards
        self.adapter = get_adapter(model)
        self.K = module.cfg.prune_layer
        # glimpse, or early_glimpse for an early module (its masks leave after its prune_layer)
        self.vip = make_method(module_method_name(module), module, SelectionConfig(max_keep_ratio=cfg.cap))
        self.fixed = make_method("mask", prune_layer=self.K)
        tok = processor.tokenizer
        gc = getattr(model, "generation_config", None)
        eos = getattr(gc, "eos_token_id", None) or tok.eos_token_id
        self.eos = [eos] if isinstance(eos, int) else list(eos)
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    def inputs(self, items: list[dict]) -> dict:
        from ...processing import build_inputs

        batch = build_inputs(self.processor, [[it["image"]] for it in items],
                             [question_text(self.cfg, it["question"]) for it in items])
        return dict(batch)

    def keep_masks(self, items, inputs) -> list[torch.Tensor] | None:
        if self.cfg.mask_source != "boxes":
            return None
        boxes = [it.get("mask_boxes", it["boxes"]) for it in items]  # hand-made items may have no mask_boxes
        masks = self.adapter.box_masks(self.model, self.processor, inputs, boxes,
                                       [(it["width"], it["height"]) for it in items])
        return [torch.from_numpy(m.reshape(-1)) for m in masks]

    def __call__(self, items: list[dict], seeds: list[int]) -> dict:
        """One GRPO step on ``items`` (rollout row r samples with seed ``seeds[r]``): updates the adapter through
        ``optimizer_step`` unless every group's rewards are equal and there is no supervised term (sft_weight 0);
        returns the step's statistics."""
        batch = self.rollout(items, seeds)
        vip = self.vip_update(items) if self.cfg.mask_source == "vip_cotrain" else {}
        if not bool(batch.advantages.any()) and not self.cfg.sft_weight:  # all groups' rewards equal: no gradient
            return {**batch.stats, **vip, "policy_loss": 0.0, "kl": 0.0, "skipped": 1.0}
        return {**batch.stats, **vip, **self.update(batch)}

    def mixed_step(self, draw, seeds) -> dict:
        """Dynamic sampling: roll out batches from ``draw()`` (up to 1 + dynamic_sampling of them, seeds from
        ``seeds(k)``), keep the prompts whose G rewards differ, and update once on (at most) prompts_per_step of
        them. Statistics are over every rollout made. With mask_source vip_cotrain the module takes one stage-1 step
        on the first batch's prompts, as ``__call__`` does on its own."""
        cfg, G = self.cfg, self.cfg.num_generations
        kept_items, groups, all_stats, first = [], [], [], None
        for k in range(1 + cfg.dynamic_sampling):
            items = draw()
            first = first or items
            batch = self.rollout(items, seeds(k))
            all_stats.append(batch.stats)
            for b, it in enumerate(items):
                rows = slice(b * G, (b + 1) * G)
                if bool(batch.advantages[rows].any()) and len(kept_items) < cfg.prompts_per_step:
                    kept_items.append(it)
                    groups.append((batch, b))
            if len(kept_items) >= cfg.prompts_per_step:
                break
        stats = {k: sum(st[k] for st in all_stats) / len(all_stats) for k in all_stats[0]}
        stats["rollout_batches"] = float(len(all_stats))
        stats["update_prompts"] = float(len(kept_items))
        stats |= self.vip_update(first) if cfg.mask_source == "vip_cotrain" else {}
        if not kept_items:
            return {**stats, "policy_loss": 0.0, "kl": 0.0, "skipped": 1.0}
        return {**stats, **self.update(self._merge(kept_items, groups))}

    def _merge(self, items: list[dict], groups: list[tuple[Rollouts, int]]) -> Rollouts:
        """One ``Rollouts`` of the chosen prompts' groups (re-tokenised together, completions right-padded)."""
        G = self.cfg.num_generations
        T = max(batch.tokens.shape[1] for batch, _ in groups)
        toks, masks, rewards, advs, texts, keep = [], [], [], [], [], []
        for batch, b in groups:
            rows = slice(b * G, (b + 1) * G)
            t, m = batch.tokens[rows], batch.mask[rows]
            pad = T - t.shape[1]
            toks.append(torch.nn.functional.pad(t, (0, pad), value=self.pad))
            masks.append(torch.nn.functional.pad(m, (0, pad), value=False))
            rewards.append(batch.rewards[rows])
            advs.append(batch.advantages[rows])
            texts += batch.texts[rows]
            keep.append(batch.keep_masks[b])
        return Rollouts(self.inputs(items), keep, torch.cat(toks), torch.cat(masks), texts, torch.cat(rewards),
                        torch.cat(advs), {}, [it["answer"] for it in items])

    def vip_update(self, items: list[dict]) -> dict:
        """Co-trained VIP: one stage-1 step of the glimpse module on the adapted LLM (Dice + 0.1 BCE against the
        box token masks + the answer's LM loss); only the module moves (``vip_optimizer_step``)."""
        from ...runtime.train import forward_train
        from ..losses import lm_loss, mask_loss
        from ..stage1 import Collator

        batch = Collator(self.processor, self.model)(
            [{**it, "question": question_text(self.cfg, it["question"])} for it in items])
        out = forward_train(self.model, self.adapter, self.vip, batch["inputs"], batch["suffix_ids"],
                            batch["suffix_mask"])
        loc = mask_loss(out.vip_logits, batch["targets"], 1.0, 0.1)
        lm = lm_loss(out.suffix_logits, batch["suffix_ids"], batch["suffix_mask"])
        (loc + lm).backward()
        self.vip_optimizer_step()
        return {"vip_loc_loss": float(loc.detach()), "vip_lm_loss": float(lm.detach())}

    def vip_optimizer_step(self) -> None:  # set by the trainer with vip_cotrain
        raise NotImplementedError

    def rollout(self, items: list[dict], seeds: list[int]) -> Rollouts:
        """G completions per prompt from one pruned prefill each (no gradient, eval mode: as at inference), their
        rewards and group advantages."""
        from ...rewards import RewardInput
        from ...runtime.engine import prefill
        from ...runtime.rollout import expand_prefill, sample_group
        from .grpo import group_advantages

        cfg, model, adapter, G = self.cfg, self.model, self.adapter, self.cfg.num_generations
        inputs = self.inputs(items)
        boxes = self.keep_masks(items, inputs)
        training = model.training
        model.eval()
        with torch.no_grad():
            if boxes is None:
                pre = prefill(model, adapter, self.vip, inputs)
            else:
                pre = prefill(model, adapter, self.fixed, inputs, {"keep_masks": boxes})
            toks, mask = sample_group(model, adapter, expand_prefill(model, adapter, pre, G), cfg.max_new_tokens,
                                      self.eos, self.pad, cfg.temperature, seeds)
        model.train(training)
        texts = self.processor.batch_decode(toks.masked_fill(~mask, self.pad), skip_special_tokens=True)
        samples = [RewardInput(question=it["question"], answer=it["answer"], completion=texts[b * G + g],
                               boxes=it.get("boxes") or None) for b, it in enumerate(items) for g in range(G)]
        rewards = self.score(samples)
        guided = 0
        if cfg.guidance == "on_failure":
            toks, mask, texts, rewards, guided = self.guide(items, toks, mask, texts, rewards, samples)
        adv = group_advantages(rewards, G, scale=cfg.scale_rewards == "group")
        kept = [float(k.float().mean()) for k in pre.keep_masks]
        stats = {"guided_groups": guided / len(items)} if cfg.guidance != "none" else {}
        stats |= {"reward": float(rewards.mean()),
                  "reward_std": float(rewards.view(-1, G).std(1, unbiased=False).mean()),
                  "kept_frac": sum(kept) / len(kept), "answer_len": float(mask.sum(1).float().mean()),
                  "mixed_groups": float((adv.view(-1, G).abs().sum(1) > 0).float().mean())}
        return Rollouts(inputs, pre.keep_masks, toks, mask, texts, rewards, adv, stats, [it["answer"] for it in items])

    def score(self, samples) -> torch.Tensor:
        rewards = torch.zeros(len(samples))
        for fn in self.rewards:
            rewards += torch.tensor(fn(samples), dtype=torch.float32)
        return rewards

    def guide(self, items, toks, mask, texts, rewards, samples):
        """Off-policy guidance: in each group whose rollouts all scored <= 0, the last rollout becomes the reference
        answer's tokens + EOS, however long (scored like any rollout). Returns (tokens, mask, texts, rewards, number
        of guided groups)."""
        from dataclasses import replace

        G, tok = self.cfg.num_generations, self.processor.tokenizer
        rows = [b for b in range(len(items)) if float(rewards[b * G:(b + 1) * G].max()) <= 0 and items[b]["answer"]]
        if not rows:
            return toks, mask, texts, rewards, 0
        gold = {b: self.gold_ids(items[b]["answer"]) for b in rows}
        T = max(toks.shape[1], max(len(g) for g in gold.values()))
        toks = torch.nn.functional.pad(toks, (0, T - toks.shape[1]), value=self.pad)
        mask = torch.nn.functional.pad(mask, (0, T - mask.shape[1]), value=False)
        texts, rewards = list(texts), rewards.clone()
        for b, ids in gold.items():
            r = b * G + G - 1
            toks[r] = self.pad
            toks[r, :len(ids)] = torch.tensor(ids)
            mask[r] = False
            mask[r, :len(ids)] = True
            texts[r] = tok.decode(ids, skip_special_tokens=True)
            samples[r] = replace(samples[r], completion=texts[r])
            rewards[r] = self.score([samples[r]])[0]
        return toks, mask, texts, rewards, len(rows)

    def gold_ids(self, answer) -> list[int]:
        """The reference answer's token ids + EOS (what a right completion looks like)."""
        return self.processor.tokenizer(str(answer), add_special_tokens=False)["input_ids"] + [self.eos[0]]

    def reference(self, answers: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) token ids of each prompt's reference answer + EOS, right-padded, and their (B, T) mask (all False
        for a prompt without an answer)."""
        gold = [self.gold_ids(a) if a else [] for a in answers]
        T = max(1, max(len(g) for g in gold))
        toks = torch.full((len(gold), T), self.pad, dtype=torch.long)
        mask = torch.zeros((len(gold), T), dtype=torch.bool)
        for b, g in enumerate(gold):
            toks[b, :len(g)] = torch.tensor(g, dtype=torch.long)
            mask[b, :len(g)] = True
        return toks, mask

    def fixed_prefill(self, inputs: dict, keep_masks: list[torch.Tensor]):
        """The prompts prefilled with these keep masks fixed at K: the schedule their rollouts ran on."""
        from ...runtime.engine import prefill

        return prefill(self.model, self.adapter, self.fixed, inputs, {"keep_masks": keep_masks})

    def logprobs(self, batch: Rollouts, reference: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(R, T) log-probs of the rollouts on the schedule they ran on, and with ``reference`` (B, T') token ids
        the (B, T') log-probs of those at temperature 1 from the same prefill (else None)."""
        from ...runtime.rollout import completion_logprobs, expand_prefill

        model, adapter = self.model, self.adapter
        p = self.fixed_prefill(batch.inputs, batch.keep_masks)
        logp = completion_logprobs(model, adapter, expand_prefill(model, adapter, p, self.cfg.num_generations),
                                   batch.tokens, self.cfg.temperature)
        if reference is None:
            return logp, None
        return logp, completion_logprobs(model, adapter, expand_prefill(model, adapter, p, 1), reference, 1.0)

    def update(self, batch: Rollouts) -> dict:
        """The GRPO update(s) on one batch of rollouts; returns the loss parts of the last one."""
        from ...lora import disabled_adapter
        from .grpo import grpo_loss, sft_loss

        cfg = self.cfg
        ref = None
        if cfg.beta > 0:
            with torch.no_grad(), disabled_adapter(self.model):
                ref, _ = self.logprobs(batch)
        gold, gold_mask = None, None
        if cfg.sft_weight:
            if batch.answers is None or len(batch.answers) != len(batch.keep_masks):
                raise ValueError("the supervised term (sft_weight > 0) needs each prompt's reference answer in "
                                 "Rollouts.answers")
            gold, gold_mask = self.reference(batch.answers)
        old, parts = None, {}
        for _ in range(cfg.updates_per_batch):  # 1: upstream's single update; more: PPO-style, clipped ratio
            logp, gold_logp = self.logprobs(batch, gold)
            old = logp.detach() if old is None else old
            loss, parts = grpo_loss(logp, old, ref, batch.advantages, batch.mask, cfg.beta,
                                    cfg.clip_eps if cfg.updates_per_batch > 1 else None)
            if gold is not None:  # the supervised term: CE of the reference answer on the same pruned prefill
                sft = sft_loss(gold_logp, gold_mask)
                loss = loss + cfg.sft_weight * sft
                parts["sft_loss"] = float(sft.detach())
            loss.backward()
            self.optimizer_step()
        return parts

    def optimizer_step(self) -> None:  # set by the trainer
        raise NotImplementedError
