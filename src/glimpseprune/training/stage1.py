"""Stage-1 GlimpsePrune training: only the glimpse token and the VIP learn; the base model is frozen.

Loss (``mode: boxes``, upstream): loc_weight * (dice_weight * Dice + bce_weight * BCE) of the VIP logits against the
box token masks, plus lm_weight * cross-entropy of the answer with the glimpse inserted before it (1 : 1).
Loss (``mode: kl``, label-free, no boxes): KL(full-token answer distribution || softly pruned one) plus
sparsity_weight * the mean keep probability, so the predictor learns to drop what the answer does not need.

An early module (``module: {kind: early}``, method ``early_glimpse``) decides before the LLM: in ``boxes`` mode only the
vision encoder and the module run (Dice + BCE; the LM loss has no gradient into it), in ``kl`` mode the soft keep
bias applies from layer 0 on (``configs/stage1_world_early*.yaml``).

Runs on transformers' ``Trainer`` (progress bar, periodic eval, checkpoints, resume, fixed seed). Configs are YAML
files headed by their command, e.g. ``configs/stage1_world.yaml``::

    glimpseprune train --config configs/stage1_world.yaml [--resume | --overwrite]
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import build_module as module_of_config
from ..checkpoint import config_for_model
from ..config import GlimpseConfig
from ..data import world
from ..data.records import POINTS, boxes_on_image, mask_boxes, read_records
from ..methods.early_glimpse import EarlyGlimpseMethod
from ..methods.glimpse import GlimpseMethod
from ..modules.early import EarlyGlimpseModule
from ..modules.glimpse import GlimpseModule
from ..processing import build_inputs, load_image
from ..registry import get_adapter
from ..runtime.train import forward_train
from .losses import kl_loss, lm_loss, mask_loss, mask_metrics

logger = logging.getLogger(__name__)
TRAIN_SEED0 = 3_000_000_000  # synthetic training scenes; write_split's held-out seeds are seed * 10^6 + i


@dataclass
class Stage1Config:
    """A stage-1 run. Every field is checked on construction (``ValueError`` naming the field): numbers may be given
    as numeric strings, which are converted (YAML 1.1 reads ``1e-3`` as a string); whole-number fields take integral
    values only; booleans are not numbers. ``max_steps: -1`` trains for ``epochs`` epochs."""

    model: str = "embedded"  # base model directory, or "embedded" for the packaged world model
    # GlimpsePrune+ step B: a stage-2 output folder (module + LoRA adapter); its adapter is merged into the base
    # before the new module trains, and OUT/module holds the new module with that adapter (they load together)
    adapter: str | None = None
    output_dir: str = "runs/stage1"
    train_data: str | None = None  # JSONL records (ours or Visual-CoT's), all read; None = synthetic world scenes
    train_samples: int = 3000  # number of synthetic scenes (used only without train_data)
    eval_data: str | None = None
    eval_samples: int = 100
    # folder the records' relative image paths start from (Visual-CoT's metadata names images relative to its
    # cot_image_data/ folder, not to the JSONL); None = each JSONL's own folder
    image_root: str | None = None
    mode: str = "boxes"  # "boxes" (Dice + BCE + LM) or "kl" (label-free)
    module: dict = field(default_factory=dict)  # GlimpseConfig overrides (vip_width, prune_layer, ...)
    dice_weight: float = 1.0
    bce_weight: float = 0.1
    loc_weight: float = 1.0
    # grow each box token mask by this many token rings (8-neighbourhood) before it is a target: teaches the module
    # to rank the tokens around the answer next (what a fixed budget keeps after the box tokens); 0 = the boxes
    target_dilation: int = 0
    # families whose answer boxes become one point each (``point_at``) before they are targets: one token per object
    # (a counting question's kept tokens then number its objects, whatever their sizes); [] = every family's boxes
    point_families: list = field(default_factory=list)
    point_at: str = "centre"  # the point of each such box: "centre" or "top_left" (the object's first token)
    lm_weight: float = 1.0
    kl_weight: float = 1.0
    sparsity_weight: float = 0.05
    learning_rate: float = 1e-3
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 8
    grad_accum: int = 1
    warmup_ratio: float = 0.1
    logging_steps: int = 10
    eval_steps: int = 100
    save_steps: int = 100
    seed: int = 42
    threads: int | None = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            setattr(self, f.name, _check_field(f.name, f.type, getattr(self, f.name)))
        if self.mode not in ("boxes", "kl"):
            raise ValueError(f"mode must be 'boxes' or 'kl', got {self.mode!r}")
        if self.point_at not in POINTS:
            raise ValueError(f"point_at must be one of {POINTS}, got {self.point_at!r}")
        if self.point_families and self.mode == "kl":
            raise ValueError("point_families changes box targets, and mode kl is label-free (it uses none)")
        if self.target_dilation < 0:
            raise ValueError(f"target_dilation must be >= 0, got {self.target_dilation}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 (or null for torch's default), got {self.threads}")
        if self.max_steps != -1 and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, or -1 to train for `epochs` epochs, got {self.max_steps}")
        check_bounds(self, at_least_one=_AT_LEAST_ONE, positive=("learning_rate", "epochs"), nonnegative=_WEIGHTS)
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        allowed = {f.name for f in dataclasses.fields(GlimpseConfig)} - _MODEL_FILLED
        unknown = sorted(str(k) for k in self.module if k not in allowed)
        if unknown:
            raise ValueError(f"module: unknown GlimpseConfig fields {unknown}; known: {sorted(allowed)}")

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> Stage1Config:
        """Read a YAML mapping of field: value (``config_from_yaml``)."""
        return config_from_yaml(cls, path, **overrides)


def read_yaml_mapping(path: str | Path) -> dict:
    """The YAML mapping in ``path``: FileNotFoundError for a missing file; ValueError naming the file for unreadable
    or invalid YAML and for a document that is not a mapping (an empty file is {})."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no training config at {p}")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: the training config is not UTF-8 text ({e})") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{p} is not valid YAML: {e}") from None
    if raw is None:  # an empty file (or comments only): every field at its default
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"{p}: a training config is a mapping of field: value, got a {type(raw).__name__}")
    return raw


