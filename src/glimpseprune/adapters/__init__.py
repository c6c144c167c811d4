"""Model-family adapters, registered by ``model_type``."""

from ..registry import register_adapter
from .base import Adapter, Encoded, ModelDims
from .llava import LlavaAdapter
from .qwen2_5_vl import Qwen2_5_VLAdapter

register_adapter(Qwen2_5_VLAdapter())
register_adapter(LlavaAdapter())

__all__ = ["Adapter", "Encoded", "LlavaAdapter", "ModelDims", "Qwen2_5_VLAdapter"]
