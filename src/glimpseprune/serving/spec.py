"""What a server that fixes each image's token count at processing time can run, and the pruning of one image.

A model folder opts in with a ``glimpseprune`` section in its ``config.json`` (or the same dict through vLLM's
``--hf-overrides``)::

    "architectures": ["GlimpsePruneQwen2_5_VLForConditionalGeneration"],
    "glimpseprune": {"method": "early_glimpse", "keep_ratio": 0.111, "module": "glimpse_module"}

``method``: a registered method that prunes before the LLM with a count fixed by ``keep_ratio`` (``servable_methods()``:
``early_glimpse``, ``cdpruner``, ``divprune``, ``visionzip``, ``random``, ``downsample``; ``full`` keeps everything).
``keep_ratio`` in (0, 1]: each image keeps max(1, floor(keep_ratio x its tokens)), the count our runtime's methods
keep. ``module``: the trained module folder of a module method (relative to the model folder, or absolute).
``method_args``: the method's other settings (e.g. ``{"seed": 1}`` for random, ``{"dominant_frac": 0.9}``).

``ImagePruner.prune`` runs the very method objects of our runtime on one image (its visual embeddings entering the
LLM, its grid, the vision-encoder taps and the prompt's text embeddings), so a server picks the tokens our runtime
picks for the same image and prompt. Budgets are per image (our runtime's are per sample: the same for one image).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

ARCHITECTURE = "GlimpsePruneQwen2_5_VLForConditionalGeneration"
SECTION = "glimpseprune"
MODULE_DIR = "glimpse_module"  # where ``serving.folder`` puts the module inside a model folder
# methods that never read the prompt: their selection is cached per image, not per (image, prompt)
QUESTION_BLIND = frozenset({"full", "random", "divprune", "visionzip", "downsample"})
_DEPTHS = (4, 12, 28, 36)  # a before-LLM method prunes at -1 whatever the depth
_SECTION_KEYS = {"method", "keep_ratio", "module", "method_args"}


def _method_class(name: str):
    from ..registry import get_method

    try:
        return get_method(name)
    except KeyError:
        raise ValueError(f"{SECTION}.method: unknown method {name!r}; methods a server can run before the LLM: "
                         f"{', '.join(servable_methods())}") from None


def _why_not_servable(name: str) -> str | None:
    """None when ``name`` prunes before the LLM only, with a count that ``keep_ratio`` fixes; else the reason."""
    from ..api import MODULE_METHODS

    if name == "full":
        return None
    from ..registry import describe_method

    cls = _method_class(name)
    if describe_method(name)["needs"] == "keep masks per request":  # mask, oracle
        return "it needs keep masks given per request (Python API only)"
    if name in MODULE_METHODS and not getattr(cls, "prunes_before_llm", False):
        return ("it prunes after its module's LLM layer K, using the LLM's own attention; a server with one KV "
                "length per request for all layers cannot drop tokens mid-stack (use early_glimpse, trained to "
                "decide before the LLM)")
    if name in MODULE_METHODS:
        return None
    try:
        method = cls(keep_ratio=0.5)
    except TypeError:
        return "it has no keep_ratio, so the count per image is not known when the prompt is processed"
    inside = [(n, layers) for n in _DEPTHS if (layers := tuple(method.prune_layers(n))) != (-1,)]
    if inside:
        n, layers = next(((n, ks) for n, ks in inside if n == 28), inside[0])  # 28: Qwen2.5-VL-7B's depth
        where = ", ".join(str(k) for k in layers)
        such = " such as Qwen2.5-VL-7B's" if n == 28 else ""
        return (f"it prunes inside the LLM (on a {n}-layer LLM{such}, after layer(s) {where}), using the LLM's "
                "attention; a server with one KV length per request for all layers can only prune before the LLM")
    if method.budget(100) is None:
        return "its count depends on the input, not on keep_ratio alone"
    return None


def servable_methods() -> list[str]:
    """Registered methods a server can run before the LLM with a count fixed by ``keep_ratio``."""
    from ..registry import list_methods

    out = []
    for name in list_methods():
        try:
            ok = _why_not_servable(name) is None
        except (TypeError, ValueError):
            ok = False
        if ok:
            out.append(name)
    return out


@dataclass(frozen=True)
class ServeSpec:
    """The ``glimpseprune`` section of a model folder's config, checked."""

    method: str
    keep_ratio: float = 1.0
    module: str | None = None  # the module folder, resolved (absolute)
    method_args: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_section(cls, section: Any, model_dir: str | Path | None = None) -> ServeSpec:
        """Check a config section (a dict) and resolve its module folder against ``model_dir``. Every problem is a
        ValueError that names the field."""
        if not isinstance(section, dict):
            raise ValueError(f"the model config's {SECTION!r} section must be a JSON object, got "
                             f"{type(section).__name__}")
        unknown = set(section) - _SECTION_KEYS
        if unknown:
            raise ValueError(f"{SECTION}: unknown field(s) {sorted(unknown)}; known: {sorted(_SECTION_KEYS)}")
        method = section.get("method")
        if not isinstance(method, str) or not method:
            raise ValueError(f"{SECTION}.method must name a method, e.g. \"early_glimpse\"; got {method!r}")
        reason = _why_not_servable(method)
        if reason is not None:
            raise ValueError(f"{SECTION}.method {method!r} cannot run in a server that fixes each image's token "
                             f"count before the model runs: {reason}. Methods that can: "
                             f"{', '.join(servable_methods())}")
        ratio = section.get("keep_ratio", 1.0 if method == "full" else None)
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) <= 1.0:
            raise ValueError(f"{SECTION}.keep_ratio must be a number in (0, 1], got {ratio!r}")
        if method == "full" and float(ratio) != 1.0:
            raise ValueError(f"{SECTION}.keep_ratio must be 1 for method 'full' (it keeps every token), got {ratio}")
        args = section.get("method_args", {})
        if not isinstance(args, dict):
            raise ValueError(f"{SECTION}.method_args must be a JSON object, got {type(args).__name__}")
        if "keep_ratio" in args:
            raise ValueError(f"{SECTION}.method_args: give keep_ratio once, as {SECTION}.keep_ratio")
        _check_method_args(method, float(ratio), args)
        module = _resolve_module(method, section.get("module"), model_dir)
        return cls(method, float(ratio), module, dict(args))

    @property
    def needs_module(self) -> bool:
        from ..api import MODULE_METHODS

        return self.method in MODULE_METHODS

    @property
    def reads_question(self) -> bool:
        return self.method not in QUESTION_BLIND

    def count(self, n_tokens: int) -> int:
        """Visual tokens an image of ``n_tokens`` keeps: the number of placeholders the prompt gets."""
        from ..ops.budget import keep_count

        return keep_count(n_tokens, self.keep_ratio) if n_tokens else 0


