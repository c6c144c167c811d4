"""The smaller ``glimpseprune`` commands: ask (with its overlay), make-world, train, convert, new-module,
make-tiny, tasks, methods, demo."""

from __future__ import annotations

import json
from pathlib import Path

from ..outputs import check_new_folder
from .common import _is_utf8, _note, _printable, check_device
from .method_args import SELECTION_FLAGS, _check_method, _load, _show


def _check_overlay(path: str, images: list[str], overwrite: bool = False) -> None:
    """Before the model loads: the overlay must go to an image path that is not one of the inputs, and that holds
    nothing yet, an overlay glimpseprune drew earlier (re-asking replaces it), or a file the user lets go
    (``overwrite``)."""
    from PIL import Image

    from ..bench.overlay import is_overlay
    from ..outputs import check_writable_file

    if not images:
        raise ValueError("--overlay needs an image")
    out = Path(path)
    for im in images:
        same = out.resolve() == Path(im).resolve() or (out.exists() and Path(im).exists() and out.samefile(im))
        if same:
            raise ValueError(f"--overlay {path} is the input image {im}: refusing to overwrite it; choose another path")
    if out.suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"--overlay {path}: unknown image file extension {out.suffix!r} (use .png)")
    check_writable_file(out)
    if out.exists() and not overwrite and not is_overlay(out):
        raise ValueError(f"--overlay {path} already exists and is not an overlay glimpseprune drew: refusing to "
                         "overwrite it; choose another path, or pass --overwrite to replace it")


def cmd_ask(args) -> int:
    video, image_pos, question_pos = getattr(args, "video", None), args.image_pos, args.question_pos
    if not video:  # the video options would be ignored: a user who gave them meant something
        given = [f for f, v in (("--fps", args.fps), ("--max-frames", args.max_frames)) if v is not None]
        if given:
            raise ValueError(f"{' and '.join(given)} apply to --video, which was not given")
    if args.overwrite and not args.overlay:  # it would be ignored: the only file ask writes is the overlay
        raise ValueError("--overwrite applies to --overlay, which was not given")
    if video and image_pos and question_pos is None and not args.question:
        image_pos, question_pos = None, image_pos  # `ask --video clip.mp4 "question"`
    images = list(args.image or []) + ([image_pos] if image_pos else [])
    question = args.question or question_pos
    if not question or not question.strip():
        raise ValueError("no question: give it as the second argument or with --question")
    if not _is_utf8(question):
        raise ValueError(f"the question is not valid UTF-8 text: {_printable(question)}")
    _check_method(args)
    if args.overlay:
        _check_overlay(args.overlay, [video] if video else images, args.overwrite)
    clip = None
    if video:  # decoded and checked before the model loads
        from ..video import DEFAULT_FPS, MAX_FRAMES, as_video

        clip = as_video(video, fps=DEFAULT_FPS if args.fps is None else args.fps,
                        max_frames=MAX_FRAMES if args.max_frames is None else args.max_frames, where=f"--video {video}")
    pm, _ = _load(args)
    out = pm.generate(images=[images], questions=[question], videos=None if clip is None else [clip],
                      max_new_tokens=args.max_new_tokens)
    n, N = out.n_kept[0], out.n_vis[0]
    if args.overlay and clip is not None:
        _write_contact_sheet(pm, clip, out.video_keep_masks[0], args.overlay, question, out.texts[0].strip())
        _note(args, f"wrote {args.overlay}")
    elif args.overlay:
        _write_overlay(pm, images[0], out.image_keep_masks[0], args.overlay, question, out.texts[0].strip())
        _note(args, f"wrote {args.overlay}")
    if args.json:
        print(json.dumps({"answer": out.texts[0], "kept": n, "n_vis": N, "kv_len": out.kv_len[0],
                          "prune_layer": out.prune_layer, "method": pm.method.name}))
    else:
        print(out.texts[0].strip())
        print(f"kept {n}/{N} ({100.0 * n / max(N, 1):.1f} %)")
    return 0


def _write_overlay(pm, image_path, keep, out_path, question: str | None = None, answer: str | None = None) -> None:
    """The input image at its own size, dropped tokens dimmed, kept ones outlined, with the question, the answer and
    this image's kept count in a caption band below."""
    from ..bench.overlay import grid_box, overlay, save_overlay
    from ..processing import load_image

    image = load_image(image_path)
    k = keep.cpu().numpy()
    save_overlay(overlay(image, k, box=grid_box(pm.adapter, pm.processor, image.size), question=question,
                         answer=answer, kept=int(k.sum()), total=int(k.size)), out_path)


