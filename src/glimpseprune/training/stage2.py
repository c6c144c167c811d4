"""Stage 2, GlimpsePrune+: RL fine-tuning of the base LLM (a LoRA adapter) on pruned inputs, with GRPO.

Every rollout comes from our pruning runtime, so the policy sees exactly what it sees at inference: per prompt one
pruned prefill (visual tokens dropped after K, by the frozen VIP's masks under an optional cap, or by the ground-truth
box masks), then G completions sampled from copies of its compacted cache (``runtime/rollout.py``). The policy and
reference (adapter disabled) log-probabilities are computed on the same schedule with the same keep masks: the
prompt is prefilled again with those masks fixed (``mask`` method at K), the answers fed as one teacher-forced chunk
over the compacted cache. Rewards come from the registry (``glimpseprune.rewards``: exact match, judge, ...), summed.
Loss (``training/grpo.py``): -A * (clipped) ratio + beta * k3 KL, A the group-normalised reward; one update per batch
(upstream's form, ratio 1) or several with PPO's clipped ratio.

Why our own loop and not trl's GRPOTrainer: trl generates with ``model.generate`` (or vLLM) and scores with a full,
unpruned forward; it cannot host a rollout that prunes mid-stack and decodes G answers from one compacted cache, nor
score on that schedule, which is the point of stage 2. The loop is small; peft provides the adapter.

    glimpseprune train --config configs/stage2_world.yaml [--resume | --overwrite]

The output folder ends with ``module/``: the glimpse module and the LoRA adapter in one folder
(``gp.load(model, module=OUT/module)`` loads both), ``train_summary.json`` (history of reward, KL, kept fraction,
answer length and the periodic evals) and ``checkpoint-N`` folders (adapter + optimizer + scheduler + RNG) to resume.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import SelectionConfig
from .stage1 import TRAIN_SEED0, RecordDataset, WorldDataset, _check_field, check_bounds, config_from_yaml

logger = logging.getLogger(__name__)
MASK_SOURCES = ("vip", "boxes", "vip_cotrain")
GUIDANCE = ("none", "on_failure")
EVAL_SEED0 = 4_000_000_000  # the same held-out synthetic scenes as stage 1's eval


@dataclass
class Stage2Config:
    """A GlimpsePrune+ run (``stage: 2`` in its YAML). Fields are checked like stage 1's (numeric strings accepted,
    the field named on a bad value)."""

    model: str = "embedded"
    module: str = "embedded"  # the stage-1 glimpse module (frozen; its VIP masks the rollouts with mask_source vip)
    output_dir: str = "runs/stage2"
    train_data: str | None = None  # JSONL records (ours or Visual-CoT's); None = synthetic world scenes
    train_samples: int = 4000
    eval_data: str | None = None  # JSONL records for the periodic eval; None = held-out synthetic scenes
    image_root: str | None = None  # where relative image paths start (Visual-CoT: cot_image_data/); None = JSONL's
    eval_samples: int = 100
    prompt_suffix: str | None = None  # appended to each question, e.g. "Answer the question using a single word..."
    # "vip": the frozen module's masks (as at inference); "boxes": ground-truth box tokens; "vip_cotrain": the
    # module's masks, the module trained alongside with its stage-1 loss (Dice + 0.1 BCE on box masks + LM loss)
    mask_source: str = "vip"
    vip_learning_rate: float = 1e-3  # with vip_cotrain
    cap: float | None = None  # max kept fraction per sample with mask_source vip (SelectionConfig.max_keep_ratio)
    rewards: list = field(default_factory=lambda: ["exact"])  # registered reward names, summed
    judge_url: str | None = None  # for the "judge" reward: an OpenAI-compatible endpoint
    judge_model: str | None = None
    judge_cache: str | None = None  # folder of the judge's on-disk cache (default: OUT/judge_cache)
    num_generations: int = 4  # G rollouts per prompt
    # dynamic sampling (DAPO): up to this many extra rollout batches per step, keeping only prompts whose group has
    # mixed rewards (the only ones with a gradient) until prompts_per_step of them are found; 0 = off
    dynamic_sampling: int = 0
    prompts_per_step: int = 8
    # off-policy guidance (LUFFY-style): "on_failure" replaces the last rollout of a group whose G rollouts all
    # scored 0 with the reference answer (+ EOS), so a question the policy always gets wrong still gives a gradient
    # (toward the reference); "none": plain GRPO. Needs rewards that score the reference (exact, choice, ...)
    guidance: str = "none"
    max_new_tokens: int = 16
    temperature: float = 1.0
    beta: float = 0.04  # weight of the k3 KL to the adapter-disabled model
    updates_per_batch: int = 1  # 1: upstream's single update (ratio 1); > 1: PPO-style clipped ratio
    clip_eps: float = 0.2
    learning_rate: float = 1e-4
    warmup_ratio: float = 0.1
    max_steps: int = 200
    max_grad_norm: float = 1.0
    lora_r: int = 32
    lora_alpha: float = 64.0
    lora_dropout: float = 0.05
    logging_steps: int = 5
    eval_steps: int = 50
    save_steps: int = 50
    seed: int = 42
    threads: int | None = None

    resume_free_fields = frozenset({"output_dir", "threads", "logging_steps", "eval_steps", "save_steps",
                                    "max_steps", "judge_url", "judge_cache"})

    def __post_init__(self):
        for f in dataclasses.fields(self):
            setattr(self, f.name, _check_field(f.name, f.type, getattr(self, f.name)))
        if self.guidance not in GUIDANCE:
            raise ValueError(f"guidance must be one of {GUIDANCE}, got {self.guidance!r}")
        if self.mask_source not in MASK_SOURCES:
            raise ValueError(f"mask_source must be one of {MASK_SOURCES}, got {self.mask_source!r}")
        if self.num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 (GRPO compares rollouts within a group), got "
                             f"{self.num_generations}")
        check_bounds(self, at_least_one=("train_samples", "eval_samples", "prompts_per_step", "max_new_tokens",
                                         "updates_per_batch", "max_steps", "lora_r", "logging_steps", "eval_steps",
                                         "save_steps"),
                     positive=("learning_rate", "vip_learning_rate", "temperature", "lora_alpha", "max_grad_norm",
                               "clip_eps"),
                     nonnegative=("dynamic_sampling", "beta"))
        if not 0 <= self.lora_dropout < 1 or not 0 <= self.warmup_ratio < 1:
            raise ValueError("lora_dropout and warmup_ratio must be in [0, 1)")
        if self.cap is not None and not 0 < self.cap <= 1:
            raise ValueError(f"cap must be in (0, 1], got {self.cap}")
        if not self.rewards:
            raise ValueError("rewards must name at least one reward")
        from ..rewards import get_reward

        for name in self.rewards:
            get_reward(name)  # an unknown name is a ValueError listing the known ones
        if "judge" in self.rewards and not (self.judge_url and self.judge_model):
            raise ValueError("the judge reward needs judge_url and judge_model (--judge-url, --judge-model)")

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> Stage2Config:
        return config_from_yaml(cls, path, **overrides)


# --------------------------------------------------------------------------- data


def _datasets(cfg: Stage2Config):
    train = RecordDataset(cfg.train_data, image_root=cfg.image_root) if cfg.train_data else WorldDataset(
        cfg.train_samples, seed0=TRAIN_SEED0)
    evals = RecordDataset(cfg.eval_data, limit=cfg.eval_samples, image_root=cfg.image_root) if cfg.eval_data else \
        WorldDataset(cfg.eval_samples, seed0=EVAL_SEED0)
    if len(train) == 0:
        raise ValueError(f"no training prompts in {cfg.train_data}")
    return train, evals


def _question(cfg: Stage2Config, q: str) -> str:
    return f"{q}\n{cfg.prompt_suffix}" if cfg.prompt_suffix else q


def _make_rewards(cfg: Stage2Config, out: Path):
    from ..rewards import make_reward

    rewards = []
    for name in cfg.rewards:
        if name == "judge":
            from ..rewards.judge import JudgeConfig, check_judge

            jc = JudgeConfig(url=cfg.judge_url, model=cfg.judge_model,
                             cache_dir=cfg.judge_cache or str(out / "judge_cache"), on_error="zero")
            check_judge(jc)  # a judge that is down fails here, before any training step
            rewards.append(make_reward("judge", config=jc))
        else:
            rewards.append(make_reward(name))
    return rewards


# --------------------------------------------------------------------------- one step


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


class GRPOStep:
    """Rollouts, rewards and the GRPO loss for one batch of prompts (the model carries the LoRA adapter)."""

    def __init__(self, model, processor, module, cfg: Stage2Config, rewards):
        from ..api import make_method
        from ..methods.glimpse import GlimpseMethod
        from ..registry import get_adapter

        self.model, self.processor, self.module, self.cfg, self.rewards = model, processor, module, cfg, rewards
        self.adapter = get_adapter(model)
        self.K = module.cfg.prune_layer
        self.vip = GlimpseMethod(module=module, selection=SelectionConfig(max_keep_ratio=cfg.cap))
        self.fixed = make_method("mask", prune_layer=self.K)
        tok = processor.tokenizer
        gc = getattr(model, "generation_config", None)
        eos = getattr(gc, "eos_token_id", None) or tok.eos_token_id
        self.eos = [eos] if isinstance(eos, int) else list(eos)
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    def inputs(self, items: list[dict]) -> dict:
        from ..processing import build_inputs

        batch = build_inputs(self.processor, [[it["image"]] for it in items],
                             [_question(self.cfg, it["question"]) for it in items])
        return dict(batch)

    def keep_masks(self, items, inputs) -> list[torch.Tensor] | None:
        if self.cfg.mask_source != "boxes":
            return None
        masks = self.adapter.box_masks(self.model, self.processor, inputs, [it["boxes"] for it in items],
                                       [(it["width"], it["height"]) for it in items])
        return [torch.from_numpy(m.reshape(-1)) for m in masks]

    def __call__(self, items: list[dict], seeds: list[int]) -> dict:
        """One GRPO step on ``items`` (rollout row r samples with seed ``seeds[r]``): updates the adapter through
        ``optimizer_step`` unless every group's rewards are equal; returns the step's statistics."""
        batch = self.rollout(items, seeds)
        vip = self.vip_update(items) if self.cfg.mask_source == "vip_cotrain" else {}
        if not bool(batch.advantages.any()):  # every group's rewards equal: no gradient to take
            return {**batch.stats, **vip, "policy_loss": 0.0, "kl": 0.0, "skipped": 1.0}
        return {**batch.stats, **vip, **self.update(batch)}

    def mixed_step(self, draw, seeds) -> dict:
        """Dynamic sampling: roll out batches from ``draw()`` (up to 1 + dynamic_sampling of them, seeds from
        ``seeds(k)``), keep the prompts whose G rewards differ, and update once on (at most) prompts_per_step of
        them. Statistics are over every rollout made."""
        cfg, G = self.cfg, self.cfg.num_generations
        kept_items, groups, all_stats = [], [], []
        for k in range(1 + cfg.dynamic_sampling):
            items = draw()
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
                        torch.cat(advs), {})

    def vip_update(self, items: list[dict]) -> dict:
        """Co-trained VIP: one stage-1 step of the glimpse module on the adapted LLM (Dice + 0.1 BCE against the
        box token masks + the answer's LM loss); only the module moves (``vip_optimizer_step``)."""
        from ..runtime.train import forward_train
        from .losses import lm_loss, mask_loss
        from .stage1 import Collator

        batch = Collator(self.processor, self.model)(
            [{**it, "question": _question(self.cfg, it["question"])} for it in items])
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
        from ..rewards import RewardInput
        from ..runtime.engine import prefill
        from ..runtime.rollout import expand_prefill, sample_group
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
        adv = group_advantages(rewards, G)
        kept = [float(k.float().mean()) for k in pre.keep_masks]
        stats = {"guided_groups": guided / len(items)} if cfg.guidance != "none" else {}
        stats |= {"reward": float(rewards.mean()),
                  "reward_std": float(rewards.view(-1, G).std(1, unbiased=False).mean()),
                  "kept_frac": sum(kept) / len(kept), "answer_len": float(mask.sum(1).float().mean()),
                  "mixed_groups": float((adv.view(-1, G).abs().sum(1) > 0).float().mean())}
        return Rollouts(inputs, pre.keep_masks, toks, mask, texts, rewards, adv, stats)

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
        gold = {b: tok(str(items[b]["answer"]), add_special_tokens=False)["input_ids"] + [self.eos[0]] for b in rows}
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

    def logprobs(self, batch: Rollouts) -> torch.Tensor:
        """(R, T) log-probs of the rollouts on the schedule they ran on (their keep masks fixed at K)."""
        from ..runtime.engine import prefill
        from ..runtime.rollout import completion_logprobs, expand_prefill

        model, adapter = self.model, self.adapter
        p = prefill(model, adapter, self.fixed, batch.inputs, {"keep_masks": batch.keep_masks})
        return completion_logprobs(model, adapter, expand_prefill(model, adapter, p, self.cfg.num_generations),
                                   batch.tokens, self.cfg.temperature)

    def update(self, batch: Rollouts) -> dict:
        """The GRPO update(s) on one batch of rollouts; returns the loss parts of the last one."""
        from ..lora import disabled_adapter
        from .grpo import grpo_loss

        cfg = self.cfg
        ref = None
        if cfg.beta > 0:
            with torch.no_grad(), disabled_adapter(self.model):
                ref = self.logprobs(batch)
        old, parts = None, {}
        for _ in range(cfg.updates_per_batch):  # 1: upstream's single update; more: PPO-style, clipped ratio
            logp = self.logprobs(batch)
            old = logp.detach() if old is None else old
            loss, parts = grpo_loss(logp, old, ref, batch.advantages, batch.mask, cfg.beta,
                                    cfg.clip_eps if cfg.updates_per_batch > 1 else None)
            loss.backward()
            self.optimizer_step()
        return parts

    def optimizer_step(self) -> None:  # set by the trainer
        raise NotImplementedError


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_exact(model, processor, module, items, cap: float | None, prompt_suffix: str | None,
                   batch_size: int = 16) -> dict:
    """Exact match of greedy answers with GlimpsePrune's own masks (the inference path), and the kept fraction."""
    from ..api import apply
    from ..bench.accuracy import normalize
    from ..methods.glimpse import GlimpseMethod

    pm = apply(model, GlimpseMethod(module=module, selection=SelectionConfig(max_keep_ratio=cap)),
               processor=processor)
    correct, kept, n = 0, 0.0, 0
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        out = pm.generate(images=[[it["image"]] for it in chunk],
                          questions=[f"{it['question']}\n{prompt_suffix}" if prompt_suffix else it["question"]
                                     for it in chunk], max_new_tokens=16)
        for b, it in enumerate(chunk):
            correct += normalize(out.texts[b]) == normalize(it["answer"])
            kept += out.n_kept[b] / max(out.n_vis[b], 1)
            n += 1
    return {"exact_match": correct / max(n, 1), "kept_frac": kept / max(n, 1), "n": n}


# --------------------------------------------------------------------------- the run


def _lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def train_stage2(cfg: Stage2Config, resume: bool = False, overwrite: bool = False, device: str | None = None,
                 progress: bool = True) -> Path:
    """Run GlimpsePrune+ per ``cfg``; returns OUT/module (glimpse module + LoRA adapter in one folder). The output
    folder follows stage 1's rules (``trainer.check_output_dir``): another run is refused unless ``overwrite``;
    ``resume`` continues the newest checkpoint when the recorded config matches."""
    from tqdm.auto import tqdm

    from ..api import load_base
    from ..assets import resolve_model, resolve_module
    from ..checkpoint import library_version, load_module
    from ..lora import LoraSettings, add_lora, lora_named_parameters, lora_parameters, save_plus
    from ..registry import get_adapter
    from .trainer import (
        RUN_CONFIG,
        SUMMARY,
        _config_record,
        check_output_dir,
        remove_run_files,
        write_dir_atomic,
        write_json_atomic,
    )

    out = Path(cfg.output_dir)
    ckpt = check_output_dir(cfg, resume=resume, overwrite=overwrite)  # before anything loads
    if cfg.train_data and not Path(cfg.train_data).is_file():
        raise FileNotFoundError(f"train_data {cfg.train_data} does not exist")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model_path = resolve_model(cfg.model)
    # fp32 as the trainer was built and tested with (a bf16 checkpoint would otherwise load as bf16: dtype="auto")
    model, processor = load_base(model_path, device=device or "cpu", dtype=torch.float32)
    adapter_ = get_adapter(model)
    module = load_module(resolve_module(cfg.module), adapter_.dims(model), device=device or "cpu")
    cotrain = cfg.mask_source == "vip_cotrain"
    for p in module.parameters():
        p.requires_grad_(cotrain)
    rewards = _make_rewards(cfg, out)
    train_ds, eval_ds = _datasets(cfg)
    if overwrite:
        removed = remove_run_files(out)
        if removed:
            logger.info("--overwrite: removed %s from %s", ", ".join(p.name for p in removed), out)
    write_json_atomic(out / RUN_CONFIG, {"format": "glimpseprune.stage2/1", "config": _config_record(cfg),
                                         "model_path": str(model_path), "library_version": library_version()})
    add_lora(model, LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout),
             base_model_name=str(model_path))
    params = lora_parameters(model)
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    vip_opt = torch.optim.AdamW(module.parameters(), lr=cfg.vip_learning_rate, weight_decay=0.0) if cotrain else None
    warmup = int(cfg.warmup_ratio * cfg.max_steps)
    step, history, evals, drawn = 0, [], [], 0
    if ckpt is not None:
        state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False)
        named = dict(model.named_parameters())
        for k, v in state["lora"].items():
            named[k].data.copy_(v)
        opt.load_state_dict(state["optimizer"])
        if vip_opt is not None:
            module.load_state_dict(state["module"])
            vip_opt.load_state_dict(state["vip_optimizer"])
        step, history, evals, drawn = state["step"], state["history"], state["evals"], state.get("drawn", 0)
        random.setstate(state["py_rng"])
        torch.set_rng_state(state["torch_rng"])
        logger.info("resuming %s from %s (step %d)", out, ckpt, step)
    grpo = GRPOStep(model, processor, module, cfg, rewards)

    def optimizer_step() -> None:
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg.max_steps, cfg.learning_rate, warmup)
        opt.step()
        opt.zero_grad(set_to_none=True)

    grpo.optimizer_step = optimizer_step

    def vip_optimizer_step() -> None:  # the module alone moves; the LoRA's gradients of this loss are dropped
        torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.max_grad_norm)
        vip_opt.step()
        vip_opt.zero_grad(set_to_none=True)
        opt.zero_grad(set_to_none=True)

    grpo.vip_optimizer_step = vip_optimizer_step
    eval_items = [eval_ds[i] for i in range(len(eval_ds))]

    def run_eval() -> dict:
        model.eval()
        r = evaluate_exact(model, processor, module, eval_items, cfg.cap, cfg.prompt_suffix)
        model.train()
        r["step"] = step
        evals.append(r)
        logger.info("eval at step %d: exact match %.4f, kept %.4f", step, r["exact_match"], r["kept_frac"])
        return r

    def save_checkpoint() -> None:
        lora = {k: v.detach().clone() for k, v in lora_named_parameters(model).items()}
        state = {"lora": lora, "optimizer": opt.state_dict(), "step": step, "drawn": drawn, "history": history,
                 "evals": evals, "py_rng": random.getstate(), "torch_rng": torch.get_rng_state()}
        if vip_opt is not None:
            state.update(module=module.state_dict(), vip_optimizer=vip_opt.state_dict())

        def write(tmp: Path) -> None:
            tmp.mkdir()
            torch.save(state, tmp / "trainer_state.pt")
            (tmp / "trainer_state.json").write_text(json.dumps({"global_step": step}))  # last: complete

        write_dir_atomic(out / f"checkpoint-{step}", write)

    if not evals:
        run_eval()
    order = list(range(len(train_ds)))
    rng = random.Random(cfg.seed)
    rng.shuffle(order)
    model.train()
    t0 = time.time()
    bar = tqdm(total=cfg.max_steps, initial=step, desc="GlimpsePrune+", dynamic_ncols=True, disable=not progress)
    R = cfg.prompts_per_step * cfg.num_generations
    while step < cfg.max_steps:
        if cfg.dynamic_sampling:
            def draw() -> list[dict]:  # prompts in order, continuing where the last step stopped
                nonlocal drawn
                idx = [order[(drawn + j) % len(order)] for j in range(cfg.prompts_per_step)]
                drawn += cfg.prompts_per_step
                return [train_ds[i] for i in idx]

            stats = grpo.mixed_step(draw, lambda k, s=step: [cfg.seed * 1_000_003 + s * 10_007 + k * R + r
                                                               for r in range(R)])
        else:
            start = (step * cfg.prompts_per_step) % len(order)
            idx = [order[(start + j) % len(order)] for j in range(cfg.prompts_per_step)]
            items = [train_ds[i] for i in idx]
            seeds = [cfg.seed * 1_000_003 + step * 10_007 + r for r in range(len(items) * cfg.num_generations)]
            stats = grpo(items, seeds)
        step += 1
        stats["step"] = step
        history.append(stats)
        bar.update(1)
        bar.set_postfix(reward=f"{stats['reward']:.3f}", std=f"{stats['reward_std']:.3f}", kl=f"{stats['kl']:.4f}",
                        kept=f"{stats['kept_frac']:.3f}", len=f"{stats['answer_len']:.1f}")
        if step % cfg.logging_steps == 0:
            recent = history[-cfg.logging_steps:]
            logger.info("step %d: reward %.3f, kl %.4f, kept %.3f, answer length %.1f, mixed groups %.2f", step,
                        sum(h["reward"] for h in recent) / len(recent), sum(h["kl"] for h in recent) / len(recent),
                        sum(h["kept_frac"] for h in recent) / len(recent),
                        sum(h["answer_len"] for h in recent) / len(recent),
                        sum(h["mixed_groups"] for h in recent) / len(recent))
        if step % cfg.eval_steps == 0 or step == cfg.max_steps:
            run_eval()
        if step % cfg.save_steps == 0 and step < cfg.max_steps:
            save_checkpoint()
    bar.close()
    seconds = time.time() - t0
    model.eval()
    dest = write_dir_atomic(out / "module", lambda tmp: save_plus(module, model, tmp))
    write_json_atomic(out / SUMMARY, {"config": dataclasses.asdict(cfg), "train_seconds": seconds,
                                      "global_step": step, "resumed_from": None if ckpt is None else str(ckpt),
                                      "module": str(dest), "evals": evals, "history": history})
    logger.info("stage 2 done in %.0f s; evals: %s", seconds, json.dumps(evals[-1]))
    return dest


def load_config(path: str | Path, **overrides: Any):
    """A training config by its ``stage:`` key (1 when absent): ``Stage1Config`` or ``Stage2Config``."""
    from .stage1 import Stage1Config, read_yaml_mapping

    stage = read_yaml_mapping(path).get("stage", 1)
    if stage not in (1, 2):
        raise ValueError(f"{path}: stage must be 1 (glimpse token + VIP) or 2 (GlimpsePrune+), got {stage!r}")
    return (Stage2Config if stage == 2 else Stage1Config).from_yaml(path, **overrides)
