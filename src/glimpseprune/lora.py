"""LoRA adapters on the LLM for GlimpsePrune+ (stage 2: RL fine-tuning of the base model on pruned inputs).

The adapter is injected **in place** (``peft.inject_adapter_in_model``): the model stays the transformers model, its
decoder layers' ``nn.Linear`` submodules become ``peft`` LoRA layers, so ``get_adapter(model).layers(model)`` and the
runtime (which calls the decoder layers one by one) run the adapted model unchanged. Defaults follow upstream (r 32,
alpha 64, dropout 0.05, every ``nn.Linear`` of every decoder layer: q, k, v, o, gate, up, down; the vision encoder,
merger / projector, embeddings and ``lm_head`` untouched). peft initialises B = 0: a fresh adapter is the identity.

Files are PEFT's own (``adapter_config.json`` + ``adapter_model.safetensors``, keys ``base_model.model.<module>.
lora_A.weight``), so a folder also loads with ``PeftModel.from_pretrained(base, DIR)``. A GlimpsePrune+ folder
(``save_plus``) holds the glimpse module and its adapter together; ``checkpoint.load_plus`` / ``gp.load`` load both.

Example (training, then inference)::

    model = add_lora(model)                     # base weights frozen, LoRA trainable
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-4)
    with disabled_adapter(model):               # the reference policy: the stock base model
        ref_logits = model(**inputs).logits
    save_plus(module, model, "gp-plus/")
    pm = gp.load("Qwen2.5-VL-7B-Instruct/", module="gp-plus/")   # base + merged adapter + module
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    MERGED_ATTR,
    MERGED_NAME,
    AdapterRecord,
    _read_safetensors,
    file_sha256,
    save_module,
)
from .modules.glimpse import GlimpseModule
from .outputs import read_json
from .registry import get_adapter

logger = logging.getLogger(__name__)

ADAPTER_NAME = "default"  # peft's adapter name inside the model (not stored in the files)
PEFT_PREFIX = "base_model.model."  # PeftModel's key prefix in adapter_model.safetensors
_LORA_KEYS = (".lora_A.", ".lora_B.")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters (upstream stage 2). ``targets``: None = every ``nn.Linear`` in the LLM decoder layers;
    else the projection names to adapt within them (e.g. ``("q_proj", "v_proj")``); never outside the decoder.
    ``layers``: None = every decoder layer (upstream); else the indices of the decoder layers that get adapters
    (peft's ``layers_to_transform``), e.g. only those after the prune layer K."""

    r: int = 32
    alpha: float = 64
    dropout: float = 0.05
    targets: tuple[str, ...] | None = None
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoRA rank r must be an integer >= 1, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be a number > 0, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if self.targets is not None:
            if isinstance(self.targets, str) or not all(isinstance(t, str) and t for t in self.targets):
                raise ValueError(f"targets must be a tuple of module names (e.g. ('q_proj', 'v_proj')), "
                                 f"got {self.targets!r}")
            if not self.targets:
                raise ValueError("targets is empty: the adapter would change nothing")
            object.__setattr__(self, "targets", tuple(self.targets))
        if self.layers is not None:
            if isinstance(self.layers, (str, bytes)) or not all(
                    isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers):
                raise ValueError(f"layers must be a tuple of decoder layer indices >= 0, got {self.layers!r}")
            if not self.layers:
                raise ValueError("layers is empty: the adapter would change nothing")
            object.__setattr__(self, "layers", tuple(sorted(set(self.layers))))


