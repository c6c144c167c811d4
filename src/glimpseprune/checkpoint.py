"""GlimpsePrune module checkpoints: ``glimpse_config.json`` + ``glimpse_module.safetensors`` (no pickles), recording
the base model and library versions; plus the converter from the upstream release layout
(``config.json`` + ``new_modules_gp.pt``), the only place a pickle is read (``torch.load(weights_only=True)``)."""

from __future__ import annotations

import json
import logging
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
from .modules.glimpse import GlimpseModule

logger = logging.getLogger(__name__)

CONFIG_NAME = "glimpse_config.json"
WEIGHTS_NAME = "glimpse_module.safetensors"
UPSTREAM_WEIGHTS = "new_modules_gp.pt"


def library_version() -> str:
    from . import __version__

    return __version__


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


def save_module(module: GlimpseModule, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"glimpse": module.cfg.to_dict(), "library_version": library_version(),
            "transformers_version": transformers.__version__, "torch_version": torch.__version__}
    (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt", "library": "glimpseprune"})
    return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


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
        return GlimpseModule(cfg).state_dict()


def load_module(path: str | Path, dims: ModelDims | None = None, device=None, dtype=None) -> GlimpseModule:
    """Load a module saved by ``save_module``; with ``dims``, check it belongs to that base model.

    Everything is validated before use: invalid JSON or config fields, an unreadable or truncated weights file,
    missing / unexpected / misshapen / non-floating tensors and NaN or Inf values (also after casting to ``dtype``)
    raise ValueError naming the file and the field or tensor."""
    p = Path(path)
    cfg_file, w_file = p / CONFIG_NAME, p / WEIGHTS_NAME
    if not cfg_file.is_file() or not w_file.is_file():
        hint = ""
        if (p / UPSTREAM_WEIGHTS).is_file():
            hint = " (an upstream release? convert it with `glimpseprune convert`)"
        raise FileNotFoundError(f"no glimpse module at {p}: expected {CONFIG_NAME} and {WEIGHTS_NAME}{hint}")
    meta = _read_json(cfg_file)
    if not isinstance(meta, dict) or not isinstance(meta.get("glimpse"), dict):
        raise ValueError(f"{cfg_file}: expected a JSON object with a 'glimpse' object (written by save_module)")
    try:
        cfg = GlimpseConfig.from_dict(meta["glimpse"])
    except ValueError as e:
        raise ValueError(f"{cfg_file}: {e}") from e
    if dims is not None:
        check_compatible(cfg, dims)
    state = _read_safetensors(w_file)
    _check_tensors(state, _expected_state(cfg), w_file)
    module = GlimpseModule(cfg)
    module.load_state_dict(state)
    module = module.to(device=device, dtype=dtype).eval()
    if dtype is not None:  # e.g. a large fp32 weight is Inf in fp16
        for name, t in module.state_dict().items():
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{w_file}: tensor {name} is not finite after casting to {dtype}")
    return module


# Upstream model_type (without "_gp") -> our adapter's model_type.
_UPSTREAM_FAMILIES = {"qwen2_5_vl": "qwen2_5_vl", "llava_llama": "llava", "llava": "llava"}
CLIP_L_DEPTH = 24  # the CLIP-L/14(-336) tower of every LLaVA-1.5 release


def _upstream_vision(raw: dict, family: str, vision_depth: int | None) -> tuple[int, int]:
    """(width, depth) of the vision encoder; ``vision_depth`` fills a depth the config does not record. LLaVA releases
    are flat Llama configs: ``mm_hidden_size`` is the CLIP width, the depth is absent (default 24, CLIP-L)."""
    vision = raw.get("vision_config") or {}
    if not isinstance(vision, dict):
        raise ValueError(f"vision_config must be an object, got {vision!r}")
    if family == "llava":
        width = raw.get("mm_hidden_size") or vision.get("hidden_size") or 1024
        depth = vision.get("num_hidden_layers") or vision_depth or CLIP_L_DEPTH
        return _as_int("mm_hidden_size", width), _as_int("vision depth", depth)
    width = vision.get("hidden_size", 1280)
    return _as_int("vision_config.hidden_size", width), _as_int("vision_config.depth",
                                                                 vision.get("depth") or vision_depth or 32)


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
        state[f"vip.{key}"], names[f"vip.{key}"] = v, f"attn_fuser.{k}"
    return state, names


def convert_upstream(src: str | Path, out_dir: str | Path, vision_depth: int | None = None) -> Path:
    """Convert an upstream GlimpsePrune release directory (Qwen2.5-VL or LLaVA-1.5) to our checkpoint format.

    The key names and shapes are the same for both families (LLaVA: ``attn_in_proj`` [256, heads], conditions of
    CLIP width 1024); LLaVA vision taps index CLIP's hidden states as upstream does, so they carry over unchanged.
    ``vision_depth`` gives the encoder depth where the upstream config does not record it (LLaVA; default 24).
    Fields are read or refused as ``_upstream_config`` says; a file that is not valid JSON, a weights file that
    cannot be unpickled (``weights_only``) or is not the upstream dict, and tensors of the wrong shape, dtype or
    with NaN / Inf raise ValueError naming the file and the field or key. Nothing is written unless all is valid.
    """
    s = Path(src)
    cfg_file, w_file = s / "config.json", s / UPSTREAM_WEIGHTS
    for f in (cfg_file, w_file):
        if not f.is_file():
            raise FileNotFoundError(f"upstream module file missing: {f}")
    raw = _read_json(cfg_file)
    if not isinstance(raw, dict):
        raise ValueError(f"{cfg_file}: expected a JSON object, got {type(raw).__name__}")
    try:
        cfg = _upstream_config(raw, vision_depth)
    except ValueError as e:
        raise ValueError(f"{cfg_file}: {e}") from e
    state, names = _upstream_state(_read_upstream_weights(w_file), cfg.n_vip_layers)
    _check_tensors(state, _expected_state(cfg), w_file, names)
    module = GlimpseModule(cfg)
    module.load_state_dict(state)
    return save_module(module, out_dir)
