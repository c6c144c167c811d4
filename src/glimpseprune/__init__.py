"""glimpseprune: dynamic visual-token pruning for vision-language models (GlimpsePrune and peers).

Example::

    import glimpseprune as gp
    pm = gp.load("path/to/Qwen2.5-VL-7B-Instruct", module="path/to/glimpse-module")
    out = pm.generate(images=[["photo.jpg"]], questions=["What colour is the car?"])
    print(out.texts[0], f"kept {out.n_kept[0]}/{out.n_vis[0]}")
"""

__version__ = "0.1.0"

from .api import PrunedModel, PruneOutput, apply, load, load_base, make_method
from .checkpoint import config_for_model, convert_upstream, load_module, save_module
from .config import GlimpseConfig, SelectionConfig, preset
from .modules.glimpse import GlimpseModule
from .ops.select import select_tokens
from .registry import get_adapter, get_method, list_adapters, list_methods, register_method
from .video import Video, load_video

__all__ = [
    "GlimpseConfig", "GlimpseModule", "PruneOutput", "PrunedModel", "SelectionConfig", "apply", "config_for_model",
    "convert_upstream", "get_adapter", "get_method", "list_adapters", "list_methods", "load", "load_base",
    "load_module", "make_method", "preset", "register_method", "save_module", "select_tokens", "Video", "load_video",
]
