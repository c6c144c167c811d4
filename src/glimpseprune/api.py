"""Public entry points: ``load`` a base model (+ module) from local directories, ``apply`` a method to a model you
already hold, and ``PrunedModel.generate``. Nothing is patched and no request state is kept on the model.

Example (offline; the directories must already be on disk)::

    import glimpseprune as gp
    pm = gp.load("Qwen2.5-VL-7B-Instruct/", module="glimpse-module/")
    out = pm.generate(images=[["cat.jpg"]], questions=["What is on the mat?"], max_new_tokens=32)
    print(out.texts[0], out.n_kept[0], "/", out.n_vis[0])
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import MERGED_ATTR, check_compatible, load_plus, read_merged_record
from .config import SelectionConfig
from .methods.base import PruningMethod
from .registry import MODULE_METHODS, get_adapter, get_method
from .runtime.engine import PrefillResult, generate, resolve_generation_config
from .validation import (  # noqa: F401  (resolve_dtype: part of this module's API)
    check_batch_args,
    check_decoding,
    check_device,
    check_finite_module,
    check_generate_args,
    check_inputs,
    check_prompt_length,
    context_length,
    resolve_dtype,
)


@dataclass
class PruneOutput:
    """What ``PrunedModel.generate`` returns for a batch of B samples.

    Fields:
        sequences: (B, T) generated token ids (prompt excluded); a row that stopped early (EOS, a stop string) is
            padded with the pad id up to the longest row, as ``model.generate`` pads.
        keep_masks: per sample, (n_vis_b,) bool over its visual tokens (its images, then its video, concatenated in
            prompt order), True = kept.
        image_keep_masks: per image in batch order (videos not included), (h, w) bool on the image's token grid.
        video_keep_masks: per video in batch order, (t, h, w) bool: t frame-groups (``temporal_patch_size`` frames
            each) of (h, w) tokens.
        n_vis: per sample, visual tokens before pruning.
        n_kept: per sample, visual tokens kept (``keep_masks[b].sum()``).
        kv_len: per sample, valid KV-cache entries at the start of decoding (prompt after pruning).
        prune_layer: the LLM layer after which tokens were dropped (-1: before the LLM; None: nothing pruned).
        texts: per sample, the decoded ``sequences`` (special tokens skipped); None without a processor.
        step_logits: with ``return_logits=True``, per generated token the raw (B, V) logits (before any logits
            processor) in float32, as ``model.generate(output_logits=True)`` returns them; else None.
        prefill: the runtime's ``PrefillResult`` (cache, masks, per-stage keep masks, the method's scratch).
        timing: wall seconds of the batch: ``prefill`` (ViT + LLM), ``decode`` and its ``decode_steps`` steps.

    ``to_dict()`` gives the JSON-able summary (no tensors, no cache).
    """

    sequences: torch.Tensor
    keep_masks: list[torch.Tensor]
    image_keep_masks: list[torch.Tensor]
    n_vis: list[int]
    n_kept: list[int]
    kv_len: list[int]
    prune_layer: int | None
    texts: list[str] | None = None
    step_logits: list[torch.Tensor] | None = None
    prefill: PrefillResult | None = None
    timing: dict | None = None
    video_keep_masks: list[torch.Tensor] = field(default_factory=list)

    @property
    def kept_frac(self) -> list[float]:
        """Per sample, the kept share of its visual tokens (1.0 for a sample without images)."""
        return [k / n if n else 1.0 for k, n in zip(self.n_kept, self.n_vis)]

    def to_dict(self) -> dict:
        """JSON-able summary: texts, token ids, visual-token counts and kept fractions, kept indices per sample
        (``kept_idx``: positions in its concatenated visual tokens), per image and per video, the prune layer(s),
        timing."""
        pre = self.prefill
        return {
            "texts": None if self.texts is None else list(self.texts),
            "sequences": self.sequences.tolist(),
            "n_vis": [int(n) for n in self.n_vis],
            "n_kept": [int(n) for n in self.n_kept],
            "kept_frac": self.kept_frac,
            "kv_len": [int(n) for n in self.kv_len],
            "prune_layer": None if self.prune_layer is None else int(self.prune_layer),
            "prune_layers": [] if pre is None else [int(k) for k in pre.prune_layers],
            "kept_idx": [_kept_idx(m) for m in self.keep_masks],
            "image_kept_idx": [_kept_idx(m) for m in self.image_keep_masks],  # flat row-major index on (h, w)
            "image_grids": [list(m.shape) for m in self.image_keep_masks],
            "video_kept_idx": [_kept_idx(m) for m in self.video_keep_masks],  # flat row-major index on (t, h, w)
            "video_grids": [list(m.shape) for m in self.video_keep_masks],
            "timing": {k: (int(v) if isinstance(v, int) else float(v)) for k, v in (self.timing or {}).items()},
        }


def _kept_idx(mask: torch.Tensor) -> list[int]:
    return mask.detach().flatten().nonzero().flatten().cpu().tolist()


def _split_visuals(pre: PrefillResult) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(per image (h, w), per video (t, h, w)) keep masks, cut from the per-sample masks along ``pre.grids``."""
    images, videos, offset = [], {}, [0] * len(pre.keep_masks)
    for i, ((h, w), b) in enumerate(zip(pre.grids, pre.image_owner)):
        m = pre.keep_masks[b][offset[b]: offset[b] + h * w].view(h, w)
        offset[b] += h * w
        v = pre.grid_video[i] if pre.grid_video else -1
        if v < 0:
            images.append(m)
        else:
            videos.setdefault(v, []).append(m)
    return images, [torch.stack(videos[v]) for v in sorted(videos)]