def _check_method_args(method: str, ratio: float, args: dict) -> None:
    """Build the method's config from ``method_args`` now, so a wrong setting fails with the section, not at serve."""
    from ..api import MODULE_METHODS
    from ..config import SelectionConfig

    if method == "full":
        if args:
            raise ValueError(f"{SECTION}.method_args: method 'full' takes none, got {sorted(args)}")
        return
    cls = _method_class(method)
    try:
        if method in MODULE_METHODS:
            config = cls.config_class(selection=SelectionConfig(fixed_keep_ratio=ratio), **args)
            if getattr(config, "drop_layer", None) not in (None, -1):
                raise ValueError(f"drop_layer {config.drop_layer} makes it prune inside the LLM; a server with one KV "
                                 "length per request for all layers can only prune before it")
            return
        config = cls.config_class(keep_ratio=ratio, **args)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{SECTION}.method_args for {method!r}: {e}") from None
    layers = {tuple(cls(config).prune_layers(n)) for n in _DEPTHS}
    if layers != {(-1,)}:  # e.g. random with prune_layer: 3
        raise ValueError(f"{SECTION}.method_args {args} make {method!r} prune inside the LLM; a server with one KV "
                         "length per request for all layers can only prune before it")


def _resolve_module(method: str, module: Any, model_dir) -> str | None:
    from ..api import MODULE_METHODS

    if method not in MODULE_METHODS:
        if module is not None:
            raise ValueError(f"{SECTION}.module is given but method {method!r} uses no module")
        return None
    if not isinstance(module, str) or not module:
        raise ValueError(f"{SECTION}.module: method {method!r} needs its trained module folder (e.g. "
                         f"\"{MODULE_DIR}\" inside the model folder); none is given")
    p = Path(module)
    if not p.is_absolute() and model_dir is not None:
        p = Path(model_dir) / p
    if not p.is_dir():
        raise ValueError(f"{SECTION}.module: the module folder {str(p)!r} does not exist (the model folder has no "
                         "module weights there)")
    from ..checkpoint import WEIGHTS_NAME

    if not (p / WEIGHTS_NAME).is_file():
        raise ValueError(f"{SECTION}.module: {str(p)!r} holds no {WEIGHTS_NAME} (the module's weights are missing)")
    return str(p.resolve())


