"""Registries of pruning methods and model-family adapters, with fail-fast checks."""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
import types
import typing
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .adapters.base import Adapter
    from .methods.base import PruningMethod

METHODS: dict[str, type[PruningMethod]] = {}
ADAPTERS: dict[str, Adapter] = {}
MODULE_METHODS = ("glimpse", "early_glimpse")  # methods that run a trained module and take its SelectionConfig


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


# --------------------------------------------------------------------------- describing methods (listings, CLI)

# LLM depths at which a method's default schedule is read to name its layers (multiples of 4: L/4 - 1 is exact)
_SAMPLE_DEPTHS = (24, 28, 32, 36, 40, 48)


def method_settings(name: str) -> list[dict[str, Any]]:
    """The settings of method ``name``: one dict per field of its config class, ``{"name", "type", "default",
    "group"}`` (``type`` a resolved type hint; a nested config's fields come flattened, ``group`` naming the field
    that holds them, else None). Example: ``[s["name"] for s in method_settings("fastv")] == ["keep_ratio",
    "prune_layer"]``."""
    return _fields(get_method(name).config_class, None)


def _fields(config_class: type, group: str | None) -> list[dict[str, Any]]:
    hints = typing.get_type_hints(config_class)
    out: list[dict[str, Any]] = []
    for f in dataclasses.fields(config_class):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out += _fields(hint, f.name)
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        out.append({"name": f.name, "type": hint, "default": default, "group": group})
    return out


def type_name(hint: Any) -> str:
    """A setting's type in words: ``int | None`` -> "int or none", ``tuple[int, ...]`` -> "ints (a,b,...)"."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join([type_name(a) for a in args] + ["none"])
    if typing.get_origin(hint) is tuple:
        return f"{type_name(args[0])}s (a,b,...)" if args else "list (a,b,...)"
    return getattr(hint, "__name__", str(hint))


def describe_method(name: str) -> dict[str, Any]:
    """What ``glimpseprune methods`` shows of a method: ``{"name", "summary", "where", "needs", "settings"}``.

    ``summary``: the first sentence of its module docstring, without markup; ``where``: where its default schedule
    prunes, read from ``prune_layers`` at several LLM depths L ("before the LLM", "after layer 1", "after layer
    L/2-1", ...); ``needs``: what a request must bring besides images and question ("a trained module", "keep masks
    per request") or None; ``settings``: ``{"name", "type", "default", "group"}`` with the type in words.
    """
    cls = get_method(name)
    settings = [{**s, "type": type_name(s["type"])} for s in method_settings(name)]
    return {"name": name, "summary": _summary(sys.modules[cls.__module__].__doc__ or cls.__doc__ or ""),
            "where": _where(cls), "needs": _needs(cls), "settings": settings}


def _needs(cls: type) -> str | None:
    from .methods.mask import MaskMethod

    if issubclass(cls, MaskMethod):
        return "keep masks per request"
    if "module" in inspect.signature(cls.__init__).parameters:
        return "a trained module"
    return None


def _summary(doc: str) -> str:
    """First sentence of the first paragraph of a docstring, without the ````name``:```` lead and RST markup."""
    para = " ".join(doc.strip().split("\n\n")[0].split())
    para = re.sub(r"^``\w+``\s*:\s*", "", para)
    para = re.sub(r":\w+:`~?([^`]+)`", r"\1", para)  # :func:`x` -> x
    para = re.sub(r"`+([^`]+)`+", r"\1", para)
    first = re.split(r"(?<=[.!?])\s+(?=[A-Z(])", para, maxsplit=1)[0].strip()
    if not first:
        return ""
    first = first[0].upper() + first[1:]
    return first if first.endswith((".", "!", "?")) else first + "."


def _where(cls: type) -> str:
    try:
        method = cls()
        schedules = [tuple(method.prune_layers(n)) for n in _SAMPLE_DEPTHS]
    except (TypeError, ValueError):  # needs what only a request or a checkpoint brings (a module)
        if getattr(cls, "prunes_before_llm", False):  # decides before the LLM; its module may drop after layer K
            return "before the LLM (or after drop_layer)"
        return "after its module's LLM layer K" if _needs(cls) == "a trained module" else "set per request"
    if not schedules[0]:
        return "nowhere (keeps every token)"
    if len({len(s) for s in schedules}) != 1:
        return "after layers that depend on the LLM's depth"
    stages = [_layer_expr([s[i] for s in schedules]) for i in range(len(schedules[0]))]
    parts = ["before the LLM"] if stages[0] == "-1" else []
    inside = [s for s in stages if s != "-1"]
    if inside:
        parts.append(("after LLM layer " if len(inside) == 1 else "after LLM layers ") + ", ".join(inside))
    return " + ".join(parts)


def _layer_expr(values: list[int]) -> str:
    """A stage's layer over ``_SAMPLE_DEPTHS`` as an expression of the depth L: "-1", "1", "L/2-1", "ceil(2L/3)-1"."""
    from fractions import Fraction

    from .config import default_prune_layer

    if len(set(values)) == 1:
        return str(values[0])
    if values == [default_prune_layer(n) for n in _SAMPLE_DEPTHS]:
        return "ceil(2L/3)-1"
    fracs = {Fraction(v + 1, n) for v, n in zip(values, _SAMPLE_DEPTHS)}
    if len(fracs) == 1:
        f = fracs.pop()
        return f"{'' if f.numerator == 1 else f.numerator}L{'' if f.denominator == 1 else f'/{f.denominator}'}-1"
    return f"{values[_SAMPLE_DEPTHS.index(32)]} of 32"
