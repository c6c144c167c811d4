"""Stage 2, GlimpsePrune+: RL fine-tuning of the base LLM (a LoRA adapter) on pruned inputs, with GRPO.

Every rollout comes from our pruning runtime, so the policy sees exactly what it sees at inference: per prompt one
pruned prefill (visual tokens dropped after K, by the frozen VIP's masks under an optional cap, or by the ground-truth
box masks), then G completions sampled from copies of its compacted cache (``runtime/rollout.py``). The policy and
reference (adapter disabled) log-probabilities are computed on the same schedule with the same keep masks: the
prompt is prefilled again with those masks fixed (``mask`` method at K), the answers fed as one teacher-forced chunk
over the compacted cache. Rewards come from the registry (``glimpseprune.rewards``: exact match, judge, ...), summed.
Loss (``training/rl/grpo.py``; one step in ``training/rl/step.py``): -A * (clipped) ratio + beta * k3 KL, A the
group-normalised reward, + sft_weight * the reference answer's cross-entropy on the same pruned prefill (0 by default);
one update per batch (upstream's form, ratio 1) or several with PPO's clipped ratio.

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
from .rl.step import GRPOStep
from .stage1 import (
    TRAIN_SEED0,
    RecordDataset,
    WorldDataset,
    _check_field,
    check_bounds,
    check_records,
    config_from_yaml,
)

logger = logging.getLogger(__name__)
MASK_SOURCES = ("vip", "boxes", "vip_cotrain")
GUIDANCE = ("none", "on_failure")
SCALE_REWARDS = ("group", "none")
EVAL_SEED0 = 4_000_000_000  # the same held-out synthetic scenes as stage 1's eval


@dataclass
class Stage2Config:
    """A GlimpsePrune+ run (``stage: 2`` in its YAML). Fields are checked like stage 1's (numeric strings accepted,
    the field named on a bad value)."""

    model: str = "embedded"
    module: str = "embedded"  # the stage-1 glimpse module (frozen; its VIP masks the rollouts with mask_source vip)
    # an early module (kind early) only: the LLM layer after which its picks leave (-1: before the LLM), in place of
    # the module's own prune_layer; the folder written records it, so gp.load runs the schedule it was trained on
    drop_layer: int | None = None
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
    # with mask_source boxes / vip_cotrain: families whose boxes become one point each (``point_at``) before they are
    # masks / targets (one token per object; stage 1's options of the same names)
    point_families: list = field(default_factory=list)
    point_at: str = "centre"  # "centre" or "top_left"
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
    # advantages: "group" = (r - mean) / (std + 1e-4) within each group (upstream); "none" = r - mean (Dr. GRPO,
    # trl's scale_rewards="none"): no reweighting of groups by how sure the policy already is
    scale_rewards: str = "group"
    max_new_tokens: int = 16
    temperature: float = 1.0
    beta: float = 0.04  # weight of the k3 KL to the adapter-disabled model
    # weight of a supervised term added to the GRPO loss: the cross-entropy of each prompt's reference answer (+ EOS),
    # teacher-forced on the same pruned prefill as its rollouts (SFT on pruned inputs, as RL+SFT hybrids do); 0 =
    # upstream's pure RL. With it, a step whose groups all have equal rewards still updates (on this term), except
    # with dynamic_sampling, which updates on mixed groups only
    sft_weight: float = 0.0
    updates_per_batch: int = 1  # 1: upstream's single update (ratio 1); > 1: PPO-style clipped ratio
    clip_eps: float = 0.2
    learning_rate: float = 1e-4
    warmup_ratio: float = 0.1
    max_steps: int = 200
    max_grad_norm: float = 1.0
    lora_r: int = 32
    lora_alpha: float = 64.0
    lora_dropout: float = 0.05
    # which decoder layers get the adapter: "all" (upstream), "after_k" (only the layers after the module's prune
    # layer K, which run on the pruned sequence alone: what the VIP reads at layers <= K and what the LLM saw of the
    # whole image stay the base model's), or decoder layer indices "2,3"
    lora_layers: str = "all"
    logging_steps: int = 5
    eval_steps: int = 50
    save_steps: int = 50
    seed: int = 42
    threads: int | None = None

    # a resume may change these; a longer max_steps continues the run on the schedule of the new length (warmup and
    # cosine follow max_steps, as in transformers' Trainer): the learning rate steps up again at the resumed step
    resume_free_fields = frozenset({"output_dir", "threads", "logging_steps", "eval_steps", "save_steps",
                                    "max_steps", "judge_url", "judge_cache"})

    def __post_init__(self):
        for f in dataclasses.fields(self):
            setattr(self, f.name, _check_field(f.name, f.type, getattr(self, f.name)))
        if self.guidance not in GUIDANCE:
            raise ValueError(f"guidance must be one of {GUIDANCE}, got {self.guidance!r}")
        if self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {self.scale_rewards!r}")
        if self.mask_source not in MASK_SOURCES:
            raise ValueError(f"mask_source must be one of {MASK_SOURCES}, got {self.mask_source!r}")
        from ..data.records import POINTS

        if self.point_at not in POINTS:
            raise ValueError(f"point_at must be one of {POINTS}, got {self.point_at!r}")
        if self.point_families and self.mask_source == "vip":
            raise ValueError("point_families changes box masks, and mask_source vip uses none (the frozen module's "
                             "own masks): use it with mask_source boxes or vip_cotrain, or train the module with it "
                             "in stage 1")
        if self.num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 (GRPO compares rollouts within a group), got "
                             f"{self.num_generations}")
        check_bounds(self, at_least_one=("train_samples", "eval_samples", "prompts_per_step", "max_new_tokens",
                                         "updates_per_batch", "max_steps", "lora_r", "logging_steps", "eval_steps",
                                         "save_steps"),
                     positive=("learning_rate", "vip_learning_rate", "temperature", "lora_alpha", "max_grad_norm",
                               "clip_eps"),
                     nonnegative=("dynamic_sampling", "beta", "sft_weight"))
        if not 0 <= self.lora_dropout < 1 or not 0 <= self.warmup_ratio < 1:
            raise ValueError("lora_dropout and warmup_ratio must be in [0, 1)")
        lora_layer_ids(self.lora_layers, None, None)  # a malformed value fails here, before anything loads
        if self.drop_layer is not None:
            from ..methods.early_glimpse import check_drop_layer

            check_drop_layer(self.drop_layer)
        if self.cap is not None and not 0 < self.cap <= 1:
            raise ValueError(f"cap must be in (0, 1], got {self.cap}")
        if not self.rewards:
            raise ValueError("rewards must name at least one reward")
        twice = sorted({n for n in self.rewards if list(self.rewards).count(n) > 1})
        if twice:  # rewards are summed: a repeat would silently weigh it double
            raise ValueError(f"rewards names {twice} more than once (rewards are summed)")
        from ..rewards import get_reward

        for name in self.rewards:
            get_reward(name)  # an unknown name is a ValueError listing the known ones
        if "judge" in self.rewards and not (self.judge_url and self.judge_model):
            raise ValueError("the judge reward needs judge_url and judge_model (--judge-url, --judge-model)")

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> Stage2Config:
        return config_from_yaml(cls, path, **overrides)


def lora_layer_ids(spec: str, prune_layer: int | None, n_layers: int | None) -> tuple[int, ...] | None:
    """``Stage2Config.lora_layers`` -> decoder layer indices (None: every layer). With ``n_layers`` None only the
    form is checked.

    >>> lora_layer_ids("after_k", 1, 4), lora_layer_ids("2, 3", 1, 4), lora_layer_ids("all", 1, 4)
    ((2, 3), (2, 3), None)
    """
    text = spec.strip()
    if text == "all":
        return None
    if text == "after_k":
        if n_layers is None:
            return None
        if prune_layer is None or prune_layer + 1 >= n_layers:
            raise ValueError(f"lora_layers after_k: the module prunes after layer {prune_layer} of {n_layers}, so no "
                             "decoder layer runs after it")
        return tuple(range(max(prune_layer, -1) + 1, n_layers))
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() for p in parts):
        raise ValueError(f"lora_layers must be 'all', 'after_k' or decoder layer indices such as '2,3', got {spec!r}")
    ids = tuple(sorted({int(p) for p in parts}))
    if n_layers is not None and ids[-1] >= n_layers:
        raise ValueError(f"lora_layers {spec!r}: the LLM has decoder layers 0..{n_layers - 1}")
    return ids


# --------------------------------------------------------------------------- data


def _datasets(cfg: Stage2Config):
    pts = {"point_families": cfg.point_families, "point_at": cfg.point_at}
    train = RecordDataset(cfg.train_data, image_root=cfg.image_root, **pts) if cfg.train_data else \
        WorldDataset(cfg.train_samples, seed0=TRAIN_SEED0, **pts)
    evals = RecordDataset(cfg.eval_data, limit=cfg.eval_samples, image_root=cfg.image_root, strict=False, **pts) \
        if cfg.eval_data else WorldDataset(cfg.eval_samples, seed0=EVAL_SEED0, **pts)
    needs = [what for what, on in (("mask_source boxes", cfg.mask_source == "boxes"),
                                   ("mask_source vip_cotrain", cfg.mask_source == "vip_cotrain"),
                                   ("the box_iou reward", "box_iou" in cfg.rewards)) if on]
    check_records(train, cfg.train_data, "train_data", boxes=" and ".join(needs) or None)
    check_records(evals, cfg.eval_data, "eval_data")
    return train, evals


def _make_rewards(cfg: Stage2Config, out: Path):
    from ..rewards import make_reward

    rewards = []
    for name in cfg.rewards:
        if name == "judge":
            from ..rewards.judge import JudgeConfig, check_judge

            jc = JudgeConfig(url=cfg.judge_url, model=cfg.judge_model,
                             cache_dir=cfg.judge_cache or str(out / "judge_cache"),
                             on_error="zero_malformed")  # a failed request stops the step
            check_judge(jc)  # a judge that is down fails here, before any training step
            rewards.append(make_reward("judge", config=jc))
        else:
            rewards.append(make_reward(name))
    return rewards


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_exact(model, processor, module, items, cap: float | None, prompt_suffix: str | None,
                   batch_size: int = 16) -> dict:
    """Exact match of greedy answers with GlimpsePrune's own masks (the inference path), and the kept fraction."""
    from ..api import apply, module_method_name
    from ..bench.accuracy import normalize

    pm = apply(model, module_method_name(module), module=module, selection=SelectionConfig(max_keep_ratio=cap),
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
        input_digests,
        refuse_merged_base,
        remove_run_files,
        write_dir_atomic,
        write_json_atomic,
    )

    out = Path(cfg.output_dir)
    ckpt = check_output_dir(cfg, resume=resume, overwrite=overwrite)  # before anything loads
    if cfg.train_data and not Path(cfg.train_data).is_file():
        raise FileNotFoundError(f"train_data {cfg.train_data} does not exist")
    refuse_merged_base(cfg.model)
    train_ds, eval_ds = _datasets(cfg)  # read before the model loads: bad data fails in seconds
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model_path = resolve_model(cfg.model)
    # fp32 as the trainer was built and tested with (a bf16 checkpoint would otherwise load as bf16: dtype="auto")
    model, processor = load_base(model_path, device=device or "cpu", dtype=torch.float32)
    adapter_ = get_adapter(model)
    module = load_module(resolve_module(cfg.module), adapter_.dims(model), device=device or "cpu")
    if cfg.drop_layer is not None:
        if module.cfg.kind != "early":
            raise ValueError(f"drop_layer applies to an early module (kind 'early'), which decides before the LLM; "
                             f"{cfg.module} is a {module.cfg.kind!r} module, whose VIP reads LLM layer "
                             f"{module.cfg.prune_layer} and drops its tokens there")
        module.drop_after(cfg.drop_layer)  # checked against the LLM's depth
    layer_ids = lora_layer_ids(cfg.lora_layers, module.cfg.prune_layer, len(adapter_.layers(model)))
    cotrain = cfg.mask_source == "vip_cotrain"
    for p in module.parameters():
        p.requires_grad_(cotrain)
    rewards = _make_rewards(cfg, out)
    if overwrite:
        removed = remove_run_files(out)
        if removed:
            logger.info("--overwrite: removed %s from %s", ", ".join(p.name for p in removed), out)
    write_json_atomic(out / RUN_CONFIG, {"format": "glimpseprune.stage2/1", "config": _config_record(cfg),
                                         "model_path": str(model_path), "library_version": library_version(),
                                         "inputs": input_digests(cfg)})
    add_lora(model, LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, layers=layer_ids),
             base_model_name=str(model_path))
    params = lora_parameters(model)
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    vip_opt = torch.optim.AdamW(module.parameters(), lr=cfg.vip_learning_rate, weight_decay=0.0) if cotrain else None
    warmup = int(cfg.warmup_ratio * cfg.max_steps)
    step, history, evals, drawn = 0, [], [], 0
    if ckpt is not None:
        state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)  # no pickled code
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
            if cfg.sft_weight:
                logger.info("step %d: sft loss %.4f", step, sum(h.get("sft_loss", 0.0) for h in recent) / len(recent))
        if step % cfg.eval_steps == 0 or step == cfg.max_steps:
            run_eval()
        if step % cfg.save_steps == 0 or step == cfg.max_steps:  # the last too: a longer run resumes from it
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
