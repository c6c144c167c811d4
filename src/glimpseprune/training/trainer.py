"""Run stage 1 on transformers' Trainer: ``train(Stage1Config)`` -> the trained module folder.

The Trainer gives the progress bar, periodic evaluation, ``checkpoint-N`` folders (module weights + optimizer +
scheduler + RNG state) and resume; the output folder ends with ``module/`` in our checkpoint format and
``train_summary.json``.

An output folder holds one run of one config. Before the base model loads, ``check_output_dir`` decides:

- a folder that holds run files (``run_config.json``, ``train_summary.json``, ``module/``, ``checkpoint-N/``, our
  ``.glimpseprune-tmp-*`` leftovers) is refused unless ``resume`` (continue it) or ``overwrite`` (replace it); both
  at once are refused;
- ``overwrite`` removes exactly those run files, and refuses (naming one) a folder that also holds files glimpseprune
  did not write, so it never deletes a user's files; a folder holding only other files is trained into as it is;
- ``resume`` needs a complete ``checkpoint-N`` and the run's ``run_config.json`` (a folder from an older version
  without it is refused), and refuses a config that differs from the run's on a field that changes what is trained
  (every field but ``stage1.RESUME_FREE_FIELDS``), listing them;
- a path that cannot be written (a file, a parent that is a file, no permission) is a ValueError naming it.

``run_config.json`` (the config, rewritten on resume), ``train_summary.json`` and ``module/`` are written atomically:
to a temporary name in the folder, then renamed. Replacing an existing ``module/`` (a resumed run that had finished)
takes two renames; a crash between them leaves the old module in ``.glimpseprune-tmp-old-module-*``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from ..api import load_base
from ..assets import resolve_model
from ..checkpoint import library_version, save_module
from ..outputs import atomic_write_text, ensure_writable_dir
from .stage1 import (
    RESUME_FREE_FIELDS,
    Collator,
    RecordDataset,
    Stage1Config,
    Stage1Model,
    WorldDataset,
    build_module,
    check_records,
)

logger = logging.getLogger(__name__)
RUN_CONFIG = "run_config.json"
SUMMARY = "train_summary.json"
MODULE = "module"
TMP_PREFIX = ".glimpseprune-tmp-"  # our temporary names inside the output folder
RUN_FORMAT = 1
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


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
    pts = {"point_families": cfg.point_families, "point_at": cfg.point_at}
    train = RecordDataset(cfg.train_data, image_root=cfg.image_root, **pts) if cfg.train_data else \
        WorldDataset(cfg.train_samples, **pts)
    if cfg.eval_data:  # the eval split's targets as training's (its precision / recall / IoU read them)
        evals = RecordDataset(cfg.eval_data, limit=cfg.eval_samples, image_root=cfg.image_root, strict=False, **pts)
    else:
        evals = WorldDataset(cfg.eval_samples, seed0=4_000_000_000, **pts)
    check_records(train, cfg.train_data, "train_data", boxes="mode boxes" if cfg.mode == "boxes" else None)
    check_records(evals, cfg.eval_data, "eval_data", boxes="mode boxes" if cfg.mode == "boxes" else None)
    return train, evals


# --------------------------------------------------------------------------- the output folder


def _is_run_file(name: str) -> bool:
    return name in (RUN_CONFIG, SUMMARY, MODULE) or name.startswith(TMP_PREFIX) or bool(_CHECKPOINT.fullmatch(name))


def run_files(out: str | Path) -> list[Path]:
    """The entries of ``out`` that a training run writes (sorted); [] when ``out`` is not a folder."""
    p = Path(out)
    return sorted(e for e in p.iterdir() if _is_run_file(e.name)) if p.is_dir() else []


def _checkpoints(out: Path) -> list[Path]:
    """``checkpoint-N`` folders of ``out``, newest (highest N) first."""
    found = [e for e in out.iterdir() if e.is_dir() and _CHECKPOINT.fullmatch(e.name)] if out.is_dir() else []
    return sorted(found, key=lambda e: int(_CHECKPOINT.fullmatch(e.name).group(1)), reverse=True)


def _complete(ckpt: Path) -> bool:
    """The Trainer writes trainer_state.json last: a checkpoint without a readable one was cut short."""
    try:
        json.loads((ckpt / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def _config_record(cfg: Stage1Config) -> dict[str, Any]:
    """The config as JSON gives it back (tuples become lists), for storing and comparing."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def read_run_config(out: str | Path) -> dict[str, Any]:
    """The config stored in ``out/run_config.json``; ValueError when it is missing or unreadable."""
    path = Path(out) / RUN_CONFIG
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} is missing") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} cannot be read: {e}") from None
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise ValueError(f"{path} is not a glimpseprune run config (no 'config' mapping)")
    return record["config"]