def _write_contact_sheet(pm, clip, keep, out_path, question: str | None = None, answer: str | None = None) -> None:
    """The video's frames in a grid, each with its frame-group's kept tokens, and the caption band below."""
    from ..bench.overlay import contact_sheet, grid_box, save_overlay

    k = keep.cpu().numpy()
    tp = getattr(pm.processor.image_processor, "temporal_patch_size", 2)
    save_overlay(contact_sheet(list(clip.frames), k, temporal_patch_size=tp, fps=clip.fps,
                               box=grid_box(pm.adapter, pm.processor, clip.size), question=question, answer=answer,
                               kept=int(k.sum()), total=int(k.size)), out_path)


def cmd_make_world(args) -> int:
    from ..data.records import has_split, write_split

    if args.frames is not None and not args.video:
        raise ValueError("--frames sets the frames per clip of a --video split: pass --video too, or leave it out")
    if args.video:
        from ..data.world_video import VideoConfig, has_video_split, write_video_split

        cfg = VideoConfig() if args.frames is None else VideoConfig(frames=args.frames)
        args.frames = cfg.frames
        if not args.overwrite and has_video_split(args.out, args.n, args.seed, cfg):  # as for images: kept
            print(f"{args.out} already holds this video split (n {args.n}, seed {args.seed}, {args.frames} frames); "
                  "left as it is")
            return 0
        print(f"wrote {write_video_split(args.out, args.n, args.seed, cfg, overwrite=args.overwrite)}")
        return 0

    if not args.overwrite and has_split(args.out, args.n, args.seed):  # deterministic: the same split is kept
        print(f"{args.out} already holds this split (n {args.n}, seed {args.seed}); left as it is")
        return 0
    print(f"wrote {write_split(args.out, args.n, args.seed, overwrite=args.overwrite)}")
    return 0


def cmd_train(args) -> int:
    from ..training.stage2 import Stage2Config, load_config, train_stage2
    from ..training.trainer import train

    cfg = load_config(args.config, output_dir=args.output_dir)
    if args.device:
        check_device(args.device)
    if isinstance(cfg, Stage2Config):
        if args.merge:
            merge, run = Path(args.merge).resolve(), Path(cfg.output_dir).resolve()
            if merge == run or run in merge.parents or merge in run.parents:
                raise ValueError(f"--merge {args.merge}: the merged model needs a folder apart from the run's "
                                 f"output_dir {cfg.output_dir} (the run fills that one)")
            check_new_folder(args.merge, flag="--merge")  # before the run, not after it (merge writes a new folder)
        plus = train_stage2(cfg, resume=args.resume, overwrite=args.overwrite, device=args.device,
                            progress=not getattr(args, "quiet", False))
        print(f"wrote {plus} (glimpse module + LoRA adapter: --module {plus})")
        if args.merge:
            from ..assets import resolve_model
            from ..lora import merge_and_save

            print(f"wrote a merged base model to {merge_and_save(resolve_model(cfg.model), plus, args.merge)}")
        return 0
    if args.merge:
        raise ValueError("--merge applies to stage-2 (GlimpsePrune+) configs, which train a LoRA adapter")
    print(f"wrote {train(cfg, resume=args.resume, overwrite=args.overwrite, device=args.device)}")
    return 0


def cmd_convert(args) -> int:
    from ..checkpoint import convert_upstream

    check_new_folder(args.out, args.overwrite)
    out = convert_upstream(args.upstream, args.out, vision_depth=args.vision_depth)
    print(f"wrote {out}")
    return 0


def cmd_new_module(args) -> int:
    import torch

    from ..api import load_base
    from ..checkpoint import config_for_model, save_module
    from ..config import PRESETS
    from ..modules.glimpse import GlimpseModule
    from ..registry import get_adapter

    check_new_folder(args.out, args.overwrite)  # before the model loads
    if args.preset and args.small:
        raise ValueError("pass --preset or --small, not both")
    if args.preset and args.preset not in PRESETS:
        raise KeyError(f"unknown preset {args.preset!r}; available: {sorted(PRESETS)}")
    model, _ = load_base(args.model)
    overrides = {}
    if args.preset:
        dims = get_adapter(model).dims(model)
        want = {k: v for k, v in PRESETS[args.preset].items() if k.startswith("base_") and k != "base_model_name"}
        have = config_for_model(dims).to_dict()
        have = have.get("glimpse", have)
        off = [f"{k[5:]}: preset {v} vs model {have.get(k)}" for k, v in want.items() if have.get(k) != v]
        if off:
            raise ValueError(f"--preset {args.preset} is for another base model ({'; '.join(off)}); pick the "
                             "preset of this model, or none (the module is then sized from the model)")
        overrides = {k: v for k, v in PRESETS[args.preset].items() if not k.startswith("base_")}
    elif args.small:
        overrides = dict(vip_width=32, cond_width=32, vip_heads=2, vip_mlp_width=64)
    torch.manual_seed(args.seed)
    cfg = config_for_model(get_adapter(model).dims(model), base_model_name=str(args.model), **overrides)
    print(f"wrote untrained module to {save_module(GlimpseModule(cfg), args.out)}")
    return 0


