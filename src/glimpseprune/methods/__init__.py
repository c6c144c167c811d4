"""Pruning methods, registered by name."""

from .base import MethodConfig, PruningMethod
from .full import FullMethod
from .glimpse import GlimpseMethod, GlimpseMethodConfig
from .mask import MaskConfig, MaskMethod

__all__ = ["FullMethod", "GlimpseMethod", "GlimpseMethodConfig", "MaskConfig", "MaskMethod", "MethodConfig",
           "PruningMethod"]
