"""Model shapes for FLOPs accounting and efficiency runs: the sizes of a Qwen2.5-VL- or Qwen3-VL-style model
(``ModelShape.model_type``), no weights.

A ``ModelShape`` is built from plain numbers, from a transformers ``Qwen2_5_VLConfig`` / ``Qwen3VLConfig``
(``ModelShape.from_hf``) or from a JSON file (``load_shape("qwen2_5_vl_7b")`` looks in ``configs/shapes/``).
``to_hf_config`` turns it back into a transformers config so that a random-initialised model of that shape can be
timed (timing and memory do not depend on the weights).

Qwen3-VL differs in the ViT only, as far as these counts go: no window attention (``fullatt_blocks`` lists every
block), a two-matrix GELU MLP (``gated_mlp=False``) and one extra patch merger per DeepStack block
(``deepstack_blocks``). Its LLM-side DeepStack additions and q/k norms are elementwise, not matrix products.

Example::

    shape = ModelShape(name="toy", text=TextShape(512, 8, 8, 2, 2752, 32768), vision=VisionShape(8, 256, 4, 688, 512))
    shape.text.head_dim  # 64
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import GlimpseConfig, default_prune_layer, default_vision_taps
from ..outputs import read_json

# Token ids of the released Qwen2.5-VL vocabulary (used when the vocabulary is large enough to hold them).
QWEN_IDS = {"pad": 151643, "eos": 151645, "vision_start": 151652, "vision_end": 151653, "image": 151655,
            "video": 151656}
SHAPES_DIR = Path("configs") / "shapes"


def _positive(obj: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{type(obj).__name__}.{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class TextShape:
    """Decoder sizes. head_dim defaults to hidden_size // num_heads; K/V width is num_kv_heads * head_dim (GQA)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    head_dim: int | None = None

    def __post_init__(self) -> None:
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // max(self.num_heads, 1))
        _positive(self, ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                         "vocab_size", "head_dim"))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    @property
    def q_width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim


@dataclass(frozen=True)
class VisionShape:
    """ViT sizes: window attention except in ``fullatt_blocks``; a 2x2 patch merger to out_hidden_size. Qwen2.5-VL:
    SwiGLU MLP (``gated_mlp``); Qwen3-VL: every block full, fc1/fc2 MLP, a merger per ``deepstack_blocks`` entry."""

    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    out_hidden_size: int
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112  # pixels; window = window_size // patch_size // merge merged tokens per side
    fullatt_blocks: tuple[int, ...] = (7, 15, 23, 31)
    in_channels: int = 3
    gated_mlp: bool = True  # SwiGLU (gate, up, down); False: fc1 -> act -> fc2
    deepstack_blocks: tuple[int, ...] = ()  # Qwen3-VL: blocks whose output gets its own merger (DeepStack)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fullatt_blocks", tuple(int(i) for i in self.fullatt_blocks))
        object.__setattr__(self, "deepstack_blocks", tuple(int(i) for i in self.deepstack_blocks))
        _positive(self, ("depth", "hidden_size", "num_heads", "intermediate_size", "out_hidden_size", "patch_size",
                         "temporal_patch_size", "spatial_merge_size", "window_size", "in_channels"))
        bad = [i for i in self.fullatt_blocks + self.deepstack_blocks if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"full-attention / DeepStack blocks {bad} outside the ViT's blocks [0, {self.depth - 1}]")

    @property
    def window_tokens(self) -> int:
        """Merged tokens per window side (4 for Qwen2.5-VL: 112 px / 14 px / 2)."""
        return max(self.window_size // self.spatial_merge_size // self.patch_size, 1)


@dataclass(frozen=True)
class VIPShape:
    """Widths of the glimpse module's VIP (upstream: 256 / 512 / 4 heads / 512)."""

    vip_width: int = 256
    cond_width: int = 512
    vip_heads: int = 4
    vip_mlp_width: int = 512


MODEL_TYPES = ("qwen2_5_vl", "qwen3_vl")


@dataclass(frozen=True)
class ModelShape:
    name: str
    text: TextShape
    vision: VisionShape
    vip: VIPShape = field(default_factory=VIPShape)
    prune_layer: int | None = None  # None: ceil(2L/3) - 1 (18 of 28, 23 of 36)
    rope_theta: float = 1_000_000.0
    tie_word_embeddings: bool = False
    notes: str = ""
    model_type: str = "qwen2_5_vl"  # or "qwen3_vl" (dense; the MoE FFN is not modelled)

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {list(MODEL_TYPES)}, got {self.model_type!r}")
        if self.model_type == "qwen3_vl" and set(self.vision.fullatt_blocks) != set(range(self.vision.depth)):
            raise ValueError("a qwen3_vl ViT has no window attention: fullatt_blocks must list every block")
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ValueError(f"vision out_hidden_size {self.vision.out_hidden_size} must equal the text hidden size "
                             f"{self.text.hidden_size}")
        if self.text.head_dim % 4:
            raise ValueError(f"head_dim {self.text.head_dim} must be divisible by 4 (M-RoPE sections)")

    @property
    def default_k(self) -> int:
        return default_prune_layer(self.text.num_layers) if self.prune_layer is None else self.prune_layer

    def glimpse_config(self, prune_layer: int | None = None) -> GlimpseConfig:
        """The GlimpsePrune module config that fits this shape (VIP widths from ``vip``)."""
        t, v = self.text, self.vision
        return GlimpseConfig(
            base_model_type=self.model_type, base_hidden_size=t.hidden_size, base_num_layers=t.num_layers,
            base_num_heads=t.num_heads, base_vision_width=v.hidden_size, base_vision_depth=v.depth,
            prune_layer=self.default_k if prune_layer is None else prune_layer,
            vision_taps=default_vision_taps(v.depth), **dataclasses.asdict(self.vip))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["vision"]["fullatt_blocks"] = list(self.vision.fullatt_blocks)
        d["vision"]["deepstack_blocks"] = list(self.vision.deepstack_blocks)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelShape:
        d = {k: v for k, v in d.items() if not k.startswith("_")}  # "_comment" keys are documentation
        return cls(name=d["name"], text=TextShape(**d["text"]), vision=VisionShape(**d["vision"]),
                   vip=VIPShape(**d.get("vip", {})), prune_layer=d.get("prune_layer"),
                   rope_theta=float(d.get("rope_theta", 1_000_000.0)),
                   tie_word_embeddings=bool(d.get("tie_word_embeddings", False)), notes=d.get("notes", ""),
                   model_type=d.get("model_type", "qwen2_5_vl"))

    @classmethod
    def from_hf(cls, config: Any, name: str = "", **kwargs: Any) -> ModelShape:
        """From a transformers ``Qwen2_5_VLConfig`` or ``Qwen3VLConfig`` (its ``text_config`` and ``vision_config``)."""
        t, v, mt = config.get_text_config(), config.vision_config, getattr(config, "model_type", "qwen2_5_vl")
        if mt not in MODEL_TYPES:
            raise ValueError(f"no shape for model_type {mt!r} (supported: {list(MODEL_TYPES)}; a MoE FFN is not "
                             "modelled)")
        text = TextShape(t.hidden_size, t.num_hidden_layers, t.num_attention_heads,
                         t.num_key_value_heads or t.num_attention_heads, t.intermediate_size, t.vocab_size,
                         getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads)
        if mt == "qwen3_vl":  # no windows: every block attends over the whole image
            vision = VisionShape(v.depth, v.hidden_size, v.num_heads, v.intermediate_size, v.out_hidden_size,
                                 v.patch_size, v.temporal_patch_size, v.spatial_merge_size,
                                 fullatt_blocks=tuple(range(v.depth)), in_channels=getattr(v, "in_channels", 3),
                                 gated_mlp=False, deepstack_blocks=tuple(v.deepstack_visual_indexes))
        else:
            vision = VisionShape(v.depth, v.hidden_size, v.num_heads, v.intermediate_size, v.out_hidden_size,
                                 v.patch_size, v.temporal_patch_size, v.spatial_merge_size, v.window_size,
                                 tuple(v.fullatt_block_indexes), getattr(v, "in_channels", 3))
        theta = float((getattr(t, "rope_parameters", None) or {}).get("rope_theta", 1_000_000.0))
        tie = bool(getattr(config, "tie_word_embeddings", False))
        return cls(name=name or getattr(config, "_name_or_path", "") or "hf", text=text, vision=vision,
                   rope_theta=theta, tie_word_embeddings=tie, model_type=mt, **kwargs)

    def token_ids(self) -> dict[str, int]:
        """Special-token ids: the released Qwen ids if the vocabulary holds them, else the vocabulary's last ids."""
        V = self.text.vocab_size
        if V > max(QWEN_IDS.values()):
            return dict(QWEN_IDS)
        if V < 64:
            raise ValueError(f"vocab_size {V} is too small for a benchmark model (need >= 64)")
        return {k: V - 1 - i for i, k in enumerate(("image", "video", "vision_start", "vision_end", "eos", "pad"))}

    def model_class(self):
        """The transformers class of this shape's model (``Qwen2_5_VLForConditionalGeneration`` or Qwen3-VL's)."""
        import transformers

        return getattr(transformers, {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                                      "qwen3_vl": "Qwen3VLForConditionalGeneration"}[self.model_type])

    def to_hf_config(self, attn_implementation: str = "sdpa", token_ids: dict[str, int] | None = None):
        """A ``Qwen2_5_VLConfig`` (or ``Qwen3VLConfig``) of this shape (for random-initialised timing models).
        ``token_ids``: the special-token ids of a tokenizer the model will be served with (keys as ``token_ids()``:
        pad, eos, image, video, vision_start, vision_end); default ``token_ids()``."""
        from transformers import Qwen2_5_VLConfig

        if self.model_type == "qwen3_vl":
            return self._qwen3_vl_config(attn_implementation)
        t, v = self.text, self.vision
        ids = self.token_ids() if token_ids is None else token_ids
        half = t.head_dim // 2  # M-RoPE sections t/h/w, in Qwen's 16:24:24 proportion, summing to head_dim / 2
        sec_t = half // 4
        sections = [sec_t, (half - sec_t) // 2, half - sec_t - (half - sec_t) // 2]
        text = dict(hidden_size=t.hidden_size, intermediate_size=t.intermediate_size, num_hidden_layers=t.num_layers,
                    num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads, head_dim=t.head_dim,
                    vocab_size=t.vocab_size, max_position_embeddings=131072, rms_norm_eps=1e-6,
                    bos_token_id=ids["pad"], eos_token_id=ids["eos"], pad_token_id=ids["pad"],
                    rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta,
                                     "mrope_section": sections})
        vision = dict(depth=v.depth, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                      num_heads=v.num_heads, out_hidden_size=v.out_hidden_size, patch_size=v.patch_size,
                      temporal_patch_size=v.temporal_patch_size, spatial_merge_size=v.spatial_merge_size,
                      window_size=v.window_size, fullatt_block_indexes=list(v.fullatt_blocks),
                      in_channels=v.in_channels, tokens_per_second=2)
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["image"],
                                  video_token_id=ids["video"], vision_start_token_id=ids["vision_start"],
                                  vision_end_token_id=ids["vision_end"], tie_word_embeddings=self.tie_word_embeddings)
        config._attn_implementation = attn_implementation
        return config

    def _qwen3_vl_config(self, attn_implementation: str):
        """Qwen3-VL: interleaved M-RoPE sections in the released 24:20:20 proportion (of head_dim / 2 = 64), the
        released 48 x 48 learned ViT position grid."""
        from transformers import Qwen3VLConfig

        t, v, ids = self.text, self.vision, self.token_ids()
        half = t.head_dim // 2
        sec_t = half * 3 // 8
        sections = [sec_t, (half - sec_t) // 2, half - sec_t - (half - sec_t) // 2]
        text = dict(hidden_size=t.hidden_size, intermediate_size=t.intermediate_size, num_hidden_layers=t.num_layers,
                    num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads, head_dim=t.head_dim,
                    vocab_size=t.vocab_size, max_position_embeddings=262144, rms_norm_eps=1e-6,
                    bos_token_id=ids["pad"], eos_token_id=ids["eos"], pad_token_id=ids["pad"],
                    rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta, "mrope_section": sections,
                                     "mrope_interleaved": True})
        vision = dict(depth=v.depth, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                      num_heads=v.num_heads, out_hidden_size=v.out_hidden_size, patch_size=v.patch_size,
                      temporal_patch_size=v.temporal_patch_size, spatial_merge_size=v.spatial_merge_size,
                      in_channels=v.in_channels, num_position_embeddings=2304,
                      deepstack_visual_indexes=list(v.deepstack_blocks))
        config = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=ids["image"],
                               video_token_id=ids["video"], vision_start_token_id=ids["vision_start"],
                               vision_end_token_id=ids["vision_end"], tie_word_embeddings=self.tie_word_embeddings)
        config._attn_implementation = attn_implementation
        return config