def config_differences(stored: dict[str, Any], cfg: Stage1Config) -> list[str]:
    """'field: run X, now Y' for each field outside RESUME_FREE_FIELDS where ``cfg`` differs from ``stored``. A field
    the stored record lacks (the run predates it) matches when ``cfg`` holds its default, which is what such a run
    did."""
    new, missing = _config_record(cfg), "(absent)"
    defaults = {f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(cfg)
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    defaults = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in defaults.items()}
    stored = {**json.loads(json.dumps(defaults, default=str)), **stored}  # the stored values win
    free = getattr(cfg, "resume_free_fields", RESUME_FREE_FIELDS)  # a config class may name its own
    names = sorted((set(stored) | set(new)) - free)
    return [f"{k}: run {stored.get(k, missing)!r}, now {new.get(k, missing)!r}" for k in names
            if stored.get(k, missing) != new.get(k, missing)]


def check_output_dir(cfg: Stage1Config, resume: bool = False, overwrite: bool = False) -> Path | None:
    """Check ``cfg.output_dir`` for a run (rules in the module docstring) before anything loads, creating the folder.
    Returns the checkpoint to resume from (``resume``), else None. Writes nothing else and removes nothing: ``train``
    removes an overwritten run's files after the base model has loaded."""
    out = Path(cfg.output_dir)
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other: resume continues the run in "
                         f"{out}, overwrite deletes it")
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir {out} is a file, not a folder")
    ours = run_files(out)
    ckpt = None
    if resume:
        found = _checkpoints(out)
        if not found:
            held = ""
            if ours:
                names = ", ".join(p.name for p in ours)
                held = f"; it holds other run files ({names}): pass --overwrite to replace them"
            raise ValueError(f"nothing to resume in {out}: no checkpoint-N folder there (a run saves one every "
                             f"save_steps steps){held}, or run without --resume to start a new run")
        if not (out / RUN_CONFIG).exists():
            raise ValueError(f"cannot resume {out}: it holds checkpoints but no {RUN_CONFIG}, so it was made by an "
                             "older glimpseprune (or by hand) and its config cannot be checked against this one; "
                             "pass --overwrite (without --resume) to start it afresh, or choose another --output-dir")
        try:
            stored = read_run_config(out)
        except ValueError as e:
            raise ValueError(f"cannot resume {out}: {e}; pass --overwrite to start it afresh") from None
        diff = config_differences(stored, cfg) + input_differences(out, cfg)
        if diff:
            free = sorted(getattr(cfg, "resume_free_fields", RESUME_FREE_FIELDS))
            raise ValueError(f"cannot resume {out}: the config differs from the run's (or a file it names changed) "
                             f"on what is trained: {'; '.join(diff)} (only {', '.join(free)} may change); "
                             "use the run's config and files, or another --output-dir for a new run")
        ckpt = next((c for c in found if _complete(c)), None)
        if ckpt is None:
            raise ValueError(f"nothing to resume in {out}: no complete checkpoint (every checkpoint-N lacks a "
                             "readable trainer_state.json)")
        if ckpt != found[0]:
            logger.warning("%s is incomplete (no readable trainer_state.json); resuming from %s", found[0], ckpt)
    elif ours and not overwrite:
        raise ValueError(f"{out} already holds a training run ({', '.join(p.name for p in ours[:4])}"
                         f"{', ...' if len(ours) > 4 else ''}): pass --resume to continue it, --overwrite to replace "
                         "it, or choose another --output-dir")
    elif ours:
        _check_inputs_outside(cfg, ours)
        foreign = sorted(e.name for e in out.iterdir() if not _is_run_file(e.name) and e.name not in KEPT)
        if foreign:
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            raise ValueError(f"--overwrite refused: {out} holds {foreign[0]!r}{more}, which glimpseprune did not "
                             "write; --overwrite only replaces a folder that holds nothing but a run. Move it away or "
                             "choose another --output-dir")
    try:
        ensure_writable_dir(out)
    except ValueError as e:  # name the setting: the path alone may not say which of the config's paths it is
        raise ValueError(f"output_dir: {e}") from None
    return ckpt


# an output folder entry a run writes but --overwrite keeps: stage 2's judge cache (keyed by judge model + prompt,
# so its answers stay exact, and asking again costs the user)
KEPT = ("judge_cache",)
# the config fields that name a file or folder whose content decides what is trained ("embedded": the packaged one)
INPUT_FIELDS = ("train_data", "eval_data", "adapter", "module")


