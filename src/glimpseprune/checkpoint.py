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
from .config import FAMILY_DEFAULTS, GlimpseConfig, default_prune_layer, default_vision_taps
from .modules.glimpse import GlimpseModule

logger = logging.getLogger(__name__)

CONFIG_NAME = "glimpse_config.json"
WEIGHTS_NAME = "glimpse_module.safetensors"
UPSTREAM_WEIGHTS = "new_modules_gp.pt"


def library_version() -> str:
    from . import __version__

    return __version__


def config_for_model(dims: ModelDims, base_model_name: str | None = None, **overrides: Any) -> GlimpseConfig:
    """A GlimpseConfig sized for a model: K = ceil(2L/3) - 1, four evenly spaced encoder taps and the family's
    defaults (``config.FAMILY_DEFAULTS``, e.g. log-softmax scores for LLaVA), unless overridden."""
    fields = dict(
        base_model_type=dims.model_type, base_hidden_size=dims.hidden_size, base_num_layers=dims.num_layers,
        base_num_heads=dims.num_heads, base_vision_width=dims.vision_width, base_vision_depth=dims.vision_depth,
        prune_layer=default_prune_layer(dims.num_layers), vision_taps=default_vision_taps(dims.vision_depth),
        base_model_name=base_model_name, **FAMILY_DEFAULTS.get(dims.model_type, {}),
    )
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


