"""Typed, validated configuration: token selection (budget knobs) and the GlimpsePrune module architecture.

Pruning knobs live here, never in the HF model config. Every dataclass validates itself in ``__post_init__`` and
round-trips through JSON (``to_dict`` / ``from_dict``) with a format version.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

CONFIG_VERSION = 1


def _check_real(name: str, value: Any) -> None:
    """A real number (int or float; not a bool or a string), else ``TypeError`` (NaN fails the range checks)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")


def _check_ratio(name: str, value: float | None) -> None:
    if value is None:
        return
    _check_real(name, value)
    if not (0.0 < float(value) <= 1.0):
        raise ValueError(f"{name} must be in (0, 1], got {value}")


@dataclass(frozen=True)
class SelectionConfig:
    """How a per-token importance score becomes a keep mask (one sample at a time, joint over its images).

    threshold: keep a token when its probability is > threshold (in [0, 1]).
    max_keep_ratio: optional cap; keep at most floor(ratio * n_vis) tokens (top-k by probability).
    min_keep: floor; at least this many tokens are kept per sample (if it has that many).
    fixed_keep_ratio: matched-budget mode; keep exactly max(min_keep, floor(ratio * n_vis)) tokens, top-k,
        ignoring the threshold (a cap beside it is refused: it would be ignored).
    """

    threshold: float = 0.5
    max_keep_ratio: float | None = None
    min_keep: int = 1
    fixed_keep_ratio: float | None = None

    def __post_init__(self) -> None:
        _check_real("threshold", self.threshold)
        if not (0.0 <= float(self.threshold) <= 1.0):
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        _check_ratio("max_keep_ratio", self.max_keep_ratio)
        _check_ratio("fixed_keep_ratio", self.fixed_keep_ratio)
        if isinstance(self.min_keep, bool) or not isinstance(self.min_keep, numbers.Integral):
            raise TypeError(f"min_keep must be a whole number of tokens, got {type(self.min_keep).__name__} "
                            f"{self.min_keep!r}")
        if int(self.min_keep) < 0:
            raise ValueError(f"min_keep must be >= 0, got {self.min_keep}")
        if self.fixed_keep_ratio is not None and self.max_keep_ratio is not None:
            raise ValueError(f"fixed_keep_ratio {self.fixed_keep_ratio} keeps exactly that share, so max_keep_ratio "
                             f"{self.max_keep_ratio} would be ignored: pass one of them")


MODULE_KINDS = ("glimpse", "early")  # GlimpseConfig.kind: which module class a config builds


def default_prune_layer(n_layers: int) -> int:
    """K = ceil(2L/3) - 1: gives the released values 18/28, 23/36 (Qwen2.5-VL 7B/3B) and 21/32, 26/40 (LLaVA)."""
    return math.ceil(2 * n_layers / 3) - 1


def default_vision_taps(vit_depth: int) -> tuple[int, ...]:
    """Four evenly spaced encoder blocks from the last: 31/23/15/7 for depth 32, 23/17/11/5 for depth 24."""
    step = max(vit_depth // 4, 1)
    return tuple(i for i in (vit_depth - 1 - k * step for k in range(4)) if i >= 0)


# VIP MLP activations (upstream ``attn_fuse_hidden_act``, transformers' ACT2FN names); ``modules.vip`` implements them.
VIP_ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "relu")


