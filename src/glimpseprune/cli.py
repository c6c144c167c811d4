"""The ``glimpseprune`` command. Thin: parses arguments and calls the library.

    glimpseprune ask IMAGE "QUESTION" [--overlay out.png]      (the embedded world model + module)
    glimpseprune ask --model DIR --module DIR --image PATH --question TEXT
    glimpseprune eval --split records.jsonl --out DIR     (exact match + kept fractions)
    glimpseprune compare --split records.jsonl --out DIR  (methods x budgets: JSON per run, table, plot)
    glimpseprune make-world --out DIR --n 500 --seed 1    (a split of the synthetic world)
    glimpseprune train --config configs/stage1_world.yaml [--resume]
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


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (``--limit 0`` or ``--batch-size -1`` is an error, not an empty run)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def check_device(name: str) -> str:
    """A torch device this machine has, or ``ValueError`` naming what is missing (before any model loads)."""
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"--device {name!r} is not a torch device ({err})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here (torch {torch.__version__})")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available here")
    return name


def _selection(args):
    from .config import SelectionConfig

    return SelectionConfig(threshold=args.threshold, max_keep_ratio=args.max_keep_ratio, min_keep=args.min_keep,
                           fixed_keep_ratio=args.fixed_keep_ratio)


def _module_arg(args):
    """--module as given; without it, the embedded module goes with the embedded model (else none)."""
    from .assets import EMBEDDED

    return args.module if args.module is not None else (EMBEDDED if args.model == EMBEDDED else None)


def _load(args):
    import torch

    from .api import load
    from .assets import resolve_model, resolve_module
    from .checkpoint import adapter_record

    check_device(args.device)
    module = resolve_module(_module_arg(args))
    if args.method == "full" and (module is None or adapter_record(module) is None):
        module = None  # keep-all needs no module; a GlimpsePrune+ folder still brings its adapter (the GP+ model)
    return load(resolve_model(args.model), module=module, method=args.method,
                selection=_selection(args), device=args.device, dtype=getattr(torch, args.dtype))


def _check_overlay(path: str, images: list[str]) -> None:
    """Before the model loads: the overlay must go to a new PNG-able path that is not one of the inputs."""
    from pathlib import Path

    from PIL import Image

    from .outputs import check_writable_file

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


def cmd_ask(args) -> int:
    images = list(args.image or []) + ([args.image_pos] if args.image_pos else [])
    question = args.question or args.question_pos
    if not question:
        raise ValueError("no question: give it as the second argument or with --question")
    if not _is_utf8(question):
        raise ValueError(f"the question is not valid UTF-8 text: {_printable(question)}")
    if args.overlay:
        _check_overlay(args.overlay, images)
    pm = _load(args)
    out = pm.generate(images=[images], questions=[question], max_new_tokens=args.max_new_tokens)
    n, N = out.n_kept[0], out.n_vis[0]
    if args.overlay:
        _write_overlay(pm, images[0], out.image_keep_masks[0], args.overlay)
    if args.json:
        print(json.dumps({"answer": out.texts[0], "kept": n, "n_vis": N, "kv_len": out.kv_len[0],
                          "prune_layer": out.prune_layer}))
    else:
        print(out.texts[0].strip())
        print(f"kept {n}/{N} ({100.0 * n / max(N, 1):.1f} %)")
    return 0


def _write_overlay(pm, image_path, keep, out_path) -> None:
    from .bench.overlay import overlay
    from .processing import load_image

    view = pm.adapter.token_view(pm.model, pm.processor, load_image(image_path))
    overlay(view, keep.cpu().numpy()).save(out_path)
    print(f"wrote {out_path}")


# judge_cache/ is not a result: --overwrite keeps it (its answers are keyed by judge model + prompt, so reusing them
# is exact, and asking again costs the user)
EVAL_OWNED = ["samples.jsonl", "samples.rank*.jsonl", "summary.json", "errors.jsonl", "errors.rank*.jsonl",
              "summary.md", "relative.json", "full"]


def _eval_one(args, method: str | None, out, resume: bool) -> dict:
    import dataclasses

    from .bench.accuracy import RecordError, read_rows, run
    from .outputs import atomic_write_json, ensure_writable_dir

    args = argparse.Namespace(**{**vars(args), "method": method})
    ensure_writable_dir(out)
    samples, errors = out / "samples.jsonl", out / "errors.jsonl"
    done = read_rows(samples) if resume else []
    if resume and done:
        print(f"resuming {out}: {len(done)} samples already evaluated")
    pm = _load(args)
    meta = {"model": args.model, "module": None if pm.method.name == "full" else (args.module or "embedded"),
            "method": pm.method.name, "selection": dataclasses.asdict(_selection(args))}
    # rows are written as they come (a crash or a bad record keeps what was done); resume rewrites the file whole
    # first, so a torn last line of the interrupted run is gone
    if done:
        atomic_write_text_lines(samples, done)
    skipped: list[dict] = []
    with samples.open("a" if done else "w") as f, errors.open("w") as ef:  # skipped records are retried on resume
        def on_row(row: dict) -> None:
            f.write(json.dumps(row) + "\n")
            f.flush()

        def on_skip(err) -> None:
            skipped.append({"id": err.record_id, "error": err.reason})
            ef.write(json.dumps(skipped[-1]) + "\n")
            ef.flush()

        try:
            rows, summary = run(pm, args.split, limit=args.limit, batch_size=args.batch_size, meta=meta,
                                on_row=on_row, done=done, on_error=args.on_error, on_skip=on_skip)
        except RecordError as err:
            f.flush()
            n = len(read_rows(samples)) if samples.exists() else 0
            raise ValueError(f"{err}; stopped: {n} results so far are saved in {samples}; fix or remove the record "
                             "and rerun with --resume, or pass --on-error skip") from err
    if not errors.stat().st_size:
        errors.unlink()
    summary["skipped"] = [e["id"] for e in skipped]
    atomic_write_json(out / "summary.json", summary)
    fam = ", ".join(f"{k} {v['exact_match']:.3f} (kept {v['kept_frac']['mean']:.3f})"
                    for k, v in summary["per_family"].items())
    kf = summary["kept_frac"]
    print(f"[{pm.method.name}] exact match {summary['exact_match']:.4f} on {summary['n']} samples; kept fraction "
          f"mean {kf['mean']:.4f} median {kf['median']:.4f} min {kf['min']:.4f} max {kf['max']:.4f}")
    print(f"[{pm.method.name}] per family (exact match, mean kept fraction): {fam}")
    ms = summary["ms_per_sample"]
    print(f"[{pm.method.name}] wall time per sample (batch {args.batch_size}, this machine): prefill "
          f"{ms['prefill']:.1f} ms (ViT + LLM), decode {ms['decode']:.1f} ms; "
          f"KV cache {summary['mean_kv_len']:.0f} tokens")
    if skipped:
        print(f"[{pm.method.name}] skipped {len(skipped)} records that could not be evaluated: see {errors}")
    print(f"[{pm.method.name}] wrote {out / 'summary.json'} and {samples}")
    return summary


def atomic_write_text_lines(path, rows: list[dict]) -> None:
    from .outputs import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _eval_task(args, method: str | None, out, resume: bool) -> dict:
    """``eval --task NAME --data DIR``: a registered benchmark through the generic task path."""
    import dataclasses

    from .bench.accuracy import read_rows
    from .eval.runner import markdown_row, run_task, summarize_task
    from .eval.tasks import get_task
    from .outputs import atomic_write_json, atomic_write_text, ensure_writable_dir

    args = argparse.Namespace(**{**vars(args), "method": method})
    task = get_task(args.task)
    samples = task.load(args.data, args.limit)  # a missing or foreign layout fails here, before the model loads
    if not samples:
        raise ValueError(f"{args.task}: no samples in {args.data}")
    judge = None
    if task.metric == "judge":
        judge = _judge(args, out)
    ensure_writable_dir(out)
    merged = out / "samples.jsonl"
    dist = _distributed()
    order = {smp.id: n for n, smp in enumerate(samples)}
    if dist is not None:  # data parallel (accelerate launch): rank r takes samples r, r + W, ...; its own file
        samples = samples[dist.process_index::dist.num_processes]
        path = out / f"samples.rank{dist.process_index}.jsonl"
    else:
        path = merged
    mine = {smp.id for smp in samples}
    done = [r for r in read_rows(merged) + (read_rows(path) if path != merged else []) if r["id"] in mine] \
        if resume else []
    if done:
        print(f"resuming {out}: {len(done)} samples already evaluated")
        atomic_write_text_lines(path, done)
    pm = _load(args)
    meta = {"model": args.model, "module": None if pm.method.name == "full" else (args.module or "embedded"),
            "method": pm.method.name, "selection": dataclasses.asdict(_selection(args)), "data": str(args.data),
            "judge_model": args.judge_model if judge is not None else None}
    errors = out / ("errors.jsonl" if dist is None else f"errors.rank{dist.process_index}.jsonl")
    skipped: list[str] = []
    with path.open("a" if done else "w") as f, errors.open("w") as ef:  # skipped samples are retried on resume
        def on_row(row: dict) -> None:
            f.write(json.dumps(row) + "\n")
            f.flush()

        def on_skip(sample_id: str, reason: str) -> None:
            skipped.append(sample_id)
            ef.write(json.dumps({"id": sample_id, "error": reason}) + "\n")
            ef.flush()

        rows = run_task(pm, task, samples, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                        on_row=on_row, done=done, judge=judge, on_error=args.on_error, on_skip=on_skip,
                        progress=f"{task.name}" + (f" rank {dist.process_index}" if dist is not None else ""))
    if not skipped:
        errors.unlink()
    else:
        print(f"[{pm.method.name}] skipped {len(skipped)} samples that could not be evaluated: see {errors}")
    if dist is not None:  # gather: the main process merges every rank's rows, in sample order, into one file
        dist.wait_for_everyone()
        if not dist.is_main_process:
            return {"method": pm.method.name, "exact_match": float("nan"), "kept_frac": {"mean": float("nan")},
                    "per_family": {}, "ms_per_sample": {}, "mean_kv_len": float("nan")}
        shards = [out / f"samples.rank{r}.jsonl" for r in range(dist.num_processes)]
        rows = sorted((row for sh in shards for row in read_rows(sh)), key=lambda row: order[row["id"]])
        atomic_write_text_lines(merged, rows)
        for sh in shards:
            sh.unlink()
        path = merged
    summary = summarize_task(task, rows, meta)
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", markdown_row(summary, header=True))
    print(f"[{pm.method.name}] {task.name}: {task.metric} {summary['score']:.4f} on {summary['n']} samples; kept "
          f"fraction {summary['kept_frac']:.4f}; prefill {summary['ms_per_sample']['prefill']:.1f} ms, decode "
          f"{summary['ms_per_sample']['decode']:.1f} ms per sample; wrote {out / 'summary.json'}, .md and {path}")
    return {"method": pm.method.name, "exact_match": summary["score"], "kept_frac": {"mean": summary["kept_frac"]},
            "per_family": {k: {"exact_match": v.get("score", float("nan"))}
                           for k, v in summary.get("per_category", {}).items()},
            "ms_per_sample": summary["ms_per_sample"], "mean_kv_len": summary["mean_kv_len"]}


def _distributed():
    """accelerate's process state under a multi-process launch (``accelerate launch --num_processes N``), else
    None: one process evaluates everything."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    return PartialState()