def _token_ids(model, processor) -> tuple[Any, int | None]:
    """(EOS, pad) as ``model.generate`` takes them: the model's generation config, EOS falling back to the text
    config's. A missing pad stays None, and transformers then pads finished rows with the first EOS id, as stock
    ``generate`` does (the tokenizer's pad, or 0, would give other sequences); only without any EOS does it fall
    back to the tokenizer's pad, then 0."""
    gc = getattr(model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None) or model.config.get_text_config().eos_token_id
    pad = getattr(gc, "pad_token_id", None)
    if pad is None and eos is None:
        pad = getattr(getattr(processor, "tokenizer", None), "pad_token_id", None)
        pad = 0 if pad is None else pad
    return eos, None if pad is None else int(pad)


def base_generation_config(model, processor=None, generation_config=None):
    """The ``GenerationConfig`` a call starts from, before its keywords.

    Without ``generation_config``: glimpseprune's defaults (greedy, 32 new tokens, no penalties) with the model's
    special tokens (EOS, pad; without a pad, finished rows get the first EOS id, as in ``model.generate``); the
    checkpoint's sampling knobs
    (``generation_config.json``) are not applied, so results do not change with them. With one: a copy whose unset
    fields are filled from ``model.generation_config``, as ``model.generate`` fills them; pass
    ``generation_config=model.generation_config`` to decode as the checkpoint recommends."""
    import copy

    from transformers import GenerationConfig

    eos, pad = _token_ids(model, processor)
    model_gc = getattr(model, "generation_config", None)
    if generation_config is None:
        return GenerationConfig(bos_token_id=getattr(model_gc, "bos_token_id", None), eos_token_id=eos,
                                pad_token_id=pad)
    if not isinstance(generation_config, GenerationConfig):
        raise TypeError(f"generation_config must be a transformers.GenerationConfig, got "
                        f"{type(generation_config).__name__}")
    gc = copy.deepcopy(generation_config)
    if model_gc is not None:
        gc.update(**model_gc.to_dict(), defaults_only=True)
    gc.update(eos_token_id=eos, pad_token_id=pad, defaults_only=True)
    return gc


def _accelerate_hooks(module) -> list:
    """The accelerate hooks on ``module`` (a ``SequentialHook`` holds several); [] without one."""
    hook = getattr(module, "_hf_hook", None)
    return list(getattr(hook, "hooks", None) or ([hook] if hook is not None else []))


def execution_device(model) -> torch.device:
    """Where a batch's tensors go: the input embeddings' device or, for a model spread or offloaded by accelerate
    (``device_map=``, ``cpu_offload``: weights may sit on "meta" between calls), their hook's execution device."""
    emb = model.get_input_embeddings()
    for h in _accelerate_hooks(emb):
        dev = getattr(h, "execution_device", None)
        if dev is not None:
            return torch.device(dev)
    dev = emb.weight.device
    if dev.type != "meta":
        return dev
    return next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))


# model -> Lock, for models whose weights accelerate moves in and out around each forward (see ``_request_lock``)
_OFFLOAD_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_OFFLOAD_LOCKS_GUARD = threading.Lock()


