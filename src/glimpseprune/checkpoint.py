"""GlimpsePrune module checkpoints: ``glimpse_config.json`` + ``glimpse_module.safetensors`` (no pickles), recording
the base model and library versions; plus the converter from the upstream release layout
(``config.json`` + ``new_modules_gp.pt``), the only place a pickle is read (``torch.load(weights_only=True)``).

A GlimpsePrune+ folder also holds the PEFT LoRA adapter of the base model the module was trained on
(``adapter_config.json`` + ``adapter_model.safetensors``); the module's JSON records it (``"adapter"``: format, rank,
alpha, base model, sha256 of the weights file), and ``load_module`` refuses such a module without its adapter (the
module alone on the stock base is the wrong function, upstream issue #7): load both with ``load_plus``.

The config's ``kind`` says which module class the folder holds: "glimpse" (``GlimpseModule``; folders written before
the field have none and load as such) or "early" (``EarlyGlimpseModule``, method ``early_glimpse``)."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file, save_file

from .adapters.base import ModelDims
from .config import (
    FAMILY_DEFAULTS,
    VIP_ACTIVATIONS,
    GlimpseConfig,
    SelectionConfig,
    _as_float,
    _as_int,
    _as_layers,
    default_prune_layer,
    default_vision_taps,
)
from .modules.early import EarlyGlimpseModule
from .modules.glimpse import GlimpseModule
from .outputs import read_json

logger = logging.getLogger(__name__)

CONFIG_NAME = "glimpse_config.json"
WEIGHTS_NAME = "glimpse_module.safetensors"
UPSTREAM_WEIGHTS = "new_modules_gp.pt"
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's names: the folder also loads with PeftModel.from_pretrained
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FORMAT = "peft-lora"
MERGED_NAME = "glimpseprune_merged_adapter.json"  # in a base model folder written by lora.merge_and_save
MERGED_ATTR = "_glimpseprune_merged_adapter"  # on a model: sha256 of the adapter merged into its weights


def library_version() -> str:
    from . import __version__

    return __version__


def build_module(cfg: GlimpseConfig) -> GlimpseModule | EarlyGlimpseModule:
    """A fresh module of the class ``cfg.kind`` names ("glimpse": GlimpseModule, "early": EarlyGlimpseModule)."""
    return EarlyGlimpseModule(cfg) if cfg.kind == "early" else GlimpseModule(cfg)


def config_for_model(dims: ModelDims, base_model_name: str | None = None, **overrides: Any) -> GlimpseConfig:
    """A GlimpseConfig sized for a model: K = ceil(2L/3) - 1, four evenly spaced encoder taps, the glimpse norm's
    epsilon from the model's ``rms_norm_eps`` (where ``dims`` carries it) and the family's defaults
    (``config.FAMILY_DEFAULTS``, e.g. log-softmax scores for LLaVA), unless overridden."""
    fields = dict(
        base_model_type=dims.model_type, base_hidden_size=dims.hidden_size, base_num_layers=dims.num_layers,
        base_num_heads=dims.num_heads, base_vision_width=dims.vision_width, base_vision_depth=dims.vision_depth,
        prune_layer=default_prune_layer(dims.num_layers), vision_taps=default_vision_taps(dims.vision_depth),
        base_model_name=base_model_name, **FAMILY_DEFAULTS.get(dims.model_type, {}),
    )
    if dims.rms_norm_eps is not None:
        fields["glimpse_norm_eps"] = dims.rms_norm_eps
    if overrides.get("kind") == "early":  # scores before the LLM: no layer K, no glimpse or attention layers
        fields["prune_layer"] = -1
    return GlimpseConfig(**{**fields, **overrides})


def check_compatible(cfg: GlimpseConfig, dims: ModelDims) -> None:
    """Raise ValueError naming every mismatch between a module's recorded base model and this model."""
    pairs = [("model type", cfg.base_model_type, dims.model_type), ("hidden size", cfg.base_hidden_size,
             dims.hidden_size), ("layer count", cfg.base_num_layers, dims.num_layers),
             ("attention heads", cfg.base_num_heads, dims.num_heads),
             ("vision width", cfg.base_vision_width, dims.vision_width),
             ("vision depth", cfg.base_vision_depth, dims.vision_depth)]
    bad = [f"{name}: module {a} vs model {b}" for name, a, b in pairs if a != b]
    if bad:
        raise ValueError(f"the glimpse module was trained for another base model ({cfg.base_model_name or '?'}): "
                         + "; ".join(bad))


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class AdapterRecord:
    """What a module's JSON records about the LoRA adapter it was trained with (``"adapter"``)."""

    sha256: str  # of adapter_model.safetensors
    r: int
    alpha: float
    base_model_name: str | None = None
    base_model_type: str | None = None
    format: str = ADAPTER_FORMAT

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Any, where: Path) -> AdapterRecord:
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: 'adapter' must be an object, got {raw!r:.80}")
        if raw.get("format") != ADAPTER_FORMAT:
            raise ValueError(f"{where}: adapter format {raw.get('format')!r} is not supported "
                             f"(only {ADAPTER_FORMAT!r})")
        sha = raw.get("sha256")
        if not isinstance(sha, str) or len(sha) != 64:
            raise ValueError(f"{where}: adapter.sha256 must be a 64-digit hex string, got {sha!r:.80}")
        try:
            r, alpha = _as_int("adapter.r", raw.get("r")), _as_float("adapter.alpha", raw.get("alpha"))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e
        names = {k: raw.get(k) for k in ("base_model_name", "base_model_type")}
        for k, v in names.items():
            if v is not None and not isinstance(v, str):
                raise ValueError(f"{where}: adapter.{k} must be a string or null, got {v!r:.80}")
        return cls(sha256=sha.lower(), r=r, alpha=alpha, **names)