def _judge(args, out):
    from .rewards.judge import JudgeConfig, JudgeReward, check_judge

    if not (args.judge_url and args.judge_model):
        raise ValueError(f"task {args.task} is scored by an LLM judge: pass --judge-url and --judge-model")
    cfg = JudgeConfig(url=args.judge_url, model=args.judge_model, on_error="zero",
                      cache_dir=args.judge_cache or str(out / "judge_cache"))
    check_judge(cfg)  # a judge that refuses connections fails here, before the first sample
    return JudgeReward(config=cfg)


def cmd_eval(args) -> int:
    import dataclasses
    from pathlib import Path

    from .outputs import atomic_write_json, claim_run_dir

    if (args.split is None) == (args.task is None):
        raise ValueError("give either --split (a records JSONL) or --task NAME --data DIR")
    if args.task is not None and args.data is None:
        raise ValueError(f"--task {args.task} needs --data DIR (the benchmark's local release folder)")
    out = Path(args.out)
    source = ({"split": str(Path(args.split).resolve())} if args.split else
              {"task": args.task, "data": str(Path(args.data).resolve()), "judge_model": args.judge_model})
    settings = {**source, "limit": args.limit, "model": str(args.model),
                "module": _module_arg(args), "method": args.method, "compare_full": args.compare_full,
                "selection": dataclasses.asdict(_selection(args)), "dtype": args.dtype}
    dist = _distributed() if args.task else None
    if dist is None or dist.is_main_process:
        claim_run_dir(out, "eval", settings, EVAL_OWNED, resume=args.resume, overwrite=args.overwrite)
    if dist is not None:
        dist.wait_for_everyone()
        if args.compare_full:
            raise ValueError("--compare-full is not supported under a multi-process launch; run the two separately")
    one = _eval_one if args.split else _eval_task
    main = one(args, args.method, out, args.resume)
    if args.compare_full and main["method"] != "full":
        full = one(args, "full", out / "full", args.resume)
        ratio = main["exact_match"] / max(full["exact_match"], 1e-9)
        per = {f: main["per_family"][f]["exact_match"] / max(v["exact_match"], 1e-9)
               for f, v in full["per_family"].items() if f in main["per_family"]}
        report = {"method": main["method"], "exact_match": main["exact_match"],
                  "full_exact_match": full["exact_match"], "relative_accuracy": ratio,
                  "mean_kept_frac": main["kept_frac"]["mean"], "relative_accuracy_per_family": per,
                  "ms_per_sample": {"pruned": main["ms_per_sample"], "full": full["ms_per_sample"]},
                  "mean_kv_len": {"pruned": main["mean_kv_len"], "full": full["mean_kv_len"]}}
        atomic_write_json(out / "relative.json", report)
        print(f"{main['method']} keeps {100 * ratio:.1f} % of the full-token accuracy "
              f"({main['exact_match']:.4f} vs {full['exact_match']:.4f}) with {100 * main['kept_frac']['mean']:.1f} % "
              f"of the visual tokens on average; wrote {out / 'relative.json'}")
        pm_, fm = main["ms_per_sample"], full["ms_per_sample"]
        print(f"wall time per sample, {main['method']} vs full: prefill {pm_['prefill']:.1f} vs "
              f"{fm['prefill']:.1f} ms ({pm_['prefill'] / max(fm['prefill'], 1e-9):.2f}x), "
              f"decode {pm_['decode']:.1f} vs {fm['decode']:.1f} ms "
              f"({pm_['decode'] / max(fm['decode'], 1e-9):.2f}x); KV cache {main['mean_kv_len']:.0f} vs "
              f"{full['mean_kv_len']:.0f} tokens (timed once, in this run, on this machine)")
    return 0