def _offloaded(model) -> bool:
    """Whether accelerate loads ``model``'s weights before each forward and sends them back after it (``device_map``
    with "cpu" / "disk" entries, ``cpu_offload``)."""
    return any(getattr(h, "offload", False) for m in model.modules() for h in _accelerate_hooks(m))


def _request_lock(model):
    """One request at a time on an offloaded model (a no-op for any other): its hooks keep one copy of a layer's
    weights per module, so one thread's post-forward hook sent them back to "meta" while another thread's forward
    still read them (errors, or wrong tokens). Nothing is stored on the model."""
    if not _offloaded(model):
        return contextlib.nullcontext()
    with _OFFLOAD_LOCKS_GUARD:  # re-entrant: a generate nested in the same thread (from a streamer) never waits on
        return _OFFLOAD_LOCKS.setdefault(model, threading.RLock())  # itself


class PrunedModel:
    """A base model + a pruning method (+ optionally its processor). Stateless across calls."""

    def __init__(self, model, method: PruningMethod, processor=None):
        if not isinstance(method, PruningMethod):
            raise TypeError(f"method must be a PruningMethod (gp.make_method(name, ...)), got {type(method).__name__} "
                            f"{method!r:.60}; or use gp.apply(model, name, ...)")
        if not hasattr(model, "config") or not hasattr(model, "get_input_embeddings"):
            raise TypeError(f"model must be a transformers vision-language model (e.g. from gp.load_base(dir)), got "
                            f"{type(model).__name__}")
        self.model, self.method, self.processor = model, method, processor
        self.adapter = get_adapter(model)
        module = getattr(method, "module", None)
        if module is not None:
            check_compatible(module.cfg, self.adapter.dims(model))
            check_finite_module(module)

    def prepare(self, images: list[list[Any]] | None, questions: list[str], videos: list[Any] | None = None) -> dict:
        """Processor inputs for a batch; images: per sample a list of PIL images or paths (may be empty; None: no
        images); videos: per sample None, a video file path (sampled at ``video.DEFAULT_FPS``, at most
        ``video.MAX_FRAMES``), a list of PIL frames (or image paths; taken as sampled at ``DEFAULT_FPS``) or a
        ``glimpseprune.video.Video`` (``load_video(path, fps=..., max_frames=...)`` for other rates). Bad videos (an
        undecodable file, an empty or mixed-size frame list, too many frames) raise ``ValueError`` here, before the
        model runs."""
        from .processing import build_inputs, load_image

        if self.processor is None:
            raise ValueError("this PrunedModel has no processor; pass processor= or call generate(inputs=...)")
        if images is None and isinstance(questions, (list, tuple)):
            images = [[] for _ in questions]
        check_batch_args(images, questions, videos)
        pil = [[load_image(im) if isinstance(im, (str, Path)) else im for im in ims] for ims in images]
        limit = context_length(self.model)
        return build_inputs(self.processor, pil, questions, max_length=None if limit is None else limit - 1,
                            videos=videos)

    def generate(self, inputs: dict | None = None, *, images=None, questions=None, videos=None, generation_config=None,
                 max_new_tokens: int | None = None, do_sample: bool | None = None, temperature: float | None = None,
                 top_p: float | None = None, top_k: int | None = None, repetition_penalty: float | None = None,
                 stop_strings: str | list[str] | None = None, eos_token_id: int | list[int] | None = None,
                 streamer=None, tokenizer=None, seed: int | None = None,
                 keep_masks: list[torch.Tensor] | None = None, return_logits: bool = False,
                 **generation_kwargs) -> PruneOutput:
        """Generate for a batch given either processor ``inputs`` or ``questions`` + ``images`` and/or ``videos``
        (one entry per question; see ``prepare``): a batch may mix image, video and text-only samples, e.g.
        ``videos=[None, "clip.mp4", [frame0, frame1, frame2, frame3]]``. A video's visual tokens are all its frames'
        merged tokens (t x h x w); budgets (``max_keep_ratio``, ``min_keep``, keep ratios) apply per sample, over the
        whole video.

        Decoding follows ``transformers``: a ``GenerationConfig`` (``generation_config=``) and/or its fields as
        keywords (``max_new_tokens``, ``do_sample``, ``temperature``, ``top_p``, ``top_k``, ``repetition_penalty``,
        ``stop_strings``, ``eos_token_id`` (replaces the model's EOS ids, as in transformers), ``min_new_tokens``,
        ...; keywords win). The logits processors and stopping criteria are transformers' own, so with the
        ``full`` method the tokens equal ``model.generate``'s. Defaults: greedy, 32 new tokens (see
        ``base_generation_config``). ``seed`` samples with a private generator; without it sampling consumes the
        global RNG like ``model.generate``. ``streamer``: a ``TextStreamer`` / ``TextIteratorStreamer`` (batch of 1).
        ``tokenizer`` (for ``stop_strings``) defaults to the processor's.

        Example::

            from transformers import TextIteratorStreamer
            streamer = TextIteratorStreamer(pm.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
            threading.Thread(target=pm.generate, kwargs=dict(images=[["cat.jpg"]], questions=["What is it?"],
                                                             streamer=streamer, do_sample=True, top_p=0.9)).start()
            print("".join(streamer))
        """
        try:  # the checks: a failing one also ends the streamer (the runtime ends it from here on), or a consumer
            # iterating a TextIteratorStreamer in another thread (the example above) would block for ever
            check_generate_args(max_new_tokens, do_sample, temperature, seed, keep_masks)
            gc = resolve_generation_config(
                base_generation_config(self.model, self.processor, generation_config), max_new_tokens=max_new_tokens,
                do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k,
                repetition_penalty=repetition_penalty, stop_strings=stop_strings, eos_token_id=eos_token_id,
                **generation_kwargs)
            check_generate_args(gc.max_new_tokens, gc.do_sample, gc.temperature, seed, keep_masks)
            if inputs is None:
                if questions is None:
                    raise ValueError("pass inputs= (processor output) or questions= (+ images= and/or videos=)")
                if isinstance(questions, (str, bytes)):
                    raise TypeError("questions must be a list of strings (one per sample), not a single string")
                inputs = self.prepare(images, questions, videos)  # checked
            else:
                given = [n for n, v in (("images", images), ("questions", questions), ("videos", videos))
                         if v is not None]
                if given:
                    raise ValueError("pass either inputs= or questions= (+ images= / videos=), not both: got inputs "
                                     f"and {', '.join(given)}")
                inputs = check_inputs(inputs)
                check_prompt_length(inputs, context_length(self.model))
            ids = inputs["input_ids"]
            check_decoding(self.model, gc, ids.shape[0], ids.shape[1], context_length(self.model), streamer)
            device = execution_device(self.model)
            inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in dict(inputs).items()}
            if keep_masks is not None and not self.method.takes_keep_masks:
                raise ValueError(f"method {self.method.name!r} does not take keep_masks (it chooses its own tokens); "
                                 "supplied masks run with method 'mask' or 'oracle'")
            request = {"keep_masks": keep_masks} if keep_masks is not None else {}
            if tokenizer is None:
                tokenizer = getattr(self.processor, "tokenizer", self.processor)
        except BaseException:
            if streamer is not None:
                streamer.end()
            raise
        with _request_lock(self.model):
            toks, pre, step_logits = generate(self.model, self.adapter, self.method, inputs, seed=seed,
                                              request=request, keep_logits=return_logits, generation_config=gc,
                                              streamer=streamer, tokenizer=tokenizer)
        texts = None
        if self.processor is not None:
            texts = self.processor.batch_decode(toks, skip_special_tokens=True)
        image_masks, video_masks = _split_visuals(pre)
        return PruneOutput(
            sequences=toks, keep_masks=pre.keep_masks, image_keep_masks=image_masks, video_keep_masks=video_masks,
            n_vis=pre.n_vis, n_kept=pre.n_kept, kv_len=pre.kv_len,
            prune_layer=pre.prune_layer, texts=texts, step_logits=step_logits if return_logits else None,
            prefill=pre, timing=pre.timing,
        )