def read_merged_record(model_dir: str | Path) -> str | None:
    """The sha256 of the LoRA adapter merged into a base model folder (``lora.merge_and_save`` output), or None."""
    f = Path(model_dir) / MERGED_NAME
    if not f.is_file():
        return None
    raw = read_json(f)
    sha = raw.get("adapter_sha256") if isinstance(raw, dict) else None
    if not isinstance(sha, str) or len(sha) != 64:
        raise ValueError(f"{f}: adapter_sha256 must be a 64-digit hex string, got {sha!r:.80}")
    return sha.lower()

def save_module(module: GlimpseModule, out_dir: str | Path, adapter: AdapterRecord | None = None) -> Path:
    """Write the module; ``adapter`` records the LoRA adapter saved beside it (``lora.save_plus`` passes it). A
    folder that already holds an adapter is refused without one: it would not load (the two must belong together)."""
    from .validation import check_finite_module

    if not isinstance(module, torch.nn.Module) or not isinstance(getattr(module, "cfg", None), GlimpseConfig):
        raise TypeError(f"save_module takes a glimpse or early module (a GlimpseModule / EarlyGlimpseModule), got "
                        f"{type(module).__name__}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"cannot save the module into {out}: it is a file, not a folder")
    check_finite_module(module)  # a module that would not load again is not written
    held = [n for n in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if (out / n).is_file()]
    if adapter is None and held:
        raise ValueError(f"{out} holds a LoRA adapter ({', '.join(held)}); save the module with its adapter "
                         "(glimpseprune.lora.save_plus) or into another folder")
    out.mkdir(parents=True, exist_ok=True)
    meta = {"glimpse": module.cfg.to_dict(), "library_version": library_version(),
            "transformers_version": transformers.__version__, "torch_version": torch.__version__}
    if adapter is not None:
        meta["adapter"] = adapter.to_dict()
    (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt", "library": "glimpseprune"})
    return out


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError (truncated, foreign header, ...), OSError: name the file, not the parser
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e


def _check_tensors(state: dict, expected: dict[str, torch.Tensor], path: Path,
                   names: dict[str, str] | None = None) -> None:
    """Every tensor a module expects, and nothing else: floating point, the expected shape, finite. Errors name the
    file and the tensor (``names`` maps our keys to the file's own, e.g. the upstream layout's)."""
    names = names or {}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path} does not fit its config: missing {[names.get(k, k) for k in missing]}, "
                         f"unexpected {[names.get(k, k) for k in unexpected]}")
    for key, want in expected.items():
        value, name = state[key], names.get(key, key)
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: {name} is a {type(value).__name__}, not a tensor")
        if not value.is_floating_point():
            raise ValueError(f"{path}: tensor {name} has dtype {value.dtype}; expected a floating-point tensor")
        if value.shape != want.shape:
            raise ValueError(f"{path}: tensor {name} has shape {list(value.shape)}, expected {list(want.shape)}")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{path}: tensor {name} holds non-finite values (NaN or Inf)")