def _candidates(name: str) -> list[Path]:
    file = name if name.endswith(".json") else f"{name}.json"
    repo_root = Path(__file__).resolve().parents[3]  # src/glimpseprune/bench/shapes.py -> checkout root
    return [Path(name), Path.cwd() / SHAPES_DIR / file, repo_root / SHAPES_DIR / file]


def load_shape(name_or_path: str | Path) -> ModelShape:
    """A shape from a JSON file, given as a path or as a name in ``configs/shapes/`` (e.g. ``qwen2_5_vl_7b``)."""
    for p in _candidates(str(name_or_path)):
        if p.is_file():
            d = read_json(p, "shape file")
            if not isinstance(d, dict):
                raise ValueError(f"shape file {p}: expected a JSON object, got a {type(d).__name__}")
            try:
                return ModelShape.from_dict(d)
            except KeyError as err:
                raise ValueError(f"shape file {p} lacks {err.args[0]!r} (see {SHAPES_DIR}/ for complete ones)") \
                    from None
            except TypeError as err:  # a section that is not an object, or a field it does not have
                raise ValueError(f"shape file {p}: {err}") from None
    raise FileNotFoundError(f"no shape {name_or_path!r}: give a JSON path or one of {list_shapes() or '[]'} "
                            f"(from {SHAPES_DIR}/ of the checkout)")


def list_shapes() -> list[str]:
    names: set[str] = set()
    for d in (Path.cwd() / SHAPES_DIR, Path(__file__).resolve().parents[3] / SHAPES_DIR):
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.json"))
    return sorted(names)