def make_method(name: str, module=None, selection: SelectionConfig | None = None, **kwargs) -> PruningMethod:
    """Method ``name`` with its settings; ``module`` and ``selection`` belong to the module methods (``glimpse``,
    ``early_glimpse``): given to another method they are refused, not ignored."""
    if not isinstance(name, str):
        raise TypeError(f"method must be a method name (see glimpseprune.list_methods()) or a PruningMethod, got "
                        f"{type(name).__name__} {name!r:.60}")
    cls = get_method(name)
    if selection is not None and not isinstance(selection, SelectionConfig):
        raise TypeError(f"selection must be a glimpseprune.SelectionConfig, got {type(selection).__name__}; e.g. "
                        "SelectionConfig(threshold=0.5, max_keep_ratio=0.1)")
    if name not in MODULE_METHODS:
        if module is not None:
            raise ValueError(f"method {name!r} takes no module (a trained module runs with {sorted(MODULE_METHODS)})")
        if selection is not None and selection != SelectionConfig():
            raise ValueError(f"selection settings apply to {sorted(MODULE_METHODS)}, not to {name!r}; set its budget "
                             "with its own settings (e.g. keep_ratio=)")
        return cls(**kwargs)
    if isinstance(module, (str, Path)):
        raise TypeError(f"module must be a loaded module, got the path {str(module)!r:.80}: load it with "
                        "gp.load_module(dir), or load base and module together with gp.load(model_dir, module=dir)")
    if kwargs:  # e.g. video="per_frame"
        return cls(cls.config_class(selection=selection or SelectionConfig(), **kwargs), module=module)
    return cls(module=module, selection=selection)