def load_module(path: str | Path, dims: ModelDims | None = None, device=None, dtype=None) -> GlimpseModule:
    """Load a module saved by ``save_module``; with ``dims``, check it belongs to that base model."""
    p = Path(path)
    cfg_file, w_file = p / CONFIG_NAME, p / WEIGHTS_NAME
    if not cfg_file.is_file() or not w_file.is_file():
        hint = ""
        if (p / UPSTREAM_WEIGHTS).is_file():
            hint = " (an upstream release? convert it with `glimpseprune convert`)"
        raise FileNotFoundError(f"no glimpse module at {p}: expected {CONFIG_NAME} and {WEIGHTS_NAME}{hint}")
    cfg = GlimpseConfig.from_dict(json.loads(cfg_file.read_text())["glimpse"])
    if dims is not None:
        check_compatible(cfg, dims)
    module = GlimpseModule(cfg)
    missing, unexpected = module.load_state_dict(load_file(str(w_file)), strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {w_file} does not fit its config: missing {missing}, unexpected {unexpected}")
    return module.to(device=device, dtype=dtype).eval()


# Upstream model_type (without "_gp") -> our adapter's model_type.
_UPSTREAM_FAMILIES = {"qwen2_5_vl": "qwen2_5_vl", "llava_llama": "llava", "llava": "llava"}
CLIP_L_DEPTH = 24  # the CLIP-L/14(-336) tower of every LLaVA-1.5 release


def _upstream_vision(raw: dict, family: str, vision_depth: int | None) -> tuple[int, int]:
    """(width, depth) of the vision encoder; ``vision_depth`` fills a depth the config does not record. LLaVA releases
    are flat Llama configs: ``mm_hidden_size`` is the CLIP width, the depth is absent (default 24, CLIP-L)."""
    vision = raw.get("vision_config") or {}
    if family == "llava":
        width = raw.get("mm_hidden_size") or vision.get("hidden_size") or 1024
        depth = vision.get("num_hidden_layers") or vision_depth or CLIP_L_DEPTH
        return int(width), int(depth)
    return int(vision.get("hidden_size", 1280)), int(vision.get("depth") or vision_depth or 32)


def _upstream_config(raw: dict, vision_depth: int | None = None) -> GlimpseConfig:
    text = raw.get("text_config") or raw
    if int(raw.get("le_length", 1)) != 1:
        raise ValueError(f"upstream module has le_length={raw['le_length']}; only one glimpse token is supported")
    if not raw.get("attn_fuse_global", True):
        raise ValueError("upstream module uses windowed VIP attention (attn_fuse_global=false); not supported")
    if raw.get("attn_fuse_type", "AttnFuserV1") != "AttnFuserV1":
        raise ValueError(f"upstream VIP type {raw.get('attn_fuse_type')!r} is not supported (only AttnFuserV1)")
    upstream_type = str(raw.get("model_type", "qwen2_5_vl")).removesuffix("_gp")
    if upstream_type not in _UPSTREAM_FAMILIES:
        raise ValueError(f"upstream model_type {raw.get('model_type')!r} is not supported; known: "
                         f"{sorted(k + '_gp' for k in _UPSTREAM_FAMILIES)}")
    family = _UPSTREAM_FAMILIES[upstream_type]
    width, depth = _upstream_vision(raw, family, vision_depth)
    return GlimpseConfig(
        base_model_type=family, base_hidden_size=text["hidden_size"], base_num_layers=text["num_hidden_layers"],
        base_num_heads=text["num_attention_heads"], base_vision_width=width,
        base_vision_depth=depth, prune_layer=raw["reduce_layer"],
        vision_taps=tuple(raw["selected_visual_layers"]), attn_layers=tuple(raw["selected_layers"]),
        glimpse_layers=tuple(raw["le_layers"]), vip_width=raw.get("attn_fuse_size", 256),
        cond_width=raw.get("visual_cond_size", 256), vip_heads=raw.get("attn_fuse_num_heads", 4),
        vip_mlp_width=2 * raw.get("attn_fuse_size", 256),
        attn_score="logits" if raw.get("use_attention_logits", False) else "log_softmax",
        base_model_name=raw.get("_name_or_path") or None,
        extra={"converted_from": "upstream new_modules_gp.pt"},
    )


def _upstream_state(blob: dict, n_vip_layers: int) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {"glimpse_embeddings": blob["learnable_embeddings"]}
    for part, ours in (("le_proj", "glimpse_proj"), ("le_norm", "glimpse_norm")):
        state.update({f"{ours}.{k}": v for k, v in blob[part].items()})
    last_head = f"attn_out_projs.{n_vip_layers - 1}."
    for k, v in blob["attn_fuser"].items():
        if k.startswith("attn_out_projs."):
            if not k.startswith(last_head):
                logger.warning("dropping deep-supervision head %s (only the last head decides)", k)
                continue
            k = "out_proj." + k[len(last_head):]
        state[f"vip.{k}"] = v
    return state


def convert_upstream(src: str | Path, out_dir: str | Path, vision_depth: int | None = None) -> Path:
    """Convert an upstream GlimpsePrune release directory (Qwen2.5-VL or LLaVA-1.5) to our checkpoint format.

    The key names and shapes are the same for both families (LLaVA: ``attn_in_proj`` [256, heads], conditions of
    CLIP width 1024); LLaVA vision taps index CLIP's hidden states as upstream does, so they carry over unchanged.
    ``vision_depth`` gives the encoder depth where the upstream config does not record it (LLaVA; default 24).
    """
    s = Path(src)
    cfg_file, w_file = s / "config.json", s / UPSTREAM_WEIGHTS
    for f in (cfg_file, w_file):
        if not f.is_file():
            raise FileNotFoundError(f"upstream module file missing: {f}")
    cfg = _upstream_config(json.loads(cfg_file.read_text()), vision_depth)
    blob = torch.load(w_file, map_location="cpu", weights_only=True)
    missing_keys = {"attn_fuser", "learnable_embeddings", "le_proj", "le_norm"} - set(blob)
    if missing_keys:
        raise ValueError(f"{w_file} lacks the upstream keys {sorted(missing_keys)}")
    module = GlimpseModule(cfg)
    missing, unexpected = module.load_state_dict(_upstream_state(blob, cfg.n_vip_layers), strict=False)
    if missing or unexpected:
        raise ValueError(f"{w_file} does not match its config: missing {missing}, unexpected {unexpected}")
    return save_module(module, out_dir)