def decoder_linear_names(model: nn.Module, targets: tuple[str, ...] | None = None,
                         layer_ids: tuple[int, ...] | None = None) -> list[str]:
    """Full module names (as in ``model.named_modules()``) of the ``nn.Linear`` layers inside the LLM's decoder
    layers, in layer order; ``targets`` keeps those whose own name (the last part, e.g. ``q_proj``) is listed,
    ``layer_ids`` those in the decoder layers of these indices."""
    layers = get_adapter(model).layers(model)
    prefix = next((n for n, m in model.named_modules() if m is layers), None)
    if prefix is None:
        raise ValueError("the model's decoder layers are not among its submodules")
    if layer_ids is not None:
        outside = [i for i in layer_ids if not 0 <= i < len(layers)]
        if outside:
            raise ValueError(f"LoRA layers {outside} are outside the LLM's decoder layers 0..{len(layers) - 1}")
    names = [f"{prefix}.{i}.{n}" for i, layer in enumerate(layers) for n, m in layer.named_modules()
             if isinstance(m, nn.Linear) and n and (layer_ids is None or i in layer_ids)]
    if targets is not None:
        unknown = sorted(set(targets) - {n.rsplit(".", 1)[-1] for n in names})
        if unknown:
            known = sorted({n.rsplit(".", 1)[-1] for n in names})
            raise ValueError(f"LoRA targets {unknown} are not linear layers of the decoder; known: {known}")
        names = [n for n in names if n.rsplit(".", 1)[-1] in targets]
    return names


def has_lora(model: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def _base_name(model: nn.Module) -> str | None:
    return getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None) or None


def add_lora(model: nn.Module, settings: LoraSettings | None = None, base_model_name: str | None = None) -> nn.Module:
    """Inject a fresh LoRA adapter into ``model`` (in place; returned): trainable LoRA weights (fp32 on a half
    precision base), every other parameter of the model frozen. ``base_model_name`` (default: the model's
    ``name_or_path``) is recorded in the adapter config."""
    from peft import LoraConfig
    from peft.functional import cast_adapter_dtype, inject_adapter_in_model

    settings = settings or LoraSettings()
    if has_lora(model) or hasattr(model, "peft_config"):
        raise ValueError("the model already carries a PEFT adapter; merge it first (merge_lora) or reload the base")
    names = decoder_linear_names(model, settings.targets, settings.layers)
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, bias="none",
                        target_modules=names, task_type="CAUSAL_LM",
                        base_model_name_or_path=base_model_name or _base_name(model))
    inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    cast_adapter_dtype(model, ADAPTER_NAME)
    config.target_modules = set(names)  # peft shortened the list to suffixes; the saved config names every module
    return model.train(model.training)  # the new LoRA dropouts follow the model's mode (eval: no dropout)