def config_from_yaml(cls, path: str | Path, **overrides: Any):
    """A config dataclass ``cls`` from a YAML mapping; ``overrides`` that are not None replace the file's values.
    A ``stage:`` key (which stage the file is for; see ``training.load_config``) is not a field. ValueError naming
    the file for unknown fields (named) and invalid values (the field named)."""
    p = Path(path)
    raw = read_yaml_mapping(p)
    raw.pop("stage", None)
    known = {f.name for f in dataclasses.fields(cls)}
    given = {**raw, **{k: v for k, v in overrides.items() if v is not None}}
    unknown = sorted(str(k) for k in given if k not in known)
    if unknown:
        raise ValueError(f"{p}: unknown fields {unknown}; known: {sorted(known)}")
    try:
        return cls(**given)
    except ValueError as e:
        raise ValueError(f"{p}: {e}") from None


# Fields a resumed run may change: where it writes, threads, cadence of logs/evals/checkpoints, and its length (the
# learning-rate schedule then follows the new length from the resumed step on). Every other field changes what is
# trained, so `train --resume` refuses a config that differs from the run's on any of them (a new field is strict).
RESUME_FREE_FIELDS = frozenset({"output_dir", "threads", "logging_steps", "eval_steps", "save_steps", "max_steps",
                                "epochs"})
_AT_LEAST_ONE = ("batch_size", "grad_accum", "train_samples", "eval_samples", "logging_steps", "eval_steps",
                 "save_steps")