COMPARE_OWNED = ["runs", "compare.md", "compare.png", "k_sweep.json", "k_sweep.md", "k_sweep.png"]


def cmd_compare(args) -> int:
    from pathlib import Path

    import torch

    from .api import load_base
    from .assets import resolve_model, resolve_module
    from .bench.compare import MASK_METHODS, compare, k_sweep, plan
    from .checkpoint import load_plus
    from .outputs import claim_run_dir
    from .registry import list_methods

    if (args.split is None) == (args.task is None):
        raise ValueError("give either --split (a records JSONL) or --task NAME --data DIR")
    task = samples = None
    if args.task is not None:
        from .eval.tasks import get_task

        if args.data is None:
            raise ValueError(f"--task {args.task} needs --data DIR (the benchmark's local release folder)")
        if args.k_sweep:
            raise ValueError("--k-sweep runs on a world split (--split): it needs ground-truth boxes")
        task = get_task(args.task)
        samples = task.load(args.data, args.limit)  # a missing or foreign layout fails here, before the model loads
        if not samples:
            raise ValueError(f"{args.task}: no samples in {args.data}")
    elif args.resume:
        raise ValueError("--resume continues a `compare --task` run; a world comparison (--split) reruns whole")
    skip = (*MASK_METHODS, "full") + (("oracle",) if task is not None else ())  # benchmark tasks have no boxes
    methods = args.methods or [m for m in list_methods() if m not in skip]
    if task is not None and "oracle" in methods:
        raise ValueError(f"method 'oracle' needs ground-truth boxes; task {task.name} has none: leave it out of "
                         "--methods")
    plan(methods, args.budgets, args.cap)  # unknown methods, impossible budgets: refused before OUT is touched
    check_device(args.device)
    source = ({"split": str(Path(args.split).resolve())} if task is None else
              {"task": args.task, "data": str(Path(args.data).resolve()), "judge_model": args.judge_model,
               "max_new_tokens": args.max_new_tokens})
    settings = {**source, "limit": args.limit, "model": str(args.model),
                "module": _module_arg(args), "methods": methods, "budgets": args.budgets, "cap": args.cap,
                "k_sweep": args.k_sweep, "dtype": args.dtype}
    judge = _judge(args, Path(args.out)) if task is not None and task.metric == "judge" else None
    claim_run_dir(args.out, "compare", settings, COMPARE_OWNED, overwrite=args.overwrite, resume=args.resume,
                  resume_flag="--resume" if task is not None else "")
    model, processor = load_base(resolve_model(args.model), args.device, getattr(torch, args.dtype))
    module_arg = _module_arg(args)
    module = None
    if ("glimpse" in methods or args.k_sweep) and module_arg is not None:
        # a GlimpsePrune+ folder brings its LoRA adapter (merged into the base: every method then runs on the
        # adapted model, the one the module was trained with)
        model, module = load_plus(model, resolve_module(module_arg), device=args.device)
    torch.manual_seed(0)
    meta = {"model": str(args.model), "module": None if module is None else str(module_arg)}
    if task is not None:
        from .eval.compare_task import compare_task

        meta["judge_model"] = args.judge_model if judge is not None else None
        compare_task(model, processor, module, task, samples, args.out, methods, args.budgets, args.cap,
                     args.batch_size, args.max_new_tokens, judge=judge, meta=meta, resume=args.resume)
        return 0
    if args.k_sweep:
        if module is None:
            raise ValueError("--k-sweep needs a glimpse module (--module)")
        k_sweep(model, processor, module, args.split, args.out, args.limit, args.batch_size, meta=meta)
        return 0
    compare(model, processor, module, args.split, args.out, methods, args.budgets, args.cap, args.limit,
            args.batch_size, meta=meta)
    return 0