def _expected_state(cfg: GlimpseConfig) -> dict[str, torch.Tensor]:
    """The state dict a module of ``cfg`` has, as shapes only (meta tensors: nothing allocated before the file's
    tensors are known to fit)."""
    with torch.device("meta"):
        return build_module(cfg).state_dict()


def _read_meta(p: Path) -> tuple[dict, GlimpseConfig]:
    """The module folder's JSON and its validated config (files present, valid JSON, valid fields)."""
    cfg_file, w_file = p / CONFIG_NAME, p / WEIGHTS_NAME
    if not cfg_file.is_file() or not w_file.is_file():
        hint = ""
        if (p / UPSTREAM_WEIGHTS).is_file():
            hint = " (an upstream release? convert it with `glimpseprune convert`)"
        elif (p / ADAPTER_CONFIG).is_file():
            hint = " (only a LoRA adapter is here; its glimpse module is missing)"
        raise FileNotFoundError(f"no glimpse module at {p}: expected {CONFIG_NAME} and {WEIGHTS_NAME}{hint}")
    meta = read_json(cfg_file)
    if not isinstance(meta, dict) or not isinstance(meta.get("glimpse"), dict):
        raise ValueError(f"{cfg_file}: expected a JSON object with a 'glimpse' object (written by save_module)")
    try:
        cfg = GlimpseConfig.from_dict(meta["glimpse"])
    except ValueError as e:
        raise ValueError(f"{cfg_file}: {e}") from e
    return meta, cfg


def adapter_record(path: str | Path, meta: dict | None = None) -> AdapterRecord | None:
    """The LoRA adapter a module folder's JSON records (None: a plain module), checked against the folder: a recorded
    adapter must be there (FileNotFoundError), and adapter files need a record with their sha256 and rank (ValueError):
    the module and the adapter were trained together and are only valid together."""
    p = Path(path)
    if meta is None:
        meta, _ = _read_meta(p)
    cfg_file, a_cfg, a_w = p / CONFIG_NAME, p / ADAPTER_CONFIG, p / ADAPTER_WEIGHTS
    held = [f.name for f in (a_cfg, a_w) if f.is_file()]
    if meta.get("adapter") is None:
        if held:
            raise ValueError(f"{p} holds a LoRA adapter ({', '.join(held)}) but {CONFIG_NAME} records none: the "
                             "module was not trained with this adapter (save both with glimpseprune.lora.save_plus, "
                             "or move the adapter out)")
        return None
    rec = AdapterRecord.from_dict(meta["adapter"], cfg_file)
    if len(held) < 2:
        missing = [n for n in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if n not in held]
        raise FileNotFoundError(f"this module was trained with a LoRA adapter that is missing from {p}; loading the "
                                f"module alone loses its accuracy (missing {', '.join(missing)})")
    if file_sha256(a_w) != rec.sha256:
        raise ValueError(f"{a_w} is not the adapter this module was trained with (its sha256 differs from the one "
                         f"{cfg_file} records)")
    raw = read_json(a_cfg)
    if not isinstance(raw, dict):
        raise ValueError(f"{a_cfg}: expected a JSON object (a PEFT adapter config)")
    if str(raw.get("peft_type", "")).upper() != "LORA":
        raise ValueError(f"{a_cfg}: peft_type {raw.get('peft_type')!r} is not LORA")
    if raw.get("r") != rec.r or raw.get("lora_alpha") != rec.alpha:
        raise ValueError(f"{a_cfg} (r {raw.get('r')}, alpha {raw.get('lora_alpha')}) does not match the adapter "
                         f"{cfg_file} records (r {rec.r}, alpha {rec.alpha})")
    return rec


