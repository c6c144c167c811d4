"""Public entry points: ``load`` a base model (+ module) from local directories, ``apply`` a method to a model you
already hold, and ``PrunedModel.generate``. Nothing is patched and no request state is kept on the model.

Example (offline; the directories must already be on disk)::

    import glimpseprune as gp
    pm = gp.load("Qwen2.5-VL-7B-Instruct/", module="glimpse-module/")
    out = pm.generate(images=[["cat.jpg"]], questions=["What is on the mat?"], max_new_tokens=32)
    print(out.texts[0], out.n_kept[0], "/", out.n_vis[0])
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import MERGED_ATTR, check_compatible, load_plus, read_merged_record
from .config import SelectionConfig
from .methods.base import PruningMethod
from .registry import get_adapter, get_method
from .runtime.engine import PrefillResult, generate


@dataclass
class PruneOutput:
    sequences: torch.Tensor  # (B, T) generated token ids (prompt excluded), pad after EOS
    keep_masks: list[torch.Tensor]  # per sample (n_vis_b,) bool, its images concatenated
    image_keep_masks: list[torch.Tensor]  # per image (h, w) bool, images in batch order
    n_vis: list[int]
    n_kept: list[int]
    kv_len: list[int]  # cache entries per sample at the start of decoding
    prune_layer: int | None
    texts: list[str] | None = None
    step_logits: list[torch.Tensor] | None = None  # per generated token, (B, V)
    prefill: PrefillResult | None = None
    timing: dict | None = None  # wall seconds of the batch: "prefill" (ViT + LLM), "decode" ("decode_steps" steps)


def _split_images(pre: PrefillResult) -> list[torch.Tensor]:
    out, offset = [], [0] * len(pre.keep_masks)
    for (h, w), b in zip(pre.grids, pre.image_owner):
        out.append(pre.keep_masks[b][offset[b]: offset[b] + h * w].view(h, w))
        offset[b] += h * w
    return out


def _token_ids(model, processor) -> tuple[Any, int]:
    gc = getattr(model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None) or model.config.get_text_config().eos_token_id
    tok = getattr(processor, "tokenizer", None)
    pad = getattr(gc, "pad_token_id", None)
    if pad is None and tok is not None:
        pad = tok.pad_token_id
    return eos, 0 if pad is None else int(pad)


class PrunedModel:
    """A base model + a pruning method (+ optionally its processor). Stateless across calls."""

    def __init__(self, model, method: PruningMethod, processor=None):
        self.model, self.method, self.processor = model, method, processor
        self.adapter = get_adapter(model)
        module = getattr(method, "module", None)
        if module is not None:
            check_compatible(module.cfg, self.adapter.dims(model))

    def prepare(self, images: list[list[Any]], questions: list[str]) -> dict:
        """Processor inputs for a batch; images: per sample a list of PIL images or paths (may be empty)."""
        from .processing import build_inputs, load_image

        if self.processor is None:
            raise ValueError("this PrunedModel has no processor; pass processor= or call generate(inputs=...)")
        check_batch_args(images, questions)
        pil = [[load_image(im) if isinstance(im, (str, Path)) else im for im in ims] for ims in images]
        limit = context_length(self.model)
        return build_inputs(self.processor, pil, questions, max_length=None if limit is None else limit - 1)

    def generate(self, inputs: dict | None = None, *, images=None, questions=None, max_new_tokens: int = 32,
                 do_sample: bool = False, temperature: float = 1.0, seed: int | None = None,
                 keep_masks: list[torch.Tensor] | None = None, return_logits: bool = False) -> PruneOutput:
        """Generate for a batch given either processor ``inputs`` or ``images`` + ``questions``."""
        check_generate_args(max_new_tokens, do_sample, temperature, seed, keep_masks)
        if inputs is None:
            if questions is None:
                raise ValueError("pass inputs= (processor output) or questions= (+ images=)")
            if isinstance(questions, (str, bytes)):
                raise TypeError("questions must be a list of strings (one per sample), not a single string")
            inputs = self.prepare(images if images is not None else [[] for _ in questions], questions)  # checked
        else:
            check_prompt_length(inputs, context_length(self.model))
        device = next(self.model.parameters()).device
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in dict(inputs).items()}
        eos, pad = _token_ids(self.model, self.processor)
        request = {"keep_masks": keep_masks} if keep_masks is not None else {}
        toks, pre, step_logits = generate(self.model, self.adapter, self.method, inputs, max_new_tokens, eos, pad,
                                          do_sample, temperature, seed, request, keep_logits=return_logits)
        texts = None
        if self.processor is not None:
            texts = self.processor.batch_decode(toks, skip_special_tokens=True)
        return PruneOutput(
            sequences=toks, keep_masks=pre.keep_masks, image_keep_masks=_split_images(pre),
            n_vis=pre.n_vis, n_kept=pre.n_kept, kv_len=pre.kv_len,
            prune_layer=pre.prune_layer, texts=texts, step_logits=step_logits if return_logits else None,
            prefill=pre, timing=pre.timing,
        )


def check_batch_args(images, questions) -> None:
    """The shapes a user gets wrong first, named before anything is loaded: a list of questions (str each) and, per
    question, a list of images (paths or PIL images)."""
    if isinstance(questions, (str, bytes)) or not isinstance(questions, (list, tuple)):
        raise TypeError(f"questions must be a list of strings, got {type(questions).__name__}")
    for i, q in enumerate(questions):
        if not isinstance(q, str):
            raise TypeError(f"questions[{i}] must be a string, got {type(q).__name__} {q!r:.60}")
    if isinstance(images, (str, bytes, Path)) or not isinstance(images, (list, tuple)):
        raise TypeError(f"images must be a list with one list of images per question, got {type(images).__name__}")
    if len(images) != len(questions):
        raise ValueError(f"got {len(images)} image lists for {len(questions)} questions")
    for i, sample in enumerate(images):
        if isinstance(sample, (str, Path)):
            raise TypeError(f"images[{i}] is a single path ({sample!s:.80}); give each question a list of images: "
                            f"images=[[{str(sample)!r:.80}]]")
        if not isinstance(sample, (list, tuple)):
            raise TypeError(f"images[{i}] must be a list of images (paths or PIL images), got "
                            f"{type(sample).__name__}; wrap it in a list")


def check_generate_args(max_new_tokens, do_sample, temperature, seed, keep_masks) -> None:
    """Generation knobs: named errors instead of a silent wrong answer (a float keep mask cast to bool keeps
    everything) or a traceback from deep inside torch."""
    import math
    import numbers

    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number, got {temperature!r}")
    if temperature < 0 or (do_sample and temperature == 0):
        raise ValueError(f"temperature must be > 0 when sampling (>= 0 otherwise), got {temperature}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise TypeError(f"seed must be a whole number or None, got {type(seed).__name__} {seed!r}")
    if keep_masks is not None:
        if torch.is_tensor(keep_masks) or not isinstance(keep_masks, (list, tuple)):
            raise TypeError("keep_masks must be a list with one bool tensor per sample")
        for i, m in enumerate(keep_masks):
            dtype = getattr(m, "dtype", None)
            if not (torch.is_tensor(m) or hasattr(m, "__array__")) or dtype not in (torch.bool, bool, "bool"):
                what = f"{type(m).__name__} of {dtype}" if dtype is not None else type(m).__name__
                raise TypeError(f"keep_masks[{i}] must be a bool tensor or array (True = keep), got {what}; "
                                "threshold scores yourself (e.g. scores > 0.5)")


def context_length(model) -> int | None:
    """The LLM's context (``max_position_embeddings``), or None where the config does not say."""
    value = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    return int(value) if value else None