def cmd_make_world(args) -> int:
    from .data.records import has_split, write_split

    if not args.overwrite and has_split(args.out, args.n, args.seed):  # deterministic: the same split is kept
        print(f"{args.out} already holds this split (n {args.n}, seed {args.seed}); left as it is")
        return 0
    print(f"wrote {write_split(args.out, args.n, args.seed, overwrite=args.overwrite)}")
    return 0


def cmd_train(args) -> int:
    from .training.stage2 import Stage2Config, load_config, train_stage2
    from .training.trainer import train

    cfg = load_config(args.config, output_dir=args.output_dir)
    if args.device:
        check_device(args.device)
    if isinstance(cfg, Stage2Config):
        if args.merge:
            from .outputs import ensure_writable_dir

            ensure_writable_dir(args.merge)  # before the run, not after it
        plus = train_stage2(cfg, resume=args.resume, overwrite=args.overwrite, device=args.device)
        print(f"wrote {plus} (glimpse module + LoRA adapter: --module {plus})")
        if args.merge:
            from .assets import resolve_model
            from .lora import merge_and_save

            print(f"wrote a merged base model to {merge_and_save(resolve_model(cfg.model), plus, args.merge)}")
        return 0
    if args.merge:
        raise ValueError("--merge applies to stage-2 (GlimpsePrune+) configs, which train a LoRA adapter")
    print(f"wrote {train(cfg, resume=args.resume, overwrite=args.overwrite, device=args.device)}")
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