def _input_paths(cfg) -> dict[str, Path]:
    """The inputs ``cfg`` names (see INPUT_FIELDS), resolved; stage 1's ``module`` (a dict of overrides) is none."""
    from ..assets import resolve_module

    found = {}
    for name in INPUT_FIELDS:
        value = getattr(cfg, name, None)
        if isinstance(value, str):
            found[name] = Path(resolve_module(value) if name == "module" else value).resolve()
    return found


def _check_inputs_outside(cfg, ours: list[Path]) -> None:
    """--overwrite removes the run files: an input inside one (step B's adapter in OUT/module) would go with them."""
    for name, p in _input_paths(cfg).items():
        for r in ours:
            r = r.resolve()
            if p == r or r in p.parents:
                raise ValueError(f"--overwrite refused: {name} {p} lies in {r}, which replacing the run removes; "
                                 "copy it elsewhere first or choose another --output-dir")


def input_digests(cfg) -> dict[str, str]:
    """sha256 of each input's content (a folder: of its files' names and bytes), recorded with the run."""
    import hashlib

    digests = {}
    for name, p in _input_paths(cfg).items():
        if not p.exists():
            continue
        h = hashlib.sha256()
        for f in ([p] if p.is_file() else sorted(q for q in p.iterdir() if q.is_file())):
            h.update(f.name.encode() + b"\0")
            with f.open("rb") as fh:
                for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                    h.update(block)
        digests[name] = h.hexdigest()
    return digests


def input_differences(out: Path, cfg) -> list[str]:
    """'name: content changed since the run' for each input whose digest differs from the one the run recorded (a
    run that recorded none, from before this check, is not compared)."""
    try:
        stored = json.loads((out / RUN_CONFIG).read_text()).get("inputs")
    except (OSError, ValueError):
        return []
    if not isinstance(stored, dict):
        return []
    now = input_digests(cfg)
    return [f"{k}: its content changed since the run" for k in sorted(set(stored) | set(now))
            if stored.get(k) != now.get(k)]


def remove_run_files(out: str | Path) -> list[Path]:
    """Delete exactly the run files of ``out`` (see ``run_files``); returns what was removed."""
    removed = run_files(out)
    for p in removed:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    return removed