def check_prompt_length(inputs, limit: int | None) -> None:
    """A prompt (the glimpse token included) longer than the model's context is refused before the model runs (for
    ``inputs`` a caller built; ``prepare`` refuses while tokenising)."""
    ids = inputs.get("input_ids") if hasattr(inputs, "get") else None
    if limit is None or ids is None:
        return
    n = int(ids.shape[-1]) + 1
    if n > limit:
        raise ValueError(f"the prompt is {n - 1} tokens (+ 1 glimpse token) but the model's context is {limit} "
                         "(max_position_embeddings): shorten the question or use fewer / smaller images")


def make_method(name: str, module=None, selection: SelectionConfig | None = None, **kwargs) -> PruningMethod:
    cls = get_method(name)
    if name == "glimpse":
        return cls(module=module, selection=selection)
    return cls(**kwargs)


def apply(model, method: str | PruningMethod = "glimpse", module=None, selection: SelectionConfig | None = None,
          processor=None, **method_kwargs) -> PrunedModel:
    """Wrap a loaded model: ``pm = apply(model, "glimpse", module=load_module(dir))``. The model is not modified."""
    if isinstance(method, str):
        method = make_method(method, module, selection, **method_kwargs)
    return PrunedModel(model, method, processor)


def load_base(model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(model, processor) from a local HF directory, offline."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from .processing import load_processor

    p = Path(model_dir)
    if not (p / "config.json").is_file():
        hint = ("; this folder holds a LoRA adapter (GlimpsePrune+?): pass it as module=, the base model as "
                "model_dir") if (p / "adapter_config.json").is_file() else ""
        raise FileNotFoundError(f"no model at {p}: expected a local Hugging Face directory with config.json "
                                "(download it first, e.g. `hf download Qwen/Qwen2.5-VL-7B-Instruct --local-dir DIR`)"
                                + hint)
    config = AutoConfig.from_pretrained(p, local_files_only=True)
    get_adapter(config.model_type)  # fail fast on unsupported families
    merged = read_merged_record(p)  # a lora.merge_and_save folder: its weights hold a GlimpsePrune+ adapter
    model = AutoModelForImageTextToText.from_pretrained(p, dtype=dtype, local_files_only=True).to(device).eval()
    if merged is not None:
        setattr(model, MERGED_ATTR, merged)
    return model, load_processor(p)


def load(model_dir: str | Path, module: str | Path | None = None, method: str | None = None,
         selection: SelectionConfig | None = None, device: str | torch.device = "cpu",
         dtype: torch.dtype = torch.float32, merge_adapter: bool = True, **method_kwargs) -> PrunedModel:
    """Load a base model (and a glimpse module) from local directories and wrap them.

    method defaults to "glimpse" when a module is given, else "full". A GlimpsePrune+ module folder (module + LoRA
    adapter, ``lora.save_plus``) is loaded as a whole: the adapter is applied to the base model (merged into its
    weights unless ``merge_adapter=False``), then the module; the folder is checked before the base model loads.
    """
    from .checkpoint import adapter_record

    if module is not None:
        adapter_record(module)  # missing / foreign adapter files: named errors before anything loads
    model, processor = load_base(model_dir, device, dtype)
    method = method or ("glimpse" if module is not None else "full")
    mod = None
    if module is not None:
        # the module follows a bf16 base (tested: >= 99 % of the fp32 keep decisions); fp16 stays fp32 (untested)
        mod_dtype = dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32
        model, mod = load_plus(model, module, merge=merge_adapter, device=device, dtype=mod_dtype)
    return apply(model, method, module=mod, selection=selection, processor=processor, **method_kwargs)
