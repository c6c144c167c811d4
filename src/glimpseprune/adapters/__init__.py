"""Model-family adapters, registered by ``model_type``."""

from ..registry import register_adapter
from .base import Adapter, Encoded, ModelDims
from .qwen2_5_vl import Qwen2_5_VLAdapter

register_adapter(Qwen2_5_VLAdapter())

__all__ = ["Adapter", "Encoded", "ModelDims", "Qwen2_5_VLAdapter"]
