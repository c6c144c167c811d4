"""The embedded default shipped inside the package: ``world/model`` (a tiny Qwen2.5-VL trained from scratch on the
synthetic world by ``glimpseprune.training.world_model``) and ``world/module`` (its stage-1 glimpse module, pruning
after layer 2 of 4), plus ``world/module_k0`` (the same recipe pruning after layer 0: ``"embedded-k0"``)."""

from __future__ import annotations

from pathlib import Path

WORLD = Path(__file__).parent / "world"
EMBEDDED = "embedded"
MODULES = {EMBEDDED: "module", "embedded-k0": "module_k0"}  # packaged module names -> folders under world/


def resolve_model(name: str | Path) -> Path:
    """A model directory: ``"embedded"`` is the packaged world model, anything else is a local path."""
    if str(name) == EMBEDDED:
        path = WORLD / "model"
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"the embedded model is missing from {path}; reinstall glimpseprune")
        return path
    return Path(name)


def resolve_module(name: str | Path | None) -> Path | None:
    """A module directory: ``"embedded"`` is the packaged world module (K = 2), ``"embedded-k0"`` the one trained to
    prune after layer 0 (cheaper prefill, see the README); anything else is a local path."""
    if name is not None and str(name) in MODULES:
        path = WORLD / MODULES[str(name)]
        if not path.is_dir():
            raise FileNotFoundError(f"the packaged glimpse module {name!r} is missing from {path}; reinstall "
                                    "glimpseprune")
        return path
    return None if name is None else Path(name)