def load_module(path: str | Path, dims: ModelDims | None = None, device=None, dtype=None, *,
                allow_without_adapter: bool = False) -> GlimpseModule | EarlyGlimpseModule:
    """Load a module saved by ``save_module``; with ``dims``, check it belongs to that base model.

    Everything is validated before use: invalid JSON or config fields, an unreadable or truncated weights file,
    missing / unexpected / misshapen / non-floating tensors and NaN or Inf values (also after casting to ``dtype``)
    raise ValueError naming the file and the field or tensor. A module trained with a LoRA adapter (GlimpsePrune+)
    is refused: load it with ``load_plus(model, path)``, or pass ``allow_without_adapter=True`` to take the module
    alone (its adapter files are then not checked)."""
    from .validation import check_device, resolve_dtype

    check_device(device)
    dtype = None if dtype is None else resolve_dtype(dtype)
    dtype = None if dtype == "auto" else dtype
    p = Path(path)
    meta, cfg = _read_meta(p)
    if not allow_without_adapter and adapter_record(p, meta) is not None:
        raise ValueError(f"the glimpse module in {p} was trained with a LoRA adapter on its base model: alone, on the "
                         "stock base, it is the wrong function (upstream lost 12 points this way). Load both with "
                         f"gp.load(model_dir, module={str(p)!r}) or glimpseprune.checkpoint.load_plus(model, DIR), "
                         "or pass allow_without_adapter=True to load the module alone")
    if dims is not None:
        check_compatible(cfg, dims)
    w_file = p / WEIGHTS_NAME
    state = _read_safetensors(w_file)
    _check_tensors(state, _expected_state(cfg), w_file)
    module = build_module(cfg)
    module.load_state_dict(state)
    module = module.to(device=device, dtype=dtype).eval()
    if dtype is not None:  # e.g. a large fp32 weight is Inf in fp16
        for name, t in module.state_dict().items():
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{w_file}: tensor {name} is not finite after casting to {dtype}")
    return module


def load_plus(model, path: str | Path, *, merge: bool = True, device=None, dtype=None):
    """``(model, module)`` from a module folder, GlimpsePrune+ (module + LoRA adapter) or plain.

    The folder is checked first (files, hashes, the module against the model, the adapter's modules and shapes
    against the model); then the adapter is applied to ``model`` **in place**: merged into its weights (default;
    the model stays a plain transformers model) or, with ``merge=False``, kept as active LoRA layers. A model whose
    weights already hold this adapter (``lora.merge_and_save`` output, loaded by ``gp.load_base``) is used as it is;
    one holding another adapter is refused. A plain module folder gives ``(model, load_module(...))``."""
    from .registry import get_adapter

    p = Path(path)
    meta, cfg = _read_meta(p)
    rec = adapter_record(p, meta)
    check_compatible(cfg, get_adapter(model).dims(model))
    merged = getattr(model, MERGED_ATTR, None)
    if rec is None:
        if merged is not None:
            logger.warning("%s holds a plain glimpse module but the model's weights hold a merged LoRA adapter; the "
                           "module was not trained on this adapted model", p)
        return model, load_module(p, device=device, dtype=dtype)
    if merged is not None and merged != rec.sha256:
        raise ValueError(f"the model's weights already hold another LoRA adapter (sha256 {merged[:12]}...) than the "
                         f"one in {p} ({rec.sha256[:12]}...): load the stock base model instead")
    module = load_module(p, device=device, dtype=dtype, allow_without_adapter=True)
    if merged is None:
        from .lora import load_adapter

        load_adapter(model, p, merge=merge, expected_sha256=rec.sha256)
    return model, module


# Upstream model_type (without "_gp") -> our adapter's model_type.
_UPSTREAM_FAMILIES = {"qwen2_5_vl": "qwen2_5_vl", "llava_llama": "llava", "llava": "llava"}
CLIP_L_DEPTH = 24  # the CLIP-L/14(-336) tower of every LLaVA-1.5 release


