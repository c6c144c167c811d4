"""Model-family adapters, registered by ``model_type``."""

from ..registry import register_adapter
from .base import Adapter, Encoded, ModelDims
from .llava import LlavaAdapter
from .qwen2_5_vl import Qwen2_5_VLAdapter
from .qwen3_vl import Qwen3VLAdapter

register_adapter(Qwen2_5_VLAdapter())
register_adapter(LlavaAdapter())
register_adapter(Qwen3VLAdapter())

__all__ = ["Adapter", "Encoded", "LlavaAdapter", "ModelDims", "Qwen2_5_VLAdapter", "Qwen3VLAdapter"]
