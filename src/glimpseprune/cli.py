"""The ``glimpseprune`` command. Thin: parses arguments and calls the library.

    glimpseprune ask --model DIR --module DIR --image PATH --question TEXT
    glimpseprune convert --upstream DIR --out DIR
    glimpseprune new-module --model DIR --out DIR [--preset NAME]
    glimpseprune make-tiny --out DIR      (tiny random model + untrained module + image, for a smoke run)
    glimpseprune methods
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _selection(args):
    from .config import SelectionConfig

    return SelectionConfig(threshold=args.threshold, max_keep_ratio=args.max_keep_ratio, min_keep=args.min_keep,
                           fixed_keep_ratio=args.fixed_keep_ratio)


def cmd_ask(args) -> int:
    import torch

    from .api import load

    sel = _selection(args)
    pm = load(args.model, module=args.module, method=args.method, selection=sel, device=args.device,
              dtype=getattr(torch, args.dtype))
    out = pm.generate(images=[args.image or []], questions=[args.question], max_new_tokens=args.max_new_tokens)
    n, N = out.n_kept[0], out.n_vis[0]
    if args.json:
        print(json.dumps({"answer": out.texts[0], "kept": n, "n_vis": N, "kv_len": out.kv_len[0],
                          "prune_layer": out.prune_layer}))
    else:
        print(out.texts[0].strip())
        print(f"kept {n}/{N} ({100.0 * n / max(N, 1):.1f} %)")
    return 0


def cmd_convert(args) -> int:
    from .checkpoint import convert_upstream

    out = convert_upstream(args.upstream, args.out)
    print(f"wrote {out}")
    return 0


def cmd_new_module(args) -> int:
    import torch

    from .api import load_base
    from .checkpoint import config_for_model, save_module
    from .config import PRESETS
    from .modules.glimpse import GlimpseModule
    from .registry import get_adapter

    model, _ = load_base(args.model)
    overrides = {}
    if args.preset:
        if args.preset not in PRESETS:
            raise KeyError(f"unknown preset {args.preset!r}; available: {sorted(PRESETS)}")
        overrides = {k: v for k, v in PRESETS[args.preset].items() if not k.startswith("base_")}
    elif args.small:
        overrides = dict(vip_width=32, cond_width=32, vip_heads=2, vip_mlp_width=64)
    torch.manual_seed(args.seed)
    cfg = config_for_model(get_adapter(model).dims(model), base_model_name=str(args.model), **overrides)
    print(f"wrote untrained module to {save_module(GlimpseModule(cfg), args.out)}")
    return 0


def cmd_make_tiny(args) -> int:
    from pathlib import Path

    import torch

    from .api import load_base
    from .checkpoint import config_for_model, save_module
    from .modules.glimpse import GlimpseModule
    from .registry import get_adapter
    from .testing import build_tiny_qwen2_5_vl, random_image

    out = Path(args.out)
    model_dir = build_tiny_qwen2_5_vl(out / "model", seed=args.seed)
    model, _ = load_base(model_dir)
    torch.manual_seed(args.seed)
    cfg = config_for_model(get_adapter(model).dims(model), base_model_name=str(model_dir),
                           vip_width=32, cond_width=32, vip_heads=2, vip_mlp_width=64)
    save_module(GlimpseModule(cfg), out / "module")
    random_image(448, 336, seed=args.seed).save(out / "example.png")
    print(f"wrote a tiny RANDOM Qwen2.5-VL ({model_dir}), an UNTRAINED glimpse module ({out / 'module'}) and "
          f"{out / 'example.png'}; try:\n  glimpseprune ask --model {model_dir} --module {out / 'module'} "
          f"--image {out / 'example.png'} --question 'What colour is the square?'")
    return 0


def cmd_methods(args) -> int:
    from .registry import get_method, list_methods

    for name in list_methods():
        doc = (sys.modules[get_method(name).__module__].__doc__ or "").strip().splitlines()[0]
        print(f"{name:10s} {doc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glimpseprune", description="Dynamic visual-token pruning for VLMs (offline).")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    sub = p.add_subparsers(dest="cmd", required=True)

    a = sub.add_parser("ask", help="answer one question about image(s), printing the answer and `kept n/N`")
    a.add_argument("--model", required=True, help="local Hugging Face directory of the base VLM")
    a.add_argument("--module", help="directory of a glimpse module (glimpse_config.json + .safetensors)")
    a.add_argument("--image", action="append", help="image file; repeat for several images")
    a.add_argument("--question", required=True, help="the question text")
    a.add_argument("--method", choices=["full", "glimpse"], help="default: glimpse with --module, else full")
    a.add_argument("--threshold", type=float, default=0.5, help="keep a token when its probability > this")
    a.add_argument("--max-keep-ratio", type=float, help="cap on the kept fraction per sample (top-k)")
    a.add_argument("--min-keep", type=int, default=1, help="keep at least this many visual tokens per sample")
    a.add_argument("--fixed-keep-ratio", type=float, help="keep exactly this fraction (matched-budget mode)")
    a.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate")
    a.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    a.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="base model dtype")
    a.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    a.set_defaults(fn=cmd_ask)

    c = sub.add_parser("convert", help="convert an upstream release (config.json + new_modules_gp.pt)")
    c.add_argument("--upstream", required=True, help="upstream module directory")
    c.add_argument("--out", required=True, help="output directory")
    c.set_defaults(fn=cmd_convert)

    n = sub.add_parser("new-module", help="write an untrained glimpse module sized for a base model")
    n.add_argument("--model", required=True, help="local base model directory")
    n.add_argument("--out", required=True, help="output directory")
    n.add_argument("--preset", help="named preset (qwen2_5_vl_7b, qwen2_5_vl_3b)")
    n.add_argument("--small", action="store_true", help="small VIP widths for tiny test models")
    n.add_argument("--seed", type=int, default=0, help="initialisation seed")
    n.set_defaults(fn=cmd_new_module)

    t = sub.add_parser("make-tiny", help="write a tiny random Qwen2.5-VL (DIR/model), an untrained module "
                       "(DIR/module) and an image (DIR/example.png), for demos and tests")
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--seed", type=int, default=0, help="initialisation seed")
    t.set_defaults(fn=cmd_make_tiny)

    m = sub.add_parser("methods", help="list the registered pruning methods")
    m.set_defaults(fn=cmd_methods)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
