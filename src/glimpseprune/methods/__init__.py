"""Pruning methods, registered by name."""

from .base import MethodConfig, PruningMethod
from .cdpruner import CDPrunerConfig, CDPrunerMethod
from .divprune import DivPruneConfig, DivPruneMethod
from .downsample import DownsampleConfig, DownsampleMethod
from .early_glimpse import EarlyGlimpseConfig, EarlyGlimpseMethod
from .fastv import FastVConfig, FastVMethod
from .full import FullMethod
from .glimpse import GlimpseMethod, GlimpseMethodConfig
from .glimpse_attn import GlimpseAttnConfig, GlimpseAttnMethod
from .mask import MaskConfig, MaskMethod
from .oracle import OracleConfig, OracleMethod
from .pdrop import PDropConfig, PDropMethod
from .random import RandomConfig, RandomMethod
from .visionzip import VisionZipConfig, VisionZipMethod
from .vscan import VScanConfig, VScanMethod

__all__ = ["CDPrunerConfig", "CDPrunerMethod", "DivPruneConfig", "DivPruneMethod", "DownsampleConfig",
           "DownsampleMethod", "EarlyGlimpseConfig", "EarlyGlimpseMethod", "FastVConfig", "FastVMethod",
           "FullMethod", "GlimpseAttnConfig", "GlimpseAttnMethod", "GlimpseMethod", "GlimpseMethodConfig",
           "MaskConfig", "MaskMethod", "MethodConfig", "OracleConfig", "OracleMethod", "PDropConfig", "PDropMethod",
           "PruningMethod", "RandomConfig", "RandomMethod", "VScanConfig", "VScanMethod", "VisionZipConfig",
           "VisionZipMethod"]
