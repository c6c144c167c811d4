"""Write a model folder that vLLM serves pruned: ``glimpseprune vllm-folder --model DIR --method M --keep-ratio R``.

The new folder links every file of the base folder (weights are not copied), except ``config.json``, which gets the
architecture ``GlimpsePruneQwen2_5_VLForConditionalGeneration`` and a ``glimpseprune`` section; a module method's
module is copied into ``glimpse_module/``. Everything is checked before anything is written, and a folder that
already holds files is refused (it may be another run's).
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

from ..outputs import read_json
from .spec import ARCHITECTURE, MODULE_DIR, SECTION, ServeSpec


def section_for(method: str, keep_ratio: float | None, module: str | Path | None = None,
                method_args: dict[str, Any] | None = None) -> dict[str, Any]:
    section: dict[str, Any] = {"method": method}
    if keep_ratio is not None:
        section["keep_ratio"] = keep_ratio
    if module is not None:
        section["module"] = str(module)
    if method_args:
        section["method_args"] = dict(method_args)
    return section


def _check_module(module: Path, model_dir: Path, method: str) -> None:
    """The module's config is readable, of the kind the method runs, and made for this base model."""
    from transformers import AutoConfig

    from ..checkpoint import _read_meta, check_compatible
    from .spec import qwen2_5_vl_dims

    try:
        _, cfg = _read_meta(module)
    except (OSError, ValueError) as e:
        raise ValueError(f"module {str(module)!r}: {e}") from None
    want = "early" if method == "early_glimpse" else "glimpse"
    if cfg.kind != want:
        raise ValueError(f"module {str(module)!r} is of kind {cfg.kind!r}; method {method!r} needs kind {want!r}")
    if cfg.kind == "early" and cfg.prune_layer != -1:
        raise ValueError(f"module {str(module)!r} drops its tokens after LLM layer {cfg.prune_layer} (prune_layer); "
                         "a server with one KV length per request for all layers can only prune before the LLM "
                         "(an early module with prune_layer -1)")
    check_compatible(cfg, qwen2_5_vl_dims(AutoConfig.from_pretrained(str(model_dir), local_files_only=True)))


def write_vllm_folder(model_dir: str | Path, out_dir: str | Path, method: str, keep_ratio: float | None = None,
                      module: str | Path | None = None, method_args: dict[str, Any] | None = None) -> Path:
    """``out_dir``: ``model_dir`` opted in to pruning with ``method`` at ``keep_ratio`` in vLLM. Returns its path."""
    src, out = Path(model_dir), Path(out_dir)
    cfg_file = src / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{src} is not a model folder: it has no config.json")
    config = read_json(cfg_file)
    if not isinstance(config, dict):
        raise ValueError(f"{cfg_file}: expected a JSON object, got {type(config).__name__}")
    if config.get("model_type") != "qwen2_5_vl":
        raise ValueError(f"{src} holds a {config.get('model_type')!r} model; the vLLM plugin serves Qwen2.5-VL "
                         "(model_type 'qwen2_5_vl') only")
    if module is not None:
        module = Path(module).resolve()
    ServeSpec.from_section(section_for(method, keep_ratio, module, method_args))  # every field checked first
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists and is not an empty folder; choose a new output folder")
    if out.resolve() == src.resolve():
        raise ValueError("the output folder must differ from the model folder")
    if src.resolve() in out.resolve().parents:
        raise ValueError(f"the output folder {out} lies inside the model folder {src}: it would link itself; "
                         "choose a folder outside it")
    if module is not None:
        _check_module(module, src, method)
    entries = [f for f in sorted(src.iterdir())  # an opted-in base's own module is replaced, not linked
               if f.name not in ("config.json", MODULE_DIR) and not f.name.startswith(".")]
    from ..outputs import ensure_writable_dir

    ensure_writable_dir(out.parent)  # a file in its path, a read-only file system: named, not an errno
    work = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:12]}"
    work.mkdir()  # the usual permissions (mkdtemp's 0700 would keep other users, e.g. a server's, out)
    try:  # written beside it and renamed at the end: a failure leaves no half-made folder
        for f in entries:
            (work / f.name).symlink_to(f.resolve())
        stored = None
        if module is not None:
            shutil.copytree(module, work / MODULE_DIR)
            stored = MODULE_DIR
        config["architectures"] = [ARCHITECTURE]
        config[SECTION] = section_for(method, keep_ratio, stored, method_args)
        (work / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        work.rename(out)  # onto nothing or an empty folder
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out