def module_method_name(module) -> str:
    """The method that runs a trained module: ``early_glimpse`` for an early module (kind ``early``), else
    ``glimpse``."""
    return "early_glimpse" if getattr(getattr(module, "cfg", None), "kind", "glimpse") == "early" else "glimpse"


def module_dtype(model) -> torch.dtype:
    """The dtype a glimpse module runs in beside ``model``: a bf16 base's (tested: >= 99 % of the fp32 keep
    decisions), else float32 (fp16 untested)."""
    return model.dtype if model.dtype in (torch.float32, torch.bfloat16) else torch.float32


def apply(model, method: str | PruningMethod = "glimpse", module=None, selection: SelectionConfig | None = None,
          processor=None, **method_kwargs) -> PrunedModel:
    """Wrap a loaded model: ``pm = apply(model, "glimpse", module=load_module(dir))``. The model is not modified."""
    if isinstance(method, PruningMethod):
        if module is not None or selection is not None or method_kwargs:
            raise ValueError(f"apply() got a ready {type(method).__name__} and also module= / selection= / settings: "
                             "give them to make_method instead")
    else:
        method = make_method(method, module, selection, **method_kwargs)  # a name; anything else is refused there
    return PrunedModel(model, method, processor)


def load_base(model_dir: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | str = "auto",
              device_map: str | dict | None = None, offload_folder: str | Path | None = None):
    """(model, processor) from a local HF directory (or ``"embedded"``, the packaged world model), offline.

    ``dtype="auto"`` keeps the checkpoint's dtype (its config's ``dtype`` / ``torch_dtype``); a torch dtype or its
    name casts. ``device`` (default "cpu") moves the whole model; ``device_map`` ("auto", "balanced", or a dict of
    module name -> device / "cpu" / "disk") instead lets accelerate spread and offload it (``offload_folder`` holds
    the "disk" weights), e.g. ``load_base(dir, device_map="auto")`` for a model larger than one GPU."""
    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForImageTextToText

    from .assets import resolve_model
    from .processing import load_processor

    p = resolve_model(model_dir)
    torch_dtype = resolve_dtype(dtype)
    check_device(device)
    if device_map is not None and device is not None:
        raise ValueError(f"pass device= or device_map=, not both (got device={device!r}, device_map={device_map!r})")
    if not (p / "config.json").is_file():
        hint = ("; this folder holds a LoRA adapter (GlimpsePrune+?): pass it as module=, the base model as "
                "model_dir") if (p / "adapter_config.json").is_file() else ""
        raise FileNotFoundError(f"no model at {p}: expected a local Hugging Face directory with config.json "
                                "(download it first, e.g. `hf download Qwen/Qwen2.5-VL-7B-Instruct --local-dir DIR`)"
                                + hint)
    try:  # StrictDataclassError: a field of the wrong type (transformers 5 validates configs with huggingface_hub)
        config = AutoConfig.from_pretrained(p, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, StrictDataclassError) as err:
        raise ValueError(f"cannot read the model config {p / 'config.json'}: {err}") from None
    get_adapter(config.model_type)  # fail fast on unsupported families
    merged = read_merged_record(p)  # a lora.merge_and_save folder: its weights hold a GlimpsePrune+ adapter
    spread = {} if device_map is None else {"device_map": device_map, "offload_folder": offload_folder}
    try:
        # use_kernels=False: transformers >= 5.25 kernelizes by default with kernels fetched from the Hub (offline here)
        model = AutoModelForImageTextToText.from_pretrained(p, dtype=torch_dtype, local_files_only=True,
                                                            use_kernels=False, **spread)
    except SafetensorError as err:  # a truncated or foreign weights file: name the folder, not the parser
        raise ValueError(f"cannot read the weights in {p}: {err} (a truncated or corrupt .safetensors file? download "
                         "it again)") from err
    if device_map is None:
        model = model.to(device if device is not None else "cpu")
    model.eval()
    if merged is not None:
        setattr(model, MERGED_ATTR, merged)
    return model, load_processor(p)