def _upstream_vision(raw: dict, family: str, vision_depth: int | None) -> tuple[int, int]:
    """(width, depth) of the vision encoder. LLaVA releases are flat Llama configs: ``mm_hidden_size`` is the CLIP
    width and the depth is absent (default 24, CLIP-L); Qwen releases record ``vision_config.depth``.
    ``vision_depth`` overrides the recorded or default depth (a warning when it differs from a recorded one)."""
    vision = raw.get("vision_config") or {}
    if not isinstance(vision, dict):
        raise ValueError(f"vision_config must be an object, got {vision!r}")
    if family == "llava":
        width = _as_int("mm_hidden_size", raw.get("mm_hidden_size") or vision.get("hidden_size") or 1024)
        key, recorded, default = "vision_config.num_hidden_layers", vision.get("num_hidden_layers"), CLIP_L_DEPTH
    else:
        width = _as_int("vision_config.hidden_size", vision.get("hidden_size", 1280))
        key, recorded, default = "vision_config.depth", vision.get("depth"), 32
    if vision_depth is None:
        return width, _as_int(key, recorded or default)
    depth = _as_int("vision depth", vision_depth)
    if depth < 1:
        raise ValueError(f"the vision depth must be at least 1, got {depth}")
    if recorded and _as_int(key, recorded) != depth:
        logger.warning("the upstream config records %s = %s; using the vision depth %d given instead", key,
                       recorded, depth)
    return width, depth


_REQUIRED = object()


def _get(raw: dict, key: str, default: Any = _REQUIRED) -> Any:
    value = raw.get(key, default)
    if value is _REQUIRED or (value is None and default is _REQUIRED):
        raise ValueError(f"the upstream config has no {key}")
    return value


def _get_bool(raw: dict, key: str, default: bool) -> bool:
    value = _get(raw, key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")
    return value


def _get_str(raw: dict, key: str, default: str) -> str:
    value = _get(raw, key, default)
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string, got {value!r}")
    return value


def _get_ratio(raw: dict, key: str) -> float | None:
    value = raw.get(key)
    if value is None:
        return None
    r = _as_float(key, value)
    if not 0.0 < r <= 1.0:
        raise ValueError(f"{key} must be in (0, 1], got {value!r}")
    return r


# Upstream names of the VIP MLP activation (transformers' ACT2FN) -> ours; others are refused.
_UPSTREAM_ACTS = {**{a: a for a in VIP_ACTIVATIONS}, "swish": "silu"}


def _upstream_selection(raw: dict) -> dict[str, Any]:
    """The release's selection knobs (ours live in SelectionConfig, not in the module): validated, recorded in the
    module's ``extra``, and a warning when they differ from SelectionConfig's defaults. Anchors are refused."""
    threshold = _as_float("reduce_threshold", _get(raw, "reduce_threshold", 0.5))
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"reduce_threshold must be in [0, 1], got {threshold}")
    min_keep = _as_int("min_remain_num", _get(raw, "min_remain_num", 1))
    if min_keep < 0:
        raise ValueError(f"min_remain_num must be >= 0, got {min_keep}")
    sel = {"threshold": threshold, "min_keep": min_keep, "max_keep_ratio": _get_ratio(raw, "max_remain_ratio"),
           "fixed_keep_ratio": _get_ratio(raw, "fixed_remain_ratio")}
    if raw.get("anchor_positions"):
        raise ValueError(f"anchor_positions={raw['anchor_positions']!r} is not supported (always-kept corner tokens)")
    default = SelectionConfig()
    changed = {k: v for k, v in sel.items() if getattr(default, k) != v}
    if changed:
        logger.warning("the upstream release selects with %s; pass SelectionConfig(%s) to do the same", changed,
                       ", ".join(f"{k}={v!r}" for k, v in changed.items()))
    return sel


