"""``--method`` / ``--method-arg`` and GlimpsePrune's selection flags: checked before anything loads, then the
model, module and method they name loaded (``ask``, ``eval``)."""

from __future__ import annotations

import re
import typing

from .common import check_device

# GlimpsePrune's selection knobs (SelectionConfig fields) and the flags that set them
SELECTION_FLAGS = {"threshold": "--threshold", "max_keep_ratio": "--max-keep-ratio", "min_keep": "--min-keep",
                   "fixed_keep_ratio": "--fixed-keep-ratio"}


def _selection(args):
    """The SelectionConfig of the flags; a bad value is an error naming the flag, not the field."""
    from ..config import SelectionConfig

    try:
        return SelectionConfig(**{field: getattr(args, field) for field in SELECTION_FLAGS})
    except (ValueError, TypeError) as err:
        raise ValueError(re.sub(r"\b(" + "|".join(SELECTION_FLAGS) + r")\b", lambda m: SELECTION_FLAGS[m[1]],
                                str(err))) from None


def _check_method(args) -> None:
    """Before anything loads: ``--method`` names a registered method that runs on images and a question alone,
    ``--method-arg`` fits its config, the selection flags go with glimpse. Sets ``args.method_kwargs``."""
    from ..registry import MODULE_METHODS, describe_method, get_method, list_methods, method_settings

    selection = _selection(args)  # bad flag values first, whatever the method
    args.method_kwargs = {}
    name = args.method
    if name is None:
        if args.method_arg:
            raise ValueError("--method-arg needs --method NAME (see `glimpseprune methods`)")
        return
    if name not in list_methods():
        raise ValueError(f"--method {name!r} is not a registered method; available: {', '.join(list_methods())}")
    info = describe_method(name)
    if info["needs"] == "keep masks per request":
        raise ValueError(f"--method {name} keeps the tokens given per request (ground-truth boxes or keep masks), "
                         "which ask and eval cannot supply: `glimpseprune compare --split` runs the oracle on a world "
                         "split's boxes; masks go through the Python API (generate(..., keep_masks=...))")
    if info["needs"] == "a trained module" and _module_arg(args) is None:
        raise ValueError(f"--method {name} needs a trained glimpse module: pass --module DIR")
    changed = [flag for field, flag in SELECTION_FLAGS.items()
               if getattr(selection, field) != getattr(type(selection)(), field)]
    own = {s["name"]: s for s in method_settings(name) if s["group"] is None}  # s["type"]: the resolved hint
    if changed and name not in MODULE_METHODS:
        hint = f"its own settings go in --method-arg KEY=VALUE ({_known_settings(own)})" if own else \
            "it has no settings"
        raise ValueError(f"{', '.join(changed)} set GlimpsePrune's selection and do nothing for --method {name}: "
                         f"{hint}")
    for item in args.method_arg or []:
        key, sep, text = (part.strip() for part in item.partition("="))
        if not sep or not key:
            raise ValueError(f"--method-arg {item!r}: expected KEY=VALUE, e.g. keep_ratio=0.25")
        if key in SELECTION_FLAGS and key not in own:
            raise ValueError(f"--method-arg {key}: set {name}'s selection with {', '.join(SELECTION_FLAGS.values())}")
        if key not in own:
            known = f"its settings (defaults): {_known_settings(own)}" if own else "it has no settings"
            raise ValueError(f"--method-arg {key}: --method {name} has no setting {key!r}; {known}")
        if key in args.method_kwargs:
            raise ValueError(f"--method-arg {key} is given twice; give each setting once")
        args.method_kwargs[key] = _parse_typed(key, text, own[key]["type"])
    try:
        if name in MODULE_METHODS:  # their settings may depend on the selection (early_glimpse fill="diverse")
            get_method(name).config_class(selection=selection, **args.method_kwargs)
        else:
            get_method(name).config_class(**args.method_kwargs)
    except (ValueError, TypeError) as err:
        raise ValueError(f"--method {name} --method-arg: {err}") from None


def _known_settings(settings: dict) -> str:
    return ", ".join(f"{k}={_show(s['default'])}" for k, s in settings.items())


def _show(value) -> str:
    """A default as one would type it in --method-arg: none, true, 0.333333, 7,15,23."""
    if value is None or isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return ",".join(_show(v) for v in value)
    return str(value)


def _parse_typed(key: str, text: str, hint):
    """``text`` of ``--method-arg key=text`` as the config field's type: int, float, bool, str, a tuple
    (comma-separated) or any of them or none."""
    from ..registry import type_name

    options = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = len(options) < len(typing.get_args(hint))
    base = options[0] if optional and len(options) == 1 else hint
    if optional and text.lower() in ("none", "null"):
        return None
    try:
        if base is bool:
            if text.lower() in ("true", "1", "yes", "on"):
                return True
            if text.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError(text)
        if typing.get_origin(base) is tuple:
            elem = (typing.get_args(base) or (str,))[0]
            return tuple(elem(x.strip()) for x in text.split(",") if x.strip())
        if base in (int, float):
            return base(text)
    except ValueError:
        raise ValueError(f"--method-arg {key}={text}: expected {type_name(hint)}") from None
    return text


def _module_arg(args):
    """--module as given; without it, the embedded module goes with the embedded model (else none)."""
    from ..assets import EMBEDDED

    return args.module if args.module is not None else (EMBEDDED if args.model == EMBEDDED else None)


def _load(args):
    """(PrunedModel, whether the module folder is used): glimpse uses its module; any other method runs without
    one, except that a GlimpsePrune+ folder still brings its LoRA adapter (the GP+ model)."""
    import torch

    from ..api import load
    from ..assets import resolve_model, resolve_module
    from ..checkpoint import adapter_record
    from ..registry import MODULE_METHODS

    check_device(args.device)
    module = resolve_module(_module_arg(args))
    if args.method not in (None, *MODULE_METHODS) and (module is None or adapter_record(module) is None):
        module = None
    pm = load(resolve_model(args.model), module=module, method=args.method, selection=_selection(args),
              device=args.device, dtype=getattr(torch, args.dtype), **getattr(args, "method_kwargs", {}))
    return pm, module is not None


def _run_meta(args, pm, module_used: bool) -> dict:
    """What a summary records of the method and its settings."""
    import dataclasses

    return {"model": args.model, "module": (args.module or "embedded") if module_used else None,
            "method": pm.method.name, "method_config": dataclasses.asdict(pm.method.config),
            "selection": dataclasses.asdict(_selection(args))}