def load(model_dir: str | Path, module: str | Path | None = None, method: str | None = None,
         selection: SelectionConfig | None = None, device: str | torch.device | None = None,
         dtype: torch.dtype | str = "auto", merge_adapter: bool = True, device_map: str | dict | None = None,
         offload_folder: str | Path | None = None, **method_kwargs) -> PrunedModel:
    """Load a base model (and a glimpse module) from local directories and wrap them.

    ``model_dir`` / ``module`` may also name the packaged defaults: ``gp.load("embedded", module="embedded")`` (or
    ``module="embedded-k0"``). method defaults to "glimpse" when a module is given, else "full". ``dtype``,
    ``device``, ``device_map`` and ``offload_folder`` are those of ``load_base``; the module goes to the model's
    execution device, in the model's dtype for fp32 / bf16 bases (fp32 otherwise). A GlimpsePrune+ module folder
    (module + LoRA adapter, ``lora.save_plus``) is loaded as a whole: the adapter is applied to the base model
    (merged into its weights unless ``merge_adapter=False``), then the module; the folder is checked before the base
    model loads. With ``device_map`` such a folder is refused: merge it first (``lora.merge_and_save``) and load the
    merged model.
    """
    from .assets import resolve_module
    from .checkpoint import adapter_record

    module = resolve_module(module)
    check_device(device)
    _check_method_args(method, module, selection, method_kwargs)
    if module is not None:
        # missing / foreign adapter files: named errors before anything loads
        if adapter_record(module) is not None and device_map is not None:
            raise ValueError(f"{module} holds a LoRA adapter (GlimpsePrune+), which cannot be applied to a model "
                             "spread by device_map: merge it first (glimpseprune.lora.merge_and_save) and load the "
                             "merged folder with the module")
    model, processor = load_base(model_dir, device, dtype, device_map=device_map, offload_folder=offload_folder)
    mod = None
    if module is not None:
        model, mod = load_plus(model, module, merge=merge_adapter, device=execution_device(model),
                               dtype=module_dtype(model))
    # default: the method of the module's kind (an early module decides before the LLM), else full
    method = method or (module_method_name(mod) if mod is not None else "full")
    if method not in MODULE_METHODS:  # a GlimpsePrune+ folder under another method: its adapter is what applies
        mod = None
    return apply(model, method, module=mod, selection=selection, processor=processor, **method_kwargs)


def _check_method_args(method: str | None, module, selection, method_kwargs: dict) -> None:
    """``load``'s method arguments, checked before the base model loads: a known method, settings it has, and a
    module it will use (another method would ignore a plain module; a GlimpsePrune+ folder still brings its
    adapter)."""
    import dataclasses

    from .checkpoint import adapter_record

    if method is not None and not isinstance(method, str):
        raise TypeError(f"method must be a method name, got {type(method).__name__} {method!r:.60}")
    if selection is not None and not isinstance(selection, SelectionConfig):
        raise TypeError(f"selection must be a glimpseprune.SelectionConfig, got {type(selection).__name__}")
    names = [method] if method is not None else list(MODULE_METHODS) if module is not None else ["full"]
    fields = {f.name for n in names for f in dataclasses.fields(get_method(n).config_class)}
    unknown = sorted(set(method_kwargs) - fields)
    if unknown:
        raise TypeError(f"load() got unknown argument(s) {unknown}: neither a load() argument nor a setting of "
                        f"method {' / '.join(names)} (its settings: {sorted(fields - {'selection'})})")
    if method is not None and method not in MODULE_METHODS:
        if module is not None and adapter_record(module) is None:
            raise ValueError(f"method {method!r} does not use the module in {module}: drop module=, or run it with "
                             f"{' / '.join(MODULE_METHODS)}")
        if selection is not None and selection != SelectionConfig():
            raise ValueError(f"selection settings apply to {sorted(MODULE_METHODS)}, not to {method!r}")