def _upstream_config(raw: dict, vision_depth: int | None = None) -> GlimpseConfig:
    """Our config for an upstream config.json. Every field that changes the module's function is read, with
    upstream's default where it is absent (``Qwen2_5_VL_GPConfig``), or refused: a value we cannot reproduce is a
    ValueError naming the field. Fields without effect at inference (dropout, flash-attention switch, the extra
    raw-attention output row, deep-supervision heads other than the last) are ignored."""
    text = raw.get("text_config") or raw
    if not isinstance(text, dict):
        raise ValueError(f"text_config must be an object, got {text!r}")
    upstream_type = str(raw.get("model_type", "qwen2_5_vl")).removesuffix("_gp")
    if upstream_type not in _UPSTREAM_FAMILIES:
        raise ValueError(f"upstream model_type {raw.get('model_type')!r} is not supported; known: "
                         f"{sorted(k + '_gp' for k in _UPSTREAM_FAMILIES)}")
    family = _UPSTREAM_FAMILIES[upstream_type]
    if _as_int("le_length", _get(raw, "le_length", 1)) != 1:
        raise ValueError(f"upstream module has le_length={raw['le_length']}; only one glimpse token is supported")
    if not _get_bool(raw, "attn_fuse_global", False):  # upstream's default: attention within ViT windows
        raise ValueError("upstream module uses windowed VIP attention (attn_fuse_global is false or absent, "
                         "upstream's default); only global attention (attn_fuse_global=true) is supported")
    fuser = _get_str(raw, "attn_fuse_type", "AttnFuserV1")
    if fuser != "AttnFuserV1":
        raise ValueError(f"upstream VIP type attn_fuse_type={fuser!r} is not supported (only AttnFuserV1)")
    act = _get_str(raw, "attn_fuse_hidden_act", "silu")
    if act not in _UPSTREAM_ACTS:
        raise ValueError(f"attn_fuse_hidden_act={act!r} is not supported; known: {sorted(_UPSTREAM_ACTS)}")
    if family != "llava":  # LLaVA's glimpse norm is always an RMSNorm (no such option upstream)
        norm = _get_str(raw, "le_norm_type", "rmsnorm")
        if norm != "rmsnorm":
            raise ValueError(f"le_norm_type={norm!r} is not supported (only rmsnorm)")
    for key in ("use_ref_masks", "use_zero_masks"):
        if _get_bool(raw, key, False):
            raise ValueError(f"{key}=true replaces the VIP by fixed masks; not supported")
    n_layers = _as_int("num_hidden_layers", _get(text, "num_hidden_layers"))
    K = _as_int("reduce_layer", _get(raw, "reduce_layer"))
    if not 0 <= K < n_layers:
        raise ValueError(f"reduce_layer={K} is outside the LLM's layers [0, {n_layers - 1}] (the module never prunes)")
    attn_layers = _as_layers("selected_layers", _get(raw, "selected_layers"))
    if not attn_layers:
        raise ValueError("selected_layers is empty: the VIP would see no glimpse attention")
    eps = text.get("rms_norm_eps", raw.get("rms_norm_eps"))
    if eps is None:  # every saved release records it; the Qwen2.5-VL and Llama value
        logger.warning("the upstream config records no rms_norm_eps; assuming 1e-6 for the glimpse norm")
        eps = 1e-6
    eps = _as_float("rms_norm_eps", eps)
    if eps <= 0:
        raise ValueError(f"rms_norm_eps must be > 0, got {eps}")
    width, depth = _upstream_vision(raw, family, vision_depth)
    fuse_size = _as_int("attn_fuse_size", _get(raw, "attn_fuse_size", 256))
    name = raw.get("_name_or_path")
    return GlimpseConfig(
        base_model_type=family, base_hidden_size=_as_int("hidden_size", _get(text, "hidden_size")),
        base_num_layers=n_layers, base_num_heads=_as_int("num_attention_heads", _get(text, "num_attention_heads")),
        base_vision_width=width, base_vision_depth=depth, prune_layer=K,
        vision_taps=_as_layers("selected_visual_layers", _get(raw, "selected_visual_layers", (8,))),
        attn_layers=attn_layers, glimpse_layers=_as_layers("le_layers", _get(raw, "le_layers", (0,))),
        vip_width=fuse_size, cond_width=_as_int("visual_cond_size", _get(raw, "visual_cond_size", 256)),
        vip_heads=_as_int("attn_fuse_num_heads", _get(raw, "attn_fuse_num_heads", 4)), vip_mlp_width=2 * fuse_size,
        attn_score="logits" if _get_bool(raw, "use_attention_logits", False) else "log_softmax",
        glimpse_norm_eps=eps, vip_act=_UPSTREAM_ACTS[act],
        base_model_name=name if isinstance(name, str) and name else None,
        extra={"converted_from": "upstream new_modules_gp.pt", "upstream_selection": _upstream_selection(raw)},
    )


