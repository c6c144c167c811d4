"""Run stage 1 on transformers' Trainer: ``train(Stage1Config)`` -> the trained module folder.

The Trainer gives the progress bar, periodic evaluation, ``checkpoint-N`` folders (module weights + optimizer +
scheduler + RNG state) and resume; the output folder ends with ``module/`` in our checkpoint format and
``train_summary.json``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from ..api import load_base
from ..assets import resolve_model
from ..checkpoint import save_module
from .stage1 import Collator, RecordDataset, Stage1Config, Stage1Model, WorldDataset, build_module

logger = logging.getLogger(__name__)


def _trainer_class():
    from transformers import Trainer

    class Stage1Trainer(Trainer):
        """Adds the model's loss parts and mask metrics (precision / recall / IoU / kept) to the logs."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._sums: dict[str, dict[str, float]] = {"train": {}, "eval": {}}
            self._counts = {"train": 0, "eval": 0}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = model(**inputs)
            split = "train" if model.training else "eval"
            for k, v in model.metrics.items():
                self._sums[split][k] = self._sums[split].get(k, 0.0) + v
            self._counts[split] += 1
            return (out["loss"], out) if return_outputs else out["loss"]

        def log(self, logs, *args, **kwargs):
            split = "eval" if any(k.startswith("eval_") for k in logs) else "train"
            n = max(self._counts[split], 1)
            prefix = "eval_" if split == "eval" else ""
            logs = {**logs, **{prefix + k: round(v / n, 4) for k, v in self._sums[split].items()}}
            self._sums[split], self._counts[split] = {}, 0
            super().log(logs, *args, **kwargs)

    return Stage1Trainer


def _datasets(cfg: Stage1Config):
    train = RecordDataset(cfg.train_data) if cfg.train_data else WorldDataset(cfg.train_samples)
    if cfg.eval_data:
        evals = RecordDataset(cfg.eval_data, limit=cfg.eval_samples)
    else:
        evals = WorldDataset(cfg.eval_samples, seed0=4_000_000_000)
    return train, evals


def train(cfg: Stage1Config, resume: bool = False, device: str | None = None) -> Path:
    """Train a glimpse module per ``cfg``; resume from the newest checkpoint in output_dir when ``resume``."""
    from transformers import TrainingArguments, set_seed

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed)
    out = Path(cfg.output_dir)
    base, processor = load_base(resolve_model(cfg.model), device=device or "cpu")
    for p in base.parameters():
        p.requires_grad_(False)
    module = build_module(base, cfg).to(base.device)
    model = Stage1Model(base, module, cfg)
    train_ds, eval_ds = _datasets(cfg)
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.learning_rate, num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps, lr_scheduler_type="cosine", warmup_steps=cfg.warmup_ratio, weight_decay=0.0,
        max_grad_norm=1.0, logging_steps=cfg.logging_steps, eval_strategy="steps", eval_steps=cfg.eval_steps,
        save_strategy="steps", save_steps=cfg.save_steps, seed=cfg.seed, data_seed=cfg.seed,
        remove_unused_columns=False, label_names=["suffix_ids"], report_to="none", dataloader_num_workers=0,
        use_cpu=device in (None, "cpu"), prediction_loss_only=True,
    )
    trainer = _trainer_class()(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                               data_collator=Collator(processor, base))
    t0 = time.time()
    has_ckpt = resume and any(out.glob("checkpoint-*"))
    result = trainer.train(resume_from_checkpoint=True if has_ckpt else None)
    seconds = time.time() - t0
    trainer.evaluate()
    final_eval = next((h for h in reversed(trainer.state.log_history) if "eval_loss" in h), {})
    module_dir = save_module(module.cpu(), out / "module")
    summary = {"config": cfg.__dict__, "train_seconds": seconds, "global_step": result.global_step,
               "train_loss": result.training_loss, "final_eval": final_eval, "module": str(module_dir),
               "resumed": bool(has_ckpt), "log_history": trainer.state.log_history}
    (out / "train_summary.json").write_text(json.dumps(summary, indent=1, default=str))
    logger.info("stage 1 done in %.0f s: %s", seconds, json.dumps(final_eval))
    return module_dir