def cmd_make_tiny(args) -> int:
    from ..testing import make_tiny

    check_new_folder(args.out, args.overwrite)
    kit = make_tiny(args.out, family=args.family, seed=args.seed)
    name = {"qwen2_5_vl": "Qwen2.5-VL", "llava": "LLaVA-1.5", "qwen3_vl": "Qwen3-VL"}.get(args.family, args.family)
    print(f"wrote a tiny RANDOM {name} ({kit['model']}), an UNTRAINED glimpse module ({kit['module']}) and "
          f"{kit['image']}; try:\n  glimpseprune ask --model {kit['model']} --module {kit['module']} "
          f"--image {kit['image']} --question 'What colour is the square?'")
    return 0


def cmd_vllm_folder(args) -> int:
    from ..registry import list_methods, method_settings
    from ..serving.folder import write_vllm_folder
    from .method_args import _parse_typed

    own = {}
    if args.method in list_methods():
        own = {s["name"]: s for s in method_settings(args.method) if s["group"] is None}
    kwargs = {}
    for item in args.method_arg or []:
        key, sep, text = (part.strip() for part in item.partition("="))
        if not sep or not key:
            raise ValueError(f"--method-arg {item!r}: expected KEY=VALUE, e.g. seed=1")
        if key == "keep_ratio":
            raise ValueError("--method-arg keep_ratio: give it as --keep-ratio")
        if key not in own:
            raise ValueError(f"--method-arg {key}: --method {args.method} has no setting {key!r}")
        kwargs[key] = _parse_typed(key, text, own[key]["type"])
    out = write_vllm_folder(args.model, args.out, args.method, args.keep_ratio, module=args.module,
                            method_args=kwargs)
    print(f"wrote {out}: vLLM prunes its images with {args.method}"
          + (f" to {args.keep_ratio:g} of their tokens" if args.keep_ratio is not None else "")
          + f" before the LLM (needs `pip install 'glimpseprune[vllm]'` in vLLM's environment); serve it with:\n"
          f"  vllm serve {out}")
    return 0


def cmd_tasks(args) -> int:
    from ..eval.tasks import get_task, list_tasks

    for name in list_tasks():
        t = get_task(name)
        print(f"{name:16s} {t.metric:16s} {t.download}")
    return 0


def cmd_methods(args) -> int:
    from ..registry import describe_method, list_methods

    infos = [describe_method(name) for name in list_methods()]
    if args.json:
        print(json.dumps(infos, default=str))
        return 0
    rows = [("method", "where it prunes", "what it does")] + [(m["name"], m["where"], m["summary"]) for m in infos]
    w0, w1 = (max(len(r[i]) for r in rows) for i in (0, 1))
    print(f"{rows[0][0]:{w0}}  {rows[0][1]:{w1}}  {rows[0][2]}")
    for m in infos:
        print(f"{m['name']:{w0}}  {m['where']:{w1}}  {m['summary']}")
        settings = [s for s in m["settings"] if s["group"] is None]
        if settings:
            print(f"{'':{w0}}  settings: " + ", ".join(f"{s['name']}={_show(s['default'])}" for s in settings))
        if m["needs"] == "a trained module":
            print(f"{'':{w0}}  needs --module; selection: " + ", ".join(
                f"{SELECTION_FLAGS.get(s['name'], s['name'])} {_show(s['default'])}" for s in m["settings"]
                if s["group"] is not None))
        elif m["needs"]:
            print(f"{'':{w0}}  needs {m['needs']} (Python API, or the oracle in `compare --split`)")
    print("\nL is the LLM's depth, layers count from 0. ask / eval: --method NAME --method-arg KEY=VALUE (repeat); "
          "compare: --methods NAME ...")
    return 0


def cmd_demo(args) -> int:
    check_device(args.device)
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ValueError("the demo needs gradio: pip install 'glimpseprune[demo]'") from None
    import socket

    try:  # before the model loads: a busy port or a bad host would otherwise fail only after loading
        with socket.create_server((args.host, args.port)):
            pass
    except OSError as err:
        raise ValueError(f"cannot serve on --host {args.host} --port {args.port}: {err.strerror or err} (another "
                         "server there? pick another --port)") from None
    from ..demo import launch

    _note(args, f"serving the demo on http://{args.host}:{args.port}/ (Ctrl+C stops it)")
    launch(args.model, args.module, host=args.host, port=args.port, device=args.device, dtype=args.dtype,
           max_new_tokens=args.max_new_tokens)
    return 0