def qwen2_5_vl_dims(hf_config):
    """Our ``ModelDims`` of a Qwen2.5-VL config (to check that a module belongs to the served model)."""
    from ..registry import get_adapter

    return get_adapter("qwen2_5_vl").dims(SimpleNamespace(config=hf_config))


class ImagePruner:
    """Prunes one image at a time with a ``ServeSpec``'s method (the runtime's own method object)."""

    def __init__(self, spec: ServeSpec, dims=None, device=None):
        from ..api import make_method
        from ..config import SelectionConfig

        self.spec = spec
        self.module = None
        if spec.method == "full":
            self.method = None
            return
        if spec.needs_module:
            from ..checkpoint import load_module

            try:
                self.module = load_module(spec.module, dims=dims, device=device, dtype=torch.float32)
            except ValueError as e:
                raise ValueError(f"{SECTION}.module {spec.module!r}: {e}") from None
            selection = SelectionConfig(fixed_keep_ratio=spec.keep_ratio)
            self.method = make_method(spec.method, self.module, selection, **spec.method_args)
            k = self.method.prune_layer(self.module.cfg.base_num_layers)
            if k != -1:  # an early module saved with prune_layer K >= 0 (folder.py refuses it; a hand-written
                # section or --hf-overrides reaches here): a server would silently prune it before the LLM
                raise ValueError(f"{SECTION}.module {spec.module!r} drops its tokens after LLM layer {k} "
                                 "(prune_layer); a server can only prune before the LLM: use an early module "
                                 "with prune_layer -1 (or method_args {\"drop_layer\": -1} to override)")
        else:
            try:
                self.method = make_method(spec.method, keep_ratio=spec.keep_ratio, **spec.method_args)
            except TypeError as e:
                raise ValueError(f"{SECTION}.method_args for {spec.method!r}: {e}") from None

    def taps(self) -> tuple[int, ...]:
        return () if self.method is None else tuple(self.method.vision_taps())

    def tap_fn(self):
        return None if self.method is None else self.method.vision_tap_fn()

    @torch.no_grad()
    def prune(self, embeds: torch.Tensor, grid: tuple[int, int], feats: list[torch.Tensor] | None = None,
              text_before: torch.Tensor | None = None, text_after: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """One image: its visual embeddings entering the LLM (n, H), merged grid (h, w) with h * w = n, per vision
        tap its (n, C) features (raster order, already through ``tap_fn``), and the prompt's text embeddings before
        and after it. Returns (kept indices (k,) long ascending, their LLM input embeddings (k, H)), k =
        ``spec.count(n)``; merging methods rewrite the rows of the tokens they keep."""
        from ..contracts import Encoded

        n, hidden = embeds.shape
        if grid[0] * grid[1] != n:
            raise ValueError(f"image grid {grid} holds {grid[0] * grid[1]} tokens but {n} embeddings were given")
        want = self.spec.count(n)
        if self.method is None:
            return torch.arange(n, device=embeds.device), embeds
        empty = embeds.new_zeros(0, hidden)
        before = empty if text_before is None else text_before.to(embeds.dtype)
        after = empty if text_after is None else text_after.to(embeds.dtype)
        seq = torch.cat([before, embeds, after])[None]  # (1, L, H): the prompt as our runtime lays it out
        length = seq.shape[1]
        vis_mask = torch.zeros(1, length, dtype=torch.bool, device=embeds.device)
        vis_mask[0, before.shape[0]:before.shape[0] + n] = True
        enc = Encoded(seq, torch.ones_like(vis_mask), torch.zeros(3, 1, length, dtype=torch.long, device=seq.device),
                      vis_mask, [tuple(grid)], [0], torch.tensor([length], device=seq.device),
                      vision_feats=list(feats or []))
        state = SimpleNamespace(enc=enc, device=embeds.device, scratch={}, request={}, stage=0,
                                keep_vis=[torch.ones(n, dtype=torch.bool, device=embeds.device)])
        keep = self.method.select(state)[0].to(embeds.device)
        idx = keep.nonzero().squeeze(-1)
        if idx.numel() != want:
            raise RuntimeError(f"method {self.spec.method!r} kept {idx.numel()} of {n} tokens but the prompt was "
                               f"given {want} placeholders (keep_ratio {self.spec.keep_ratio})")
        rows = embeds
        merged = state.scratch.get("merged_embeds")
        if merged and merged[0] is not None and merged[0][0].numel():
            rows = embeds.clone()
            rows[merged[0][0]] = merged[0][1].to(rows.dtype)
        return idx, rows[idx]