def cmd_tasks(args) -> int:
    from .eval.tasks import get_task, list_tasks

    for name in list_tasks():
        t = get_task(name)
        print(f"{name:16s} {t.metric:16s} {t.download}")
    return 0


def cmd_methods(args) -> int:
    from .registry import get_method, list_methods

    for name in list_methods():
        doc = (sys.modules[get_method(name).__module__].__doc__ or "").strip().splitlines()[0]
        print(f"{name:10s} {doc}")
    return 0


def _model_args(a) -> None:
    a.add_argument("--model", default="embedded", help="local Hugging Face directory of the base VLM "
                   "(default: the embedded world model shipped in the package)")
    a.add_argument("--module", help="glimpse module directory, or embedded / embedded-k0 (packaged; default: embedded "
                   "with the embedded model)")
    a.add_argument("--method", choices=["full", "glimpse"], help="default: glimpse with a module, else full")
    a.add_argument("--threshold", type=float, default=0.5, help="keep a token when its probability > this")
    a.add_argument("--max-keep-ratio", type=float, help="cap on the kept fraction per sample (top-k)")
    a.add_argument("--min-keep", type=int, default=1, help="keep at least this many visual tokens per sample")
    a.add_argument("--fixed-keep-ratio", type=float, help="keep exactly this fraction (matched-budget mode)")
    a.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    a.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="base model dtype")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glimpseprune", description="Dynamic visual-token pruning for VLMs (offline).")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    sub = p.add_subparsers(dest="cmd", required=True)

    a = sub.add_parser("ask", help="answer one question about an image, printing the answer and `kept n/N (x %%)`")
    a.add_argument("image_pos", nargs="?", metavar="IMAGE", help="image file (or use --image)")
    a.add_argument("question_pos", nargs="?", metavar="QUESTION", help="the question (or use --question)")
    a.add_argument("--image", action="append", help="image file; repeat for several images")
    a.add_argument("--question", help="the question text")
    a.add_argument("--overlay", help="write the (first) image with its kept tokens highlighted to this PNG")
    _model_args(a)
    a.add_argument("--max-new-tokens", type=positive_int, default=32, help="tokens to generate")
    a.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    a.set_defaults(fn=cmd_ask)

    e = sub.add_parser("eval", help="exact match and kept fractions on a JSONL split (samples.jsonl + summary.json)")
    e.add_argument("--split", help="records JSONL (e.g. from `glimpseprune make-world`)")
    e.add_argument("--task", help="instead of --split: a registered benchmark (see `glimpseprune tasks`), read from "
                   "--data")
    e.add_argument("--data", help="with --task: the benchmark's local release folder (nothing is downloaded)")
    e.add_argument("--max-new-tokens", type=positive_int, default=32, help="with --task: tokens to generate")
    e.add_argument("--judge-url", help="OpenAI-compatible endpoint of the LLM judge (free-form tasks)")
    e.add_argument("--judge-model", help="the judge's model name (recorded in the results)")
    e.add_argument("--judge-cache", help="folder of the judge's on-disk cache (default OUT/judge_cache)")
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--limit", type=positive_int, help="evaluate the first N records only")
    e.add_argument("--batch-size", type=positive_int, default=8, help="samples per batch")
    e.add_argument("--resume", action="store_true", help="continue an interrupted run in OUT (same settings): "
                   "records already in OUT/samples.jsonl are not run again")
    e.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in OUT")
    e.add_argument("--on-error", choices=["stop", "skip"], default="stop", help="a record that cannot be "
                   "evaluated (unreadable image, refused question): stop with the results so far saved (default), or "
                   "skip it, logging it in OUT/errors.jsonl")
    e.add_argument("--compare-full", action="store_true", help="also run without pruning (OUT/full) and report "
                   "the relative accuracy (OUT/relative.json)")
    _model_args(e)
    e.set_defaults(fn=cmd_eval)

    k = sub.add_parser("compare", help="pruning methods x budgets on a split: one JSON per run, compare.md, "
                       "compare.png")
    k.add_argument("--split", help="records JSONL (e.g. from `glimpseprune make-world`)")
    k.add_argument("--out", required=True, help="output folder")
    k.add_argument("--task", help="instead of --split: a registered benchmark (see `glimpseprune tasks`), read from "
                   "--data; every run goes through the task's prompt and metric")
    k.add_argument("--data", help="with --task: the benchmark's local release folder (nothing is downloaded)")
    k.add_argument("--max-new-tokens", type=positive_int, default=32, help="with --task: tokens to generate")
    k.add_argument("--judge-url", help="OpenAI-compatible endpoint of the LLM judge (free-form tasks)")
    k.add_argument("--judge-model", help="the judge's model name (recorded in the results)")
    k.add_argument("--judge-cache", help="folder of the judge's on-disk cache (default OUT/judge_cache)")
    k.add_argument("--resume", action="store_true", help="with --task: continue an interrupted comparison in OUT "
                   "(same settings): finished runs are kept, an interrupted one continues from its samples")
    k.add_argument("--methods", nargs="+", help="registered methods (default: all but mask; full always runs)")
    k.add_argument("--budgets", type=float, nargs="+", default=[0.056, 0.111, 0.222, 0.333],
                   help="kept fractions of the fixed-budget runs")
    k.add_argument("--k-sweep", action="store_true", help="instead: accuracy and prefill cost vs the pruning "
                   "layer K (GlimpsePrune's masks, oracle boxes and attention top-k dropped after each K)")
    k.add_argument("--cap", type=float, default=0.111, help="cap of GlimpsePrune's capped dynamic run")
    k.add_argument("--limit", type=positive_int, help="evaluate the first N records only")
    k.add_argument("--batch-size", type=positive_int, default=16, help="samples per batch")
    k.add_argument("--overwrite", action="store_true", help="replace the results of an earlier comparison in OUT")
    k.add_argument("--model", default="embedded", help="local base model folder (default: the embedded one)")
    k.add_argument("--module", help="glimpse module folder (default: the embedded one with the embedded model)")
    k.add_argument("--device", default="cpu", help="torch device")
    k.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="base model dtype")
    k.set_defaults(fn=cmd_compare)

    w = sub.add_parser("make-world", help="render a split of the synthetic VQA world (PNGs + records.jsonl)")
    w.add_argument("--out", required=True, help="output folder")
    w.add_argument("--n", type=positive_int, default=500, help="number of samples (families in turn)")
    w.add_argument("--overwrite", action="store_true", help="replace another split in OUT (the same split is left "
                   "as it is)")
    w.add_argument("--seed", type=int, default=1, help="split seed (1 is the held-out split used in the README)")
    w.set_defaults(fn=cmd_make_world)

    r = sub.add_parser("train", help="train from a YAML config: stage 1 (glimpse token + VIP) or `stage: 2` "
                       "(GlimpsePrune+, GRPO + LoRA)")
    r.add_argument("--config", required=True, help="YAML file (see configs/)")
    r.add_argument("--output-dir", help="override the config's output_dir")
    r.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir (its "
                   "recorded config must match)")
    r.add_argument("--overwrite", action="store_true", help="replace the earlier run in output_dir")
    r.add_argument("--merge", metavar="DIR", help="stage 2: also write the base model with the LoRA adapter merged "
                   "into its weights to DIR")
    r.add_argument("--device", help="torch device (default cpu)")
    r.set_defaults(fn=cmd_train)

    c = sub.add_parser("convert", help="convert an upstream release (config.json + new_modules_gp.pt)")
    c.add_argument("--upstream", required=True, help="upstream module directory")
    c.add_argument("--out", required=True, help="output directory")
    c.set_defaults(fn=cmd_convert)

    n = sub.add_parser("new-module", help="write an untrained glimpse module sized for a base model")
    n.add_argument("--model", required=True, help="local base model directory")
    n.add_argument("--out", required=True, help="output directory")
    n.add_argument("--preset", help="named preset of a released architecture: qwen2_5_vl_7b, qwen2_5_vl_3b, "
                   "llava_1_5_7b, llava_1_5_13b")
    n.add_argument("--small", action="store_true", help="small VIP widths for tiny test models")
    n.add_argument("--seed", type=int, default=0, help="initialisation seed")
    n.set_defaults(fn=cmd_new_module)

    t = sub.add_parser("make-tiny", help="write a tiny random Qwen2.5-VL (DIR/model), an untrained module "
                       "(DIR/module) and an image (DIR/example.png), for demos and tests")
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--seed", type=int, default=0, help="initialisation seed")
    t.set_defaults(fn=cmd_make_tiny)

    tk = sub.add_parser("tasks", help="list the registered benchmark tasks (eval --task NAME --data DIR)")
    tk.set_defaults(fn=cmd_tasks)

    m = sub.add_parser("methods", help="list the registered pruning methods")
    m.set_defaults(fn=cmd_methods)

    from .bench.report import add_bench_parser

    add_bench_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # bench runs are long: their progress is logged by default (stderr), other commands log on --verbose
    verbose = args.verbose or args.cmd == "bench"
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s" if verbose else "%(levelname)s %(message)s")
    try:
        return args.fn(args)
    except (ValueError, TypeError, OSError, KeyError) as err:  # what bad input raises: one line, no traceback
        if verbose:
            logging.exception("failed")
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {_printable(str(msg))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug of ours, not bad input: still one line, the traceback on --verbose
        if verbose:
            raise
        print(f"error: internal error ({type(err).__name__}: {_printable(str(err))}); rerun with -v for the "
              "traceback and please report it", file=sys.stderr)
        return 1


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(text: str) -> str:
    """Arguments that were not UTF-8 reach Python as surrogate escapes: show them as \\x.. instead of failing."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


if __name__ == "__main__":
    sys.exit(main())
