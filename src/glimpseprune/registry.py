"""Registries of pruning methods and model-family adapters, with fail-fast checks."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .adapters.base import Adapter
    from .methods.base import PruningMethod

METHODS: dict[str, type[PruningMethod]] = {}
ADAPTERS: dict[str, Adapter] = {}


def register_method(cls: type[PruningMethod]) -> type[PruningMethod]:
    """Class decorator: register a method under ``cls.name`` (unique, non-empty)."""
    name = getattr(cls, "name", "")
    if not name or not name.isidentifier():
        raise ValueError(f"method class {cls.__name__} needs a `name` that is an identifier, got {name!r}")
    if name in METHODS and METHODS[name] is not cls:
        raise ValueError(f"method name {name!r} is already registered by {METHODS[name].__name__}")
    METHODS[name] = cls
    return cls


def register_adapter(adapter: Adapter) -> Adapter:
    for mt in adapter.model_types:
        if mt in ADAPTERS and type(ADAPTERS[mt]) is not type(adapter):
            raise ValueError(f"model_type {mt!r} already has adapter {type(ADAPTERS[mt]).__name__}")
        ADAPTERS[mt] = adapter
    return adapter


def _load_builtins() -> None:
    from . import adapters as _a  # noqa: F401
    from . import methods as _m  # noqa: F401


def get_method(name: str) -> type[PruningMethod]:
    _load_builtins()
    if name not in METHODS:
        raise KeyError(f"unknown pruning method {name!r}; available: {list_methods()}")
    return METHODS[name]


def list_methods() -> list[str]:
    _load_builtins()
    return sorted(METHODS)


def get_adapter(model_or_type) -> Adapter:
    _load_builtins()
    mt = model_or_type if isinstance(model_or_type, str) else getattr(model_or_type.config, "model_type", None)
    if mt not in ADAPTERS:
        raise ValueError(f"no adapter for model_type {mt!r}; supported: {sorted(ADAPTERS)}")
    return ADAPTERS[mt]


def list_adapters() -> list[str]:
    _load_builtins()
    return sorted(ADAPTERS)