def _read_upstream_weights(path: Path) -> dict:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError (also: a forbidden global), RuntimeError (bad zip), EOFError, ...
        raise ValueError(f"{path}: cannot read the upstream weights ({type(e).__name__}: {e})") from e
    if not isinstance(blob, dict):
        raise ValueError(f"{path}: expected a dict of the upstream modules, got a {type(blob).__name__}")
    missing_keys = {"attn_fuser", "learnable_embeddings", "le_proj", "le_norm"} - set(blob)
    if missing_keys:
        raise ValueError(f"{path} lacks the upstream keys {sorted(missing_keys)}")
    unknown = sorted(str(k) for k in set(blob) - {"attn_fuser", "learnable_embeddings", "le_proj", "le_norm"})
    if unknown:  # a part the conversion would drop: the module would compute without it
        raise ValueError(f"{path} holds parts this conversion does not know: {unknown} (an upstream release saves "
                         "attn_fuser, learnable_embeddings, le_proj and le_norm only)")
    for part in ("attn_fuser", "le_proj", "le_norm"):
        if not isinstance(blob[part], dict) or not all(isinstance(k, str) for k in blob[part]):
            kind = type(blob[part]).__name__
            raise ValueError(f"{path}: {part} must be a state dict (names -> tensors), got a {kind}")
    return blob


def _upstream_state(blob: dict, n_vip_layers: int) -> tuple[dict[str, Any], dict[str, str]]:
    """Our state dict from the upstream blob, and for each of our keys the upstream name it came from."""
    state: dict[str, Any] = {"glimpse_embeddings": blob["learnable_embeddings"]}
    names = {"glimpse_embeddings": "learnable_embeddings"}
    for part, ours in (("le_proj", "glimpse_proj"), ("le_norm", "glimpse_norm")):
        for k, v in blob[part].items():
            state[f"{ours}.{k}"], names[f"{ours}.{k}"] = v, f"{part}.{k}"
    last_head = f"attn_out_projs.{n_vip_layers - 1}."
    for k, v in blob["attn_fuser"].items():
        key = k
        if k.startswith("attn_out_projs."):
            if not k.startswith(last_head):
                logger.warning("dropping deep-supervision head %s (only the last head decides)", k)
                continue
            key = "out_proj." + k[len(last_head):]
        if f"vip.{key}" in state:  # e.g. both out_proj.* and the last attn_out_projs.*: which one decides?
            raise ValueError(f"attn_fuser.{k} and {names[f'vip.{key}']} both give vip.{key}: the release is "
                             "ambiguous")
        state[f"vip.{key}"], names[f"vip.{key}"] = v, f"attn_fuser.{k}"
    return state, names


def convert_upstream(src: str | Path, out_dir: str | Path, vision_depth: int | None = None) -> Path:
    """Convert an upstream GlimpsePrune release directory (Qwen2.5-VL or LLaVA-1.5) to our checkpoint format.

    The key names and shapes are the same for both families (LLaVA: ``attn_in_proj`` [256, heads], conditions of
    CLIP width 1024); LLaVA vision taps index CLIP's hidden states as upstream does, so they carry over unchanged.
    ``vision_depth`` overrides the encoder depth; without it, the recorded one is used (Qwen: ``vision_config.depth``)
    or, where the config does not record it (LLaVA), CLIP-L's 24 blocks.
    Fields are read or refused as ``_upstream_config`` says; a file that is not valid JSON, a weights file that
    cannot be unpickled (``weights_only``) or is not the upstream dict, and tensors of the wrong shape, dtype or
    with NaN / Inf raise ValueError naming the file and the field or key. Nothing is written unless all is valid.
    """
    s = Path(src)
    cfg_file, w_file = s / "config.json", s / UPSTREAM_WEIGHTS
    for f in (cfg_file, w_file):
        if not f.is_file():
            raise FileNotFoundError(f"upstream module file missing: {f}")
    raw = read_json(cfg_file)
    if not isinstance(raw, dict):
        raise ValueError(f"{cfg_file}: expected a JSON object, got {type(raw).__name__}")
    try:
        cfg = _upstream_config(raw, vision_depth)
    except ValueError as e:
        raise ValueError(f"{cfg_file}: {e}") from e
    try:
        state, names = _upstream_state(_read_upstream_weights(w_file), cfg.n_vip_layers)
    except ValueError as e:
        raise ValueError(e.args[0] if str(w_file) in str(e) else f"{w_file}: {e}") from None
    _check_tensors(state, _expected_state(cfg), w_file, names)
    module = GlimpseModule(cfg)
    module.load_state_dict(state)
    return save_module(module, out_dir)