_WEIGHTS = ("dice_weight", "bce_weight", "loc_weight", "lm_weight", "kl_weight", "sparsity_weight")
_MODEL_FILLED = {"base_model_type", "base_hidden_size", "base_num_layers", "base_num_heads", "base_vision_width",
                 "base_vision_depth", "base_model_name", "version"}  # set from the base model, not by a config


def check_bounds(cfg, at_least_one=(), positive=(), nonnegative=()) -> None:
    """ValueError naming the first field of ``cfg`` below its bound: >= 1, > 0 or >= 0."""
    for names, ok, bound in ((at_least_one, lambda v: v >= 1, ">= 1"), (positive, lambda v: v > 0, "> 0"),
                             (nonnegative, lambda v: v >= 0, ">= 0")):
        for name in names:
            if not ok(getattr(cfg, name)):
                raise ValueError(f"{name} must be {bound}, got {getattr(cfg, name)}")


def _check_field(name: str, kind: str, value: Any) -> Any:
    """``value`` converted to the field's annotated type (``kind``, a string under postponed annotations)."""
    optional = kind.endswith("| None")
    base = kind.removesuffix("| None").strip()
    if value is None and optional:
        return None
    if base in ("int", "float"):
        return _number(name, value, int if base == "int" else float)
    if base == "str":
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str) or not value:
            want = "a non-empty string" + (" or null" if optional else "")
            raise ValueError(f"{name} must be {want}, got {value!r}")
        return value
    if base == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return value
    if base == "list":
        if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(
                isinstance(v, str) and v for v in value):
            raise ValueError(f"{name} must be a list of names, got {value!r}")
        return list(value)
    if base == "dict":
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a mapping, got {value!r}")
        return dict(value)
    raise TypeError(f"config field {name} has an unchecked type {kind!r}")  # a new field needs a rule here