def _tmp_name(path: Path, tag: str = "") -> Path:
    """An unused name beside ``path`` that marks a file as ours (created with the usual permissions, unlike
    mkstemp's 0600)."""
    return path.with_name(f"{TMP_PREFIX}{tag}{path.name}-{uuid.uuid4().hex[:12]}")


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Write ``data`` as JSON through a temporary file beside ``path`` and a rename (``outputs.atomic_write_text``)."""
    return atomic_write_text(path, json.dumps(data, indent=1, default=str))


def write_dir_atomic(dest: str | Path, write) -> Path:
    """``write(tmp)`` fills a temporary folder beside ``dest``, which is then renamed to ``dest`` (an existing
    ``dest`` is renamed aside first and deleted after): a crash never leaves half a folder or loses the old one."""
    dest = Path(dest)
    tmp = _tmp_name(dest)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if dest.exists() or dest.is_symlink():
        old = _tmp_name(dest, "old-")
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None and old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    elif old is not None:
        old.unlink()
    return dest


def save_module_atomic(module, dest: str | Path, adapter_dir: str | Path | None = None, adapter=None) -> Path:
    """``save_module`` through ``write_dir_atomic``. With ``adapter_dir`` (step B of GlimpsePrune+), the LoRA adapter
    files the module was trained on are copied in and recorded (``adapter``, their ``AdapterRecord``): one folder."""
    from ..checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    def write(tmp: Path) -> None:
        if adapter_dir is None:
            save_module(module, tmp)
            return
        tmp.mkdir(parents=True)
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            shutil.copy2(Path(adapter_dir) / name, tmp / name)
        save_module(module, tmp, adapter=adapter)

    return write_dir_atomic(dest, write)


def refuse_merged_base(model: str) -> None:
    """A base model folder written by ``--merge`` (a GlimpsePrune+ adapter merged into its weights) is not trained
    on: the module (or adapter) it would give records nothing of the merged adapter, so it would load on the stock
    base without it, silently, and be refused on the merged one."""
    from ..checkpoint import read_merged_record

    if read_merged_record(resolve_model(model)) is not None:
        raise ValueError(f"model {model} holds a merged GlimpsePrune+ adapter (written by --merge): what is trained "
                         "on it could not record that adapter. Train on the stock base instead, with the "
                         "GlimpsePrune+ folder as `adapter:` for stage 1 (step B)")


def _check_inputs(cfg: Stage1Config) -> None:
    refuse_merged_base(cfg.model)
    for name in ("train_data", "eval_data"):
        path = getattr(cfg, name)
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{name}: no JSONL records at {path}")
    if cfg.adapter is not None:
        from ..checkpoint import adapter_record

        if adapter_record(cfg.adapter) is None:  # missing folder / files: named errors, before the model loads
            raise ValueError(f"adapter {cfg.adapter} holds no LoRA adapter (expected a GlimpsePrune+ stage-2 folder)")


# --------------------------------------------------------------------------- training


def _logs_off_stdout(trainer) -> None:
    """The Trainer prints each log dict (``{'loss': ...}``) to stdout, where the CLI keeps results only: its bar's
    lines go to stderr instead, and without a bar (``-q``: transformers' verbosity at error) to this module's logger,
    which ``-q`` silences."""
    import sys

    from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerCallback

    def _shown(logs: dict) -> dict:
        return {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in (logs or {}).items() if k != "total_flos"}

    class BarToStderr(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and self.training_bar is not None:
                self.training_bar.write(str(_shown(logs)), file=sys.stderr)

    class LogsToLogger(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero:
                logger.info("%s", _shown(logs))

    had_bar = any(isinstance(c, ProgressCallback) for c in trainer.callback_handler.callbacks)
    for cls in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cls)
    trainer.add_callback(BarToStderr() if had_bar else LogsToLogger())


def train(cfg: Stage1Config, resume: bool = False, overwrite: bool = False, device: str | None = None) -> Path:
    """Train a glimpse module per ``cfg`` into ``cfg.output_dir``; with ``resume``, continue the run there from its
    newest checkpoint; with ``overwrite``, replace the run there. Folder rules: see the module docstring."""
    from transformers import TrainingArguments, set_seed

    out = Path(cfg.output_dir)
    ckpt = check_output_dir(cfg, resume=resume, overwrite=overwrite)
    _check_inputs(cfg)
    train_ds, eval_ds = _datasets(cfg)  # read before the model loads: bad data fails in seconds
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed)
    model_path = resolve_model(cfg.model)
    # fp32 as the trainer was built and tested with (a bf16 checkpoint would otherwise load as bf16: dtype="auto")
    base, processor = load_base(model_path, device=device or "cpu", dtype=torch.float32)
    adapter = None
    if cfg.adapter is not None:  # step B of GlimpsePrune+: the module learns on the adapted LLM
        from ..checkpoint import adapter_record
        from ..lora import load_adapter

        adapter = adapter_record(cfg.adapter)
        if adapter is None:
            raise ValueError(f"adapter {cfg.adapter} holds no LoRA adapter (expected a GlimpsePrune+ stage-2 folder)")
        load_adapter(base, cfg.adapter, merge=True, expected_sha256=adapter.sha256)
    for p in base.parameters():
        p.requires_grad_(False)
    module = build_module(base, cfg).to(base.device)
    model = Stage1Model(base, module, cfg)
    if overwrite:
        removed = remove_run_files(out)
        if removed:
            logger.info("--overwrite: removed %s from %s", ", ".join(p.name for p in removed), out)
    write_json_atomic(out / RUN_CONFIG, {"format": RUN_FORMAT, "config": _config_record(cfg),
                                         "model_path": str(model_path), "library_version": library_version(),
                                         "inputs": input_digests(cfg)})
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
                               data_collator=Collator(processor, base, cfg.target_dilation))
    _logs_off_stdout(trainer)
    if ckpt is not None:
        logger.info("resuming %s from %s", out, ckpt)
    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt is not None else None)
    seconds = time.time() - t0
    trainer.evaluate()
    final_eval = next((h for h in reversed(trainer.state.log_history) if "eval_loss" in h), {})
    module_dir = save_module_atomic(module.cpu(), out / MODULE, adapter_dir=cfg.adapter, adapter=adapter)
    summary = {"config": cfg.__dict__, "train_seconds": seconds, "global_step": result.global_step,
               "train_loss": result.training_loss, "final_eval": final_eval, "module": str(module_dir),
               "resumed": ckpt is not None, "resumed_from": None if ckpt is None else str(ckpt),
               "log_history": trainer.state.log_history}
    write_json_atomic(out / SUMMARY, summary)
    logger.info("stage 1 done in %.0f s: %s", seconds, json.dumps(final_eval))
    return module_dir