def _lora_named(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    for name, p in model.named_parameters():
        if any(k in name for k in _LORA_KEYS) and f".{ADAPTER_NAME}." in name:
            yield name, p


def lora_named_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The LoRA parameters by their full parameter name (what a training checkpoint saves and a resume copies back)."""
    return dict(_lora_named(model))


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter's weights (LoRA A and B of every adapted layer): what the optimiser trains."""
    params = [p for _, p in _lora_named(model)]
    if not params:
        raise ValueError("the model has no LoRA adapter (add_lora or load_adapter(..., merge=False) first)")
    return params


def _tuner_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def disabled_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as the stock base inside the block (the RL reference policy); the adapter, and which of its
    weights require grad, are restored on exit, also after an exception."""
    layers = _tuner_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapter to disable")
    grads = {id(p): p.requires_grad for _, p in _lora_named(model)}
    for _, m in layers:
        m.enable_adapters(False)
    try:
        yield model
    finally:
        for _, m in layers:
            m.enable_adapters(True)
        for _, p in _lora_named(model):
            p.requires_grad_(grads.get(id(p), p.requires_grad))


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights under PEFT's file keys (``base_model.model.<module>.lora_A.weight``), on the CPU."""
    tag = f".{ADAPTER_NAME}."
    state = {PEFT_PREFIX + n.replace(tag, "."): p.detach().contiguous().cpu() for n, p in _lora_named(model)}
    if not state:
        raise ValueError("the model has no LoRA adapter to save")
    return state


def save_adapter(model: nn.Module, out_dir: str | Path) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's layout) to ``out_dir``."""
    from safetensors.torch import save_file

    state = lora_state_dict(model)
    config = model.peft_config[ADAPTER_NAME]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    save_file(state, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return out


def record_adapter(model: nn.Module, adapter_dir: str | Path) -> AdapterRecord:
    """The record a module's JSON keeps about the adapter saved in ``adapter_dir`` from ``model``."""
    config = model.peft_config[ADAPTER_NAME]
    return AdapterRecord(sha256=file_sha256(Path(adapter_dir) / ADAPTER_WEIGHTS), r=int(config.r),
                         alpha=float(config.lora_alpha), base_model_name=config.base_model_name_or_path,
                         base_model_type=getattr(model.config, "model_type", None))


def save_plus(module: GlimpseModule, model: nn.Module, out_dir: str | Path) -> Path:
    """One GlimpsePrune+ folder: the LoRA adapter of ``model`` and the glimpse ``module`` trained with it, the
    module's JSON recording the adapter (its sha256). Load it with ``gp.load(base_dir, module=out_dir)``."""
    out = Path(out_dir)
    save_adapter(model, out)
    return save_module(module, out, adapter=record_adapter(model, out))


# --------------------------------------------------------------------------- loading

_UNSUPPORTED = {"use_dora": "DoRA", "lora_bias": "LoRA biases", "modules_to_save": "modules_to_save",
                "trainable_token_indices": "trainable tokens"}
_SCALING = ("use_rslora", "alpha_pattern", "rank_pattern")


def read_adapter(path: str | Path):
    """``(LoraConfig, state)`` of a PEFT LoRA folder, validated: files present, a plain LoRA config, only
    ``lora_A`` / ``lora_B`` weights (floating point, finite, A and B for each module); state keys are module names
    + ``.lora_A.weight`` / ``.lora_B.weight`` (the PeftModel prefix removed)."""
    from peft import LoraConfig

    p = Path(path)
    cfg_file, w_file = p / ADAPTER_CONFIG, p / ADAPTER_WEIGHTS
    for f in (cfg_file, w_file):
        if not f.is_file():
            raise FileNotFoundError(f"no LoRA adapter at {p}: expected {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} "
                                    f"({f.name} missing)")
    raw = read_json(cfg_file)
    if not isinstance(raw, dict) or str(raw.get("peft_type", "")).upper() != "LORA":
        raise ValueError(f"{cfg_file}: not a PEFT LoRA config (peft_type "
                         f"{raw.get('peft_type') if isinstance(raw, dict) else raw!r:.40})")
    try:
        config = LoraConfig.from_pretrained(str(p))
    except Exception as e:  # TypeError / ValueError on a field this peft cannot take
        raise ValueError(f"{cfg_file}: not a usable LoRA config ({type(e).__name__}: {e})") from e
    for key, what in _UNSUPPORTED.items():
        if getattr(config, key, None):
            raise ValueError(f"{cfg_file}: {what} ({key}) is not supported; only plain LoRA adapters")
    for key in _SCALING:  # they change alpha / r per module: the recorded (r, alpha) would not be what is applied
        if getattr(config, key, None):
            raise ValueError(f"{cfg_file}: {key} is set, which changes the adapter's scaling from the recorded "
                             "r / lora_alpha; only plain LoRA adapters (as glimpseprune writes them)")
    if getattr(config, "bias", "none") != "none":
        raise ValueError(f"{cfg_file}: bias={config.bias!r} is not supported; only plain LoRA adapters (bias none)")
    state = {}
    for key, value in _read_safetensors(w_file).items():
        name = key.removeprefix(PEFT_PREFIX)
        if not (name.endswith(".lora_A.weight") or name.endswith(".lora_B.weight")):
            raise ValueError(f"{w_file}: unexpected tensor {key} (only lora_A / lora_B weights are supported)")
        if not value.is_floating_point() or value.dim() != 2:
            raise ValueError(f"{w_file}: tensor {key} must be a 2-D floating-point matrix, got {value.dtype} "
                             f"{list(value.shape)}")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{w_file}: tensor {key} holds non-finite values (NaN or Inf)")
        state[name] = value
    modules = {k.rsplit(".", 2)[0] for k in state}
    for m in sorted(modules):
        for part in ("lora_A", "lora_B"):
            if f"{m}.{part}.weight" not in state:
                raise ValueError(f"{w_file}: {m} has no {part} weight")
    if not modules:
        raise ValueError(f"{w_file} holds no LoRA weights")
    return config, state


def check_adapter_fits(model: nn.Module, config, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Raise ValueError (naming the folder) unless every adapted module is an ``nn.Linear`` of ``model`` with the
    adapter's shapes: an adapter for another base model is refused before the model is touched. A differing
    recorded base model name only warns (the same model under another path is common)."""
    p = Path(path)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    modules = sorted({k.rsplit(".", 2)[0] for k in state})
    absent = [m for m in modules if m not in linears]
    if absent:
        raise ValueError(f"the LoRA adapter in {p} was trained for another base model "
                         f"({config.base_model_name_or_path or '?'}): this model has no linear layer {absent[0]}"
                         + (f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""))
    for m in modules:
        a, b, lin = state[f"{m}.lora_A.weight"], state[f"{m}.lora_B.weight"], linears[m]
        if a.shape[1] != lin.in_features or b.shape[0] != lin.out_features or a.shape[0] != b.shape[1]:
            raise ValueError(f"the LoRA adapter in {p} was trained for another base model "
                             f"({config.base_model_name_or_path or '?'}): {m} is {lin.in_features} -> "
                             f"{lin.out_features} here, the adapter has A {list(a.shape)}, B {list(b.shape)}")
    want, have = config.base_model_name_or_path, _base_name(model)
    if want and have and Path(str(want)).name != Path(str(have)).name:
        logger.warning("the LoRA adapter in %s was trained on %s; applying it to %s", p, want, have)


def load_adapter(model: nn.Module, path: str | Path, merge: bool = True, trainable: bool = False,
                 expected_sha256: str | None = None) -> nn.Module:
    """Apply the PEFT LoRA adapter in ``path`` to ``model`` (in place; returned), after checking it fits.
    ``expected_sha256``: the weights file's hash when the caller has just checked it (not recomputed).

    ``merge=True``: the adapter is merged into the base weights and the LoRA layers removed; the model is a plain
    transformers model again (the runtime needs nothing else) and remembers the adapter's sha256 (``MERGED_ATTR``).
    ``merge=False``: the LoRA layers stay active, unmerged (``trainable`` makes their weights require grad, e.g. to
    continue training; every other parameter is then frozen by peft)."""
    from peft.functional import cast_adapter_dtype, inject_adapter_in_model

    p = Path(path)
    config, state = read_adapter(p)
    sha = expected_sha256 or file_sha256(p / ADAPTER_WEIGHTS)  # load_plus has just checked the recorded one
    if has_lora(model) or hasattr(model, "peft_config"):
        raise ValueError(f"the model already carries a PEFT adapter; cannot apply the one in {p} on top")
    if getattr(model, MERGED_ATTR, None) is not None:
        raise ValueError(f"the model's weights already hold a merged LoRA adapter; cannot apply the one in {p} "
                         "on top (load the stock base model)")
    check_adapter_fits(model, config, state, p)
    config.target_modules = sorted({k.rsplit(".", 2)[0] for k in state})  # exactly the modules the file adapts
    config.inference_mode = not trainable
    before = {id(q): q.requires_grad for q in model.parameters()}  # peft freezes every base parameter
    try:  # until the weights are in (and merged), a failure takes the LoRA layers out again: the caller's model is
        # left as it was, requires_grad included
        inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)  # (it held none: refused above)
        cast_adapter_dtype(model, ADAPTER_NAME)
        model.train(model.training)
        tag = f".{ADAPTER_NAME}."
        named = dict(_lora_named(model))
        keyed = {k.replace(".lora_A.", ".lora_A" + tag).replace(".lora_B.", ".lora_B" + tag): v
                 for k, v in state.items()}
        if set(keyed) != set(named):
            raise ValueError(f"{p / ADAPTER_WEIGHTS} does not fit the LoRA layers its config creates: missing "
                             f"{sorted(set(named) - set(keyed))[:3]}, unexpected "
                             f"{sorted(set(keyed) - set(named))[:3]}")
        wrong = next((k for k, v in keyed.items() if v.shape != named[k].shape), None)
        if wrong is not None:
            raise ValueError(f"{p / ADAPTER_WEIGHTS}: {wrong} is {list(keyed[wrong].shape)}, the LoRA layer its "
                             f"config creates is {list(named[wrong].shape)}")
        with torch.no_grad():
            for k, v in keyed.items():
                named[k].copy_(v)
        if merge:  # every layer's merged weight checked before any is written: a merge fails whole or not at all
            _check_mergeable(model, f"the LoRA adapter in {p}", "load it with merge=False, or the base in float32")
    except BaseException:
        _remove_lora(model)
        for q in model.parameters():
            q.requires_grad_(before.get(id(q), q.requires_grad))
        raise
    if not trainable:  # inference: leave the model's requires_grad as it was, the adapter frozen
        for q in model.parameters():
            q.requires_grad_(before.get(id(q), False))
    if merge:
        _unwrap(model, merge=True)  # checked above
        setattr(model, MERGED_ATTR, sha)
    return model


@torch.no_grad()
def _check_mergeable(model: nn.Module, source: str, hint: str) -> None:
    """Raise ValueError unless every LoRA layer's merged weight (base + delta, in the base dtype) is finite: what
    peft's ``safe_merge`` checks layer by layer while it writes, checked here for all before any is written (a
    failing merge would leave the layers before the failing one merged)."""
    for name, layer in _outer_lora_layers(model):
        base = layer.get_base_layer().weight
        for adapter in layer.active_adapters:
            merged = base + layer.get_delta_weight(adapter).to(base.dtype)
            if not bool(torch.isfinite(merged).all()):
                raise ValueError(f"{source} gives non-finite weights in {name} when merged into this {base.dtype} "
                                 f"model: {hint}")


def _outer_lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of the LoRA layers not nested inside another one (an inner one goes with its outer one)."""
    layers = _tuner_layers(model)
    names = {n for n, _ in layers}
    return [(n, m) for n, m in layers if not any(n.startswith(o + ".") for o in names)]


def _unwrap(model: nn.Module, merge: bool) -> None:
    """Put each LoRA layer's base layer back in its place (``merge``: with the adapter merged into its weights) and
    drop ``peft_config``."""
    for name, layer in _outer_lora_layers(model):
        if merge:
            layer.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config


def _remove_lora(model: nn.Module) -> None:
    """Take injected LoRA layers out without merging them: the model as it was before the injection."""
    _unwrap(model, merge=False)


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge the active LoRA adapter into the base weights and remove the LoRA layers (in place; returned). Every
    layer's merged weight is checked first: a merge that would give non-finite weights changes nothing."""
    if not _tuner_layers(model):
        raise ValueError("the model has no LoRA adapter to merge")
    _check_mergeable(model, "the model's LoRA adapter", "keep it unmerged, or merge into the base in float32")
    _unwrap(model, merge=True)
    return model


def merge_and_save(base_dir: str | Path, plus_dir: str | Path, out_dir: str | Path,
                   dtype: torch.dtype | None = None) -> Path:
    """Write the base model with the adapter of ``plus_dir`` merged (merged in fp32, saved in ``dtype``, default
    the base checkpoint's) plus its processor to ``out_dir``, loadable by ``gp.load_base`` / ``gp.load``. The folder
    records the merged adapter's sha256, so ``gp.load(out_dir, module=plus_dir)`` does not apply it twice."""
    from .api import load_base
    from .checkpoint import adapter_record
    from .processing import save_processor

    base, plus, out = Path(base_dir), Path(plus_dir), Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; merge_and_save writes a new model folder")
    if (plus / "glimpse_config.json").is_file():
        adapter_record(plus)  # a GlimpsePrune+ folder: its module and adapter must belong together
    read_adapter(plus)  # named errors before the base model is loaded
    if dtype is None:  # the checkpoint's own dtype (loading below in fp32 rewrites the config's)
        raw = read_json(base / "config.json") if (base / "config.json").is_file() else {}
        name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
        dtype = getattr(torch, name, None) if isinstance(name, str) else None
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"{base / 'config.json'}: dtype {name!r} is not a torch floating-point dtype; pass dtype=")
    model, processor = load_base(base, dtype=torch.float32)
    load_adapter(model, plus, merge=True)
    sha = getattr(model, MERGED_ATTR)
    model = model.to(dtype)
    out.mkdir(parents=True, exist_ok=True)
    try:
        model.save_pretrained(str(out))
        save_processor(processor, out)
        record = {"adapter_sha256": sha, "adapter_dir": str(plus), "base_model": str(base)}
        (out / MERGED_NAME).write_text(json.dumps(record, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return out