def _number(name: str, value: Any, kind: type) -> int | float:
    shown = value
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text) if kind is int and text.lstrip("+-").isdigit() else float(text)
        except ValueError:
            raise ValueError(f"{name} must be a number, got {shown!r}") from None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {shown!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {shown!r}")
    if kind is int:
        if value != int(value):
            raise ValueError(f"{name} must be a whole number, got {shown!r}")
        return int(value)
    return float(value)


# --------------------------------------------------------------------------- data


class WorldDataset(torch.utils.data.Dataset):
    """Synthetic scenes rendered on the fly (families in turn), deterministic by index. Each item's ``mask_boxes``
    are the boxes its token targets are built from (one point per box for ``point_families``, see
    ``records.mask_boxes``); ``boxes`` stay the answer's boxes."""

    def __init__(self, n: int, seed0: int = TRAIN_SEED0, point_families=(), point_at: str = "centre"):
        self.n, self.seed0, self.point_families, self.point_at = n, seed0, frozenset(point_families), point_at
        unknown = sorted(self.point_families - set(world.FAMILIES))
        if unknown:
            raise ValueError(f"point_families: {unknown} are not families of the synthetic world "
                             f"(its families: {list(world.FAMILIES)})")

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        s = world.sample(self.seed0 + i, world.FAMILIES[i % len(world.FAMILIES)])
        w, h = s.scene.size
        return {"image": world.render(s.scene), "question": s.question, "answer": s.answer, "boxes": s.boxes,
                "mask_boxes": mask_boxes(s.boxes, s.family, self.point_families, self.point_at), "family": s.family,
                "width": w, "height": h}


def check_records(ds, path, name: str, boxes: str | None = None) -> None:
    """A records file of a training config holds records, and (``boxes``: the setting that needs them) every
    record has a box: without one the VIP's target is empty (it learns to drop every token) or a box reward fails
    mid-run."""
    if path is None:
        return  # synthetic world scenes: never empty, always boxed
    if len(ds) == 0:
        raise ValueError(f"{name} {path} holds no records")
    gone = [r for r in ds.records if not r.image_path(ds.root).is_file()]
    if gone:  # read lazily by the Trainer: a missing one would stop the run mid-way
        raise FileNotFoundError(f"{name} {path}: {len(gone)} of {len(ds)} records name an image that does not exist "
                                f"(e.g. record {gone[0].id}: {gone[0].image_path(ds.root)})")
    if boxes:
        bare = [r.id for r in ds.records if not r.bboxs]
        if bare:
            raise ValueError(f"{name} {path}: {len(bare)} of {len(ds)} records have no bboxs (e.g. id {bare[0]!r}), "
                             f"which {boxes} needs: add boxes, leave those records out, or train without boxes "
                             "(stage 1 `mode: kl`; stage 2 `mask_source: vip` and no box_iou reward)")


class RecordDataset(torch.utils.data.Dataset):
    """Records of a JSONL file; images are read from disk when an item is taken. ``point_families`` as for
    ``WorldDataset``; one that no record has is an error unless ``strict`` is false (an eval split may lack a family
    the training split has)."""

    def __init__(self, path: str | Path, limit: int | None = None, image_root: str | Path | None = None,
                 point_families=(), point_at: str = "centre", strict: bool = True):
        self.root = Path(image_root) if image_root is not None else Path(path).parent
        self.point_families, self.point_at = frozenset(point_families), point_at
        if not self.root.is_dir():
            raise FileNotFoundError(f"image_root {self.root} is not a folder (the records' image paths start there)")
        self.records = read_records(path, limit)
        if self.records and not self.records[0].image_path(self.root).is_file():
            r = self.records[0]
            hint = "" if image_root is not None else (
                "; if the records name images relative to another folder (Visual-CoT: cot_image_data/), set "
                "image_root in the config")
            raise FileNotFoundError(f"{path}: the first record's image {r.image_path(self.root)} does not exist{hint}")
        present = {r.family for r in self.records}
        missing = sorted(self.point_families - present)
        if missing and strict:  # a misspelt family would otherwise change no target, silently
            raise ValueError(f"point_families: no record of {path} has family {missing} "
                             f"(families present: {sorted(present)})")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        image = load_image(r.image_path(self.root))
        boxes = boxes_on_image(r, image.size)  # the record's pixels on the image as loaded (or a named error)
        return {"image": image, "question": r.question, "answer": r.answer, "boxes": boxes,
                "mask_boxes": mask_boxes(boxes, r.family, self.point_families, self.point_at),
                "family": r.family, "width": image.width, "height": image.height}


def dilate(mask, rings: int):
    """A (h, w) bool token mask grown by ``rings`` 8-neighbourhood rings (numpy; ``rings`` 0 returns it as is).

    >>> import numpy as np
    >>> m = np.zeros((3, 4), bool); m[1, 1] = True
    >>> dilate(m, 1).astype(int).tolist()
    [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0]]
    """
    import numpy as np

    out = np.asarray(mask, dtype=bool)
    for _ in range(rings):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        rows = grown.copy()
        grown[:, 1:] |= rows[:, :-1]
        grown[:, :-1] |= rows[:, 1:]
        out = grown
    return out


class Collator:
    """Left-padded prompts, right-padded ``answer<eos>`` suffixes, and per-sample box token masks (the adapter maps
    boxes through the family's image preprocessing)."""

    def __init__(self, processor, model, dilation: int = 0):
        self.processor, self.model, self.dilation = processor, model, dilation
        self.adapter = get_adapter(model)
        tok = processor.tokenizer
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        if tok.eos_token_id is None:
            raise ValueError("the tokenizer has no eos token; stage-1 answers end with it")
        self.eos = tok.eos_token_id

    def __call__(self, items: list[dict]) -> dict:
        inputs = build_inputs(self.processor, [[it["image"]] for it in items], [it["question"] for it in items])
        tok = self.processor.tokenizer
        ids = [tok(it["answer"], add_special_tokens=False)["input_ids"] + [self.eos] for it in items]
        T = max(len(x) for x in ids)
        suffix = torch.full((len(items), T), self.pad, dtype=torch.long)
        smask = torch.zeros(len(items), T, dtype=torch.bool)
        for b, x in enumerate(ids):
            suffix[b, :len(x)] = torch.tensor(x)
            smask[b, :len(x)] = True
        boxes = [it.get("mask_boxes", it["boxes"]) for it in items]  # hand-made items may have no mask_boxes
        masks = self.adapter.box_masks(self.model, self.processor, inputs, boxes,
                                       [(it["width"], it["height"]) for it in items])
        targets = [torch.from_numpy(dilate(m, self.dilation).reshape(-1)) for m in masks]
        return {"inputs": dict(inputs), "suffix_ids": suffix, "suffix_mask": smask, "targets": targets}


# --------------------------------------------------------------------------- model wrapper


class Stage1Model(nn.Module):
    """Holds the trainable GlimpseModule as its only submodule; the frozen base is kept outside the state dict."""

    def __init__(self, base, module: GlimpseModule | EarlyGlimpseModule, cfg: Stage1Config):
        super().__init__()
        self.module = module
        object.__setattr__(self, "_base", base)  # not registered: checkpoints hold the module only
        self.adapter = get_adapter(base)
        self.early = module.cfg.kind == "early"
        self.method = EarlyGlimpseMethod(module=module) if self.early else GlimpseMethod(module=module)
        self.cfg = cfg
        self.metrics: dict[str, float] = {}

    def forward(self, inputs: dict, suffix_ids, suffix_mask, targets) -> dict:
        cfg, base = self.cfg, self._base
        if cfg.mode == "boxes" and self.early:
            # the LLM runs after the decision and sees none of the module: its LM loss has no gradient here, so
            # only the encoder runs (Dice + BCE against the box tokens)
            enc = self.adapter.encode(base, inputs, taps=self.method.vision_taps(), tap_fn=self.method.vision_tap_fn())
            vip = self.method.logits_for(enc)
            loc = mask_loss(vip, targets, cfg.dice_weight, cfg.bce_weight)
            loss, parts = cfg.loc_weight * loc, {"loc_loss": loc.item()}
            self.metrics = {**parts, **mask_metrics(vip, targets)}
            return {"loss": loss}
        if cfg.mode == "boxes":
            out = forward_train(base, self.adapter, self.method, inputs, suffix_ids, suffix_mask)
            loc = mask_loss(out.vip_logits, targets, cfg.dice_weight, cfg.bce_weight)
            lm = lm_loss(out.suffix_logits, suffix_ids, suffix_mask)
            loss = cfg.loc_weight * loc + cfg.lm_weight * lm
            parts = {"loc_loss": loc.item(), "lm_loss": lm.item()}
        else:
            from ..methods.full import FullMethod

            with torch.no_grad():
                teacher = forward_train(base, self.adapter, FullMethod(), inputs, suffix_ids, suffix_mask)
            out = forward_train(base, self.adapter, self.method, inputs, suffix_ids, suffix_mask, soft_keep=True)
            kl = kl_loss(out.suffix_logits, teacher.suffix_logits, suffix_mask)
            keep = torch.cat([torch.sigmoid(lg.float()) for lg in out.vip_logits]).mean()
            loss = cfg.kl_weight * kl + cfg.sparsity_weight * keep
            parts = {"kl_loss": kl.item(), "keep_prob": keep.item()}
        self.metrics = {**parts, **mask_metrics(out.vip_logits, targets)}
        return {"loss": loss}


def build_module(base, cfg: Stage1Config) -> GlimpseModule | EarlyGlimpseModule:
    """The module ``cfg.module`` describes (``kind: early``: an ``EarlyGlimpseModule``), sized for ``base``."""
    dims = get_adapter(base).dims(base)
    gcfg = config_for_model(dims, base_model_name=getattr(base.config, "_name_or_path", None), **cfg.module)
    return module_of_config(gcfg)