def _as_int(name: str, value: Any) -> int:
    """An integer from an int, an integral float or a decimal string; anything else (bools included) is an error
    naming the field."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    else:
        try:
            return operator.index(value)  # int, numpy / torch integer scalars
        except TypeError:
            pass
    raise ValueError(f"{name} must be an integer, got {value!r}")


def _as_float(name: str, value: Any) -> float:
    """A finite float from a number or a numeric string (e.g. ``"1e-6"``); else an error naming the field."""
    f = None
    if isinstance(value, str):
        try:
            f = float(value.strip())
        except ValueError:
            pass
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        f = float(value)
    if f is None:
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(f):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return f


def _as_layers(name: str, values: Any) -> tuple[int, ...]:
    if isinstance(values, (str, bytes, dict)) or not isinstance(values, Iterable):
        raise ValueError(f"{name} must be a list of layer indices, got {values!r}")
    return tuple(_as_int(f"{name}[{i}]", v) for i, v in enumerate(values))


@dataclass(frozen=True)
class GlimpseConfig:
    """Architecture of a GlimpsePrune module, and the base model it was built for.

    The base-model fields (``base_*``) are recorded so that loading a module onto another model fails clearly.
    Every field is validated on construction (also from JSON): a wrong type or value is a ValueError naming the
    field. Numbers written as strings (hand-edited JSON, YAML's ``1e-6``) are accepted and converted: integer fields
    take ints, integral floats and decimal strings ("18"); float fields take numbers and numeric strings ("1e-6")
    and must be finite. Booleans are never numbers here. Epsilons and ``rope_theta`` must be > 0.

    ``glimpse_norm_eps``: epsilon of the glimpse token's RMSNorm; upstream uses the base model's ``rms_norm_eps``
    there (the VIP's norms keep ``rms_eps``). None (module files written before the field) means ``rms_eps``.
    ``vip_act``: the activation of the VIP's gated MLP (upstream ``attn_fuse_hidden_act``), one of
    ``VIP_ACTIVATIONS``.
    """

    base_model_type: str
    base_hidden_size: int
    base_num_layers: int
    base_num_heads: int
    base_vision_width: int
    base_vision_depth: int
    prune_layer: int
    vision_taps: tuple[int, ...]  # the adapter says what they index (Qwen: blocks; LLaVA: hidden_states)
    attn_layers: tuple[int, ...] = ()  # LLM layers feeding the VIP, columns in this order; default (prune_layer,)
    glimpse_layers: tuple[int, ...] = ()  # layers that get a glimpse vector; default: all layers
    vip_width: int = 256
    cond_width: int = 512
    vip_heads: int = 4
    vip_mlp_width: int = 512
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0
    attn_score: str = "logits"  # "logits": raw scaled q.k (Qwen releases); "log_softmax": over all keys (LLaVA)
    base_model_name: str | None = None
    version: int = CONFIG_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    glimpse_norm_eps: float | None = None  # the glimpse token's RMSNorm; None: rms_eps
    vip_act: str = "silu"
    # "glimpse": the GlimpsePrune module (glimpse token + VIP at layer K); "early": ``EarlyGlimpseModule``, which
    # scores visual tokens before the LLM (prune_layer -1; no glimpse or attention layers). Absent in older files.
    kind: str = "glimpse"

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        positive = ("base_hidden_size", "base_num_layers", "base_num_heads", "base_vision_width", "base_vision_depth",
                    "vip_width", "cond_width", "vip_heads", "vip_mlp_width")
        for name in positive:
            value = getattr(self, name)
            try:
                n = _as_int(name, value)
            except ValueError:
                n = 0
            if n <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
            set_(self, name, n)
        set_(self, "prune_layer", _as_int("prune_layer", self.prune_layer))
        set_(self, "version", _as_int("version", self.version))
        for name in ("rms_eps", "rope_theta", "glimpse_norm_eps"):
            value = getattr(self, name)
            if value is None and name == "glimpse_norm_eps":
                continue
            f = _as_float(name, value)
            if f <= 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
            set_(self, name, f)
        if not isinstance(self.base_model_type, str) or not self.base_model_type:
            raise ValueError(f"base_model_type must be a non-empty string, got {self.base_model_type!r}")
        if self.base_model_name is not None and not isinstance(self.base_model_name, str):
            raise ValueError(f"base_model_name must be a string or null, got {self.base_model_name!r}")
        if not isinstance(self.extra, dict):
            raise ValueError(f"extra must be a mapping, got {self.extra!r}")
        if self.vip_act not in VIP_ACTIVATIONS:
            raise ValueError(f"vip_act must be one of {list(VIP_ACTIVATIONS)}, got {self.vip_act!r}")
        set_(self, "vision_taps", _as_layers("vision_taps", self.vision_taps))
        if self.kind not in MODULE_KINDS:
            raise ValueError(f"kind must be one of {list(MODULE_KINDS)}, got {self.kind!r}")
        if self.kind == "early":
            self._check_early()
        else:
            self._check_glimpse()
        self._check_vip()

    def _check_early(self) -> None:
        """An early module decides before the LLM: no LLM layer feeds it or gets a glimpse vector. ``prune_layer`` is
        where its picks leave the sequence: -1 before the LLM (what a server can run), K >= 0 after LLM layer K (the
        layers up to K still read every token)."""
        L = self.base_num_layers
        if not (-1 <= self.prune_layer < L):
            raise ValueError(f"an early module (kind 'early') drops its tokens before the LLM (prune_layer -1) or "
                             f"after an LLM layer in [0, {L - 1}]; got prune_layer {self.prune_layer}")
        for name in ("attn_layers", "glimpse_layers"):
            if _as_layers(name, getattr(self, name)):
                raise ValueError(f"an early module (kind 'early') reads no LLM layer: {name} must be empty")
            object.__setattr__(self, name, ())

    def _check_glimpse(self) -> None:
        set_ = object.__setattr__
        set_(self, "attn_layers", _as_layers("attn_layers", self.attn_layers) or (self.prune_layer,))
        glimpse_layers = _as_layers("glimpse_layers", self.glimpse_layers)
        set_(self, "glimpse_layers", glimpse_layers or tuple(range(self.base_num_layers)))
        L = self.base_num_layers
        for name in ("vision_taps", "attn_layers", "glimpse_layers"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ValueError(f"{name} lists a layer twice: {list(values)}")
        if not (0 <= self.prune_layer < L):
            raise ValueError(f"prune_layer must be in [0, {L - 1}] for a {L}-layer LLM, got {self.prune_layer}")
        for i in self.attn_layers:
            if not (0 <= i <= self.prune_layer):
                raise ValueError(f"attention layer {i} must be in [0, prune_layer={self.prune_layer}]")
        for i in self.glimpse_layers:
            if not (0 <= i < L):
                raise ValueError(f"glimpse layer {i} outside the LLM's layers [0, {L - 1}]")
        if 0 not in self.glimpse_layers:
            raise ValueError("glimpse_layers must include layer 0 (the glimpse token's input embedding)")
        if self.attn_score not in ("logits", "log_softmax"):
            raise ValueError(f"attn_score must be 'logits' or 'log_softmax', got {self.attn_score!r}")

    def _check_vip(self) -> None:
        if not self.vision_taps:
            raise ValueError("vision_taps must name at least one vision-encoder block")
        if len(set(self.vision_taps)) != len(self.vision_taps):
            raise ValueError(f"vision_taps lists a layer twice: {list(self.vision_taps)}")
        for i in self.vision_taps:
            if not (0 <= i < self.base_vision_depth):
                raise ValueError(f"vision tap {i} outside the encoder's blocks [0, {self.base_vision_depth - 1}]")
        qk = self.vip_width + self.cond_width
        if qk % self.vip_heads or (qk // self.vip_heads) % 4 or self.vip_width % self.vip_heads:
            raise ValueError(
                f"vip_width + cond_width ({qk}) and vip_width ({self.vip_width}) must split into {self.vip_heads} "
                "heads, with a query head size divisible by 4 (2D RoPE)"
            )

    @property
    def glimpse_eps(self) -> float:
        """The epsilon the glimpse token's RMSNorm uses."""
        return self.rms_eps if self.glimpse_norm_eps is None else self.glimpse_norm_eps

    @property
    def n_vip_layers(self) -> int:
        return len(self.vision_taps)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("vision_taps", "attn_layers", "glimpse_layers"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GlimpseConfig:
        """From ``to_dict``'s JSON; a missing, unknown or invalid field is a ValueError naming it."""
        if not isinstance(d, dict):
            raise ValueError(f"a GlimpseConfig must be a JSON object, got {type(d).__name__}")
        fields = dataclasses.fields(cls)
        unknown = set(d) - {f.name for f in fields}
        if unknown:
            raise ValueError(f"unknown GlimpseConfig fields: {sorted(unknown, key=str)}")
        missing = [f.name for f in fields if f.name not in d and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ValueError(f"missing GlimpseConfig fields: {missing}")
        if _as_int("version", d.get("version", CONFIG_VERSION)) > CONFIG_VERSION:
            raise ValueError(f"module config version {d['version']} is newer than this library ({CONFIG_VERSION})")
        return cls(**d)


# Named presets: the released settings (reference §3.1). Base sizes are checked against the model at load time.
PRESETS: dict[str, dict[str, Any]] = {
    "qwen2_5_vl_7b": dict(
        base_model_type="qwen2_5_vl", base_hidden_size=3584, base_num_layers=28, base_num_heads=28,
        base_vision_width=1280, base_vision_depth=32, prune_layer=18, vision_taps=(31, 23, 15, 7),
        vip_width=256, cond_width=512, vip_heads=4, vip_mlp_width=512,
        base_model_name="Qwen/Qwen2.5-VL-7B-Instruct",
    ),
    "qwen2_5_vl_3b": dict(
        base_model_type="qwen2_5_vl", base_hidden_size=2048, base_num_layers=36, base_num_heads=16,
        base_vision_width=1280, base_vision_depth=32, prune_layer=23, vision_taps=(31, 23, 15, 7),
        vip_width=256, cond_width=512, vip_heads=4, vip_mlp_width=512,
        base_model_name="Qwen/Qwen2.5-VL-3B-Instruct",
    ),
    # LLaVA-1.5 (CLIP-L/14-336: width 1024, 24 blocks, 24 x 24 tokens). Vision taps index CLIP's hidden_states as
    # upstream (hidden_states[0] = embeddings; 23 = hidden_states[-2], the projected feature); attention scores are
    # log-softmax over all keys (upstream use_attention_logits=false).
    "llava_1_5_7b": dict(
        base_model_type="llava", base_hidden_size=4096, base_num_layers=32, base_num_heads=32,
        base_vision_width=1024, base_vision_depth=24, prune_layer=21, vision_taps=(23, 17, 11, 5),
        vip_width=256, cond_width=512, vip_heads=4, vip_mlp_width=512, attn_score="log_softmax",
        base_model_name="llava-hf/llava-1.5-7b-hf",
    ),
    "llava_1_5_13b": dict(
        base_model_type="llava", base_hidden_size=5120, base_num_layers=40, base_num_heads=40,
        base_vision_width=1024, base_vision_depth=24, prune_layer=26, vision_taps=(23, 17, 11, 5),
        vip_width=256, cond_width=512, vip_heads=4, vip_mlp_width=512, attn_score="log_softmax",
        base_model_name="llava-hf/llava-1.5-13b-hf",
    ),
    # Qwen3-VL (no released GlimpsePrune module): the released rule by analogy -- K = ceil(2L/3) - 1, four evenly spaced
    # ViT blocks from the last (2x2-merge means; Qwen3-VL has no full/window split), VIP 4 blocks x 256, conditions
    # 512, 4 heads. Sizes (text hidden / layers / heads, ViT width / depth) written from memory of the public
    # config.json files, not read from them (no network here): check them against the checkpoint.
    "qwen3_vl_8b": dict(
        base_model_type="qwen3_vl", base_hidden_size=4096, base_num_layers=36, base_num_heads=32,
        base_vision_width=1152, base_vision_depth=27, prune_layer=23, vision_taps=(26, 20, 14, 8),
        vip_width=256, cond_width=512, vip_heads=4, vip_mlp_width=512,
        base_model_name="Qwen/Qwen3-VL-8B-Instruct",
    ),
    "qwen3_vl_4b": dict(
        base_model_type="qwen3_vl", base_hidden_size=2560, base_num_layers=36, base_num_heads=32,
        base_vision_width=1024, base_vision_depth=24, prune_layer=23, vision_taps=(23, 17, 11, 5),
        vip_width=256, cond_width=512, vip_heads=4, vip_mlp_width=512,
        base_model_name="Qwen/Qwen3-VL-4B-Instruct",
    ),
    "qwen3_vl_2b": dict(
        base_model_type="qwen3_vl", base_hidden_size=2048, base_num_layers=28, base_num_heads=16,
        base_vision_width=1024, base_vision_depth=24, prune_layer=18, vision_taps=(23, 17, 11, 5),
        vip_width=256, cond_width=512, vip_heads=4, vip_mlp_width=512,
        base_model_name="Qwen/Qwen3-VL-2B-Instruct",
    ),
}

# Per-family defaults of a module sized for a model (``checkpoint.config_for_model``), as the releases use them.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llava": dict(attn_score="log_softmax"),
}


def preset(name: str, **overrides: Any) -> GlimpseConfig:
    """A named preset, e.g. ``preset("qwen2_5_vl_7b")``; keyword overrides replace single fields."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    return GlimpseConfig(**{**PRESETS[name], **overrides})
