"""The ``glimpseprune`` command. Thin: parses arguments and calls the library.

    glimpseprune ask IMAGE "QUESTION" [--overlay out.png]      (the embedded world model + module)
    glimpseprune ask --model DIR --module DIR --image PATH --question TEXT
    glimpseprune eval --split records.jsonl --out DIR     (exact match + kept fractions)
    glimpseprune compare --split records.jsonl --out DIR  (methods x budgets: JSON per run, table, plot)
    glimpseprune make-world --out DIR --n 500 --seed 1    (a split of the synthetic world)
    glimpseprune train --config configs/stage1_world.yaml [--resume]
    glimpseprune convert --upstream DIR --out DIR
    glimpseprune new-module --model DIR --out DIR [--preset NAME]
    glimpseprune make-tiny --out DIR [--family llava]   (tiny random model + untrained module + image, smoke runs)
    glimpseprune methods [--json]

stdout carries results only (answers, summaries, ``--json`` objects); progress, notes and errors go to stderr.
``-v`` / ``-q`` work before or after the subcommand.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import sys
import typing

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


def _note(args, text: str) -> None:
    """A progress or status line: stderr (stdout is for results), silenced by --quiet."""
    if not getattr(args, "quiet", False):
        print(text, file=sys.stderr)


def _say(args, text: str) -> None:
    """A human-readable result line: stdout, or a note on stderr when --json puts the result on stdout."""
    if getattr(args, "json", False):
        _note(args, text)
    else:
        print(text)


# GlimpsePrune's selection knobs (SelectionConfig fields) and the flags that set them
SELECTION_FLAGS = {"threshold": "--threshold", "max_keep_ratio": "--max-keep-ratio", "min_keep": "--min-keep",
                   "fixed_keep_ratio": "--fixed-keep-ratio"}


def _selection(args):
    """The SelectionConfig of the flags; a bad value is an error naming the flag, not the field."""
    from .config import SelectionConfig

    try:
        return SelectionConfig(**{field: getattr(args, field) for field in SELECTION_FLAGS})
    except (ValueError, TypeError) as err:
        raise ValueError(re.sub(r"\b(" + "|".join(SELECTION_FLAGS) + r")\b", lambda m: SELECTION_FLAGS[m[1]],
                                str(err))) from None


def _check_method(args) -> None:
    """Before anything loads: ``--method`` names a registered method that runs on images and a question alone,
    ``--method-arg`` fits its config, the selection flags go with glimpse. Sets ``args.method_kwargs``."""
    from .registry import describe_method, get_method, list_methods, method_settings

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
    if changed and name != "glimpse":
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
        args.method_kwargs[key] = _parse_typed(key, text, own[key]["type"])
    try:
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
    from .registry import type_name

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
    from .assets import EMBEDDED

    return args.module if args.module is not None else (EMBEDDED if args.model == EMBEDDED else None)


def _load(args):
    """(PrunedModel, whether the module folder is used): glimpse uses its module; any other method runs without
    one, except that a GlimpsePrune+ folder still brings its LoRA adapter (the GP+ model)."""
    import torch

    from .api import load
    from .assets import resolve_model, resolve_module
    from .checkpoint import adapter_record

    check_device(args.device)
    module = resolve_module(_module_arg(args))
    if args.method not in (None, "glimpse") and (module is None or adapter_record(module) is None):
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


def _environment(args) -> dict:
    """What summary.json records of the run's machine and precision (the comparison's runs record the same)."""
    from .bench.meta import environment

    return {"dtype": args.dtype, "batch_size": args.batch_size, "environment": environment(args.device)}


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
    _check_method(args)
    if args.overlay:
        _check_overlay(args.overlay, images)
    pm, _ = _load(args)
    out = pm.generate(images=[images], questions=[question], max_new_tokens=args.max_new_tokens)
    n, N = out.n_kept[0], out.n_vis[0]
    if args.overlay:
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
    from .bench.overlay import grid_box, overlay
    from .processing import load_image

    image = load_image(image_path)
    k = keep.cpu().numpy()
    overlay(image, k, box=grid_box(pm.adapter, pm.processor, image.size), question=question, answer=answer,
            kept=int(k.sum()), total=int(k.size)).save(out_path)


# judge_cache/ is not a result: --overwrite keeps it (its answers are keyed by judge model + prompt, so reusing them
# is exact, and asking again costs the user)
EVAL_OWNED = ["samples.jsonl", "samples.rank*.jsonl", "summary.json", "errors.jsonl", "errors.rank*.jsonl",
              "summary.md", "relative.json", "full"]


def _for_method(args, method: str | None) -> argparse.Namespace:
    """``args`` for a run of ``method`` (``--compare-full``'s reference run takes none of the method's settings)."""
    kwargs = getattr(args, "method_kwargs", {}) if method == args.method else {}
    return argparse.Namespace(**{**vars(args), "method": method, "method_kwargs": kwargs})


def _eval_one(args, method: str | None, out, resume: bool) -> tuple[dict, dict]:
    """``eval --split``: (headline figures, the summary written to OUT/summary.json); here they are one dict."""
    from .bench.accuracy import RecordError, read_rows, run
    from .outputs import atomic_write_json, ensure_writable_dir

    args = _for_method(args, method)
    ensure_writable_dir(out)
    samples, errors = out / "samples.jsonl", out / "errors.jsonl"
    done = read_rows(samples) if resume else []
    if resume and done:
        _note(args, f"resuming {out}: {len(done)} samples already evaluated")
    pm, module_used = _load(args)
    meta = _run_meta(args, pm, module_used)
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
    summary.update(_environment(args))
    atomic_write_json(out / "summary.json", summary)
    fam = ", ".join(f"{k} {v['exact_match']:.3f} (kept {v['kept_frac']['mean']:.3f})"
                    for k, v in summary["per_family"].items())
    kf = summary["kept_frac"]
    name = pm.method.name
    _say(args, f"[{name}] exact match {summary['exact_match']:.4f} on {summary['n']} samples; kept fraction "
         f"mean {kf['mean']:.4f} median {kf['median']:.4f} min {kf['min']:.4f} max {kf['max']:.4f}")
    _say(args, f"[{name}] per family (exact match, mean kept fraction): {fam}")
    ms = summary["ms_per_sample"]
    _say(args, f"[{name}] wall time per sample (batch {args.batch_size}, this machine): prefill "
         f"{ms['prefill']:.1f} ms (ViT + LLM), decode {ms['decode']:.1f} ms; "
         f"KV cache {summary['mean_kv_len']:.0f} tokens")
    if skipped:  # a warning: shown even with --quiet
        print(f"[{name}] skipped {len(skipped)} records that could not be evaluated: see {errors}", file=sys.stderr)
    _note(args, f"[{name}] wrote {out / 'summary.json'} and {samples}")
    return summary, summary


def atomic_write_text_lines(path, rows: list[dict]) -> None:
    from .outputs import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _eval_task(args, method: str | None, out, resume: bool) -> tuple[dict, dict | None]:
    """``eval --task NAME --data DIR``: a registered benchmark through the generic task path. Returns (headline
    figures in the shape ``_eval_one`` gives, the summary written to OUT/summary.json; None on a non-main rank)."""
    from .bench.accuracy import read_rows
    from .eval.runner import markdown_row, run_task, summarize_task
    from .eval.tasks import get_task
    from .outputs import atomic_write_json, atomic_write_text, ensure_writable_dir

    args = _for_method(args, method)
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
        _note(args, f"resuming {out}: {len(done)} samples already evaluated")
        atomic_write_text_lines(path, done)
    pm, module_used = _load(args)
    meta = {**_run_meta(args, pm, module_used), "data": str(args.data),
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
                        progress=False if args.quiet else
                        f"{task.name}" + (f" rank {dist.process_index}" if dist is not None else ""))
    if not skipped:
        errors.unlink()
    else:  # a warning: shown even with --quiet
        print(f"[{pm.method.name}] skipped {len(skipped)} samples that could not be evaluated: see {errors}",
              file=sys.stderr)
    if dist is not None:  # gather: the main process merges every rank's rows, in sample order, into one file
        dist.wait_for_everyone()
        if not dist.is_main_process:
            return {"method": pm.method.name, "exact_match": float("nan"), "kept_frac": {"mean": float("nan")},
                    "per_family": {}, "ms_per_sample": {}, "mean_kv_len": float("nan")}, None
        shards = [out / f"samples.rank{r}.jsonl" for r in range(dist.num_processes)]
        rows = sorted((row for sh in shards for row in read_rows(sh)), key=lambda row: order[row["id"]])
        atomic_write_text_lines(merged, rows)
        for sh in shards:
            sh.unlink()
        path = merged
    summary = summarize_task(task, rows, meta)
    summary.update(_environment(args))
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", markdown_row(summary, header=True))
    _say(args, f"[{pm.method.name}] {task.name}: {task.metric} {summary['score']:.4f} on {summary['n']} samples; "
         f"kept fraction {summary['kept_frac']:.4f}; prefill {summary['ms_per_sample']['prefill']:.1f} ms, decode "
         f"{summary['ms_per_sample']['decode']:.1f} ms per sample")
    _note(args, f"[{pm.method.name}] wrote {out / 'summary.json'}, .md and {path}")
    return {"method": pm.method.name, "exact_match": summary["score"], "kept_frac": {"mean": summary["kept_frac"]},
            "per_family": {k: {"exact_match": v.get("score", float("nan"))}
                           for k, v in summary.get("per_category", {}).items()},
            "ms_per_sample": summary["ms_per_sample"], "mean_kv_len": summary["mean_kv_len"]}, summary


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
    _check_method(args)
    if args.split is not None:
        _check_split(args.split, args.limit)
    out = Path(args.out)
    source = ({"split": str(Path(args.split).resolve())} if args.split else
              {"task": args.task, "data": str(Path(args.data).resolve()), "judge_model": args.judge_model})
    settings = {**source, "limit": args.limit, "model": str(args.model),
                "module": _module_arg(args), "method": args.method, "compare_full": args.compare_full,
                "selection": dataclasses.asdict(_selection(args)), "dtype": args.dtype,
                "method_args": args.method_kwargs or None}  # None: as recorded by runs before --method-arg
    dist = _distributed() if args.task else None
    if dist is None or dist.is_main_process:
        claim_run_dir(out, "eval", settings, EVAL_OWNED, resume=args.resume, overwrite=args.overwrite)
    if dist is not None:
        dist.wait_for_everyone()
        if args.compare_full:
            raise ValueError("--compare-full is not supported under a multi-process launch; run the two separately")
    one = _eval_one if args.split else _eval_task
    main, result = one(args, args.method, out, args.resume)
    if args.compare_full and main["method"] != "full":
        full, full_summary = one(args, "full", out / "full", args.resume)
        ratio = main["exact_match"] / max(full["exact_match"], 1e-9)
        per = {f: main["per_family"][f]["exact_match"] / max(v["exact_match"], 1e-9)
               for f, v in full["per_family"].items() if f in main["per_family"]}
        report = {"method": main["method"], "exact_match": main["exact_match"],
                  "full_exact_match": full["exact_match"], "relative_accuracy": ratio,
                  "mean_kept_frac": main["kept_frac"]["mean"], "relative_accuracy_per_family": per,
                  "ms_per_sample": {"pruned": main["ms_per_sample"], "full": full["ms_per_sample"]},
                  "mean_kv_len": {"pruned": main["mean_kv_len"], "full": full["mean_kv_len"]}}
        atomic_write_json(out / "relative.json", report)
        result = {**result, "full": full_summary, "relative": report}
        _say(args, f"{main['method']} keeps {100 * ratio:.1f} % of the full-token accuracy "
              f"({main['exact_match']:.4f} vs {full['exact_match']:.4f}) with {100 * main['kept_frac']['mean']:.1f} % "
              f"of the visual tokens on average; wrote {out / 'relative.json'}")
        pm_, fm = main["ms_per_sample"], full["ms_per_sample"]
        _say(args, f"wall time per sample, {main['method']} vs full: prefill {pm_['prefill']:.1f} vs "
              f"{fm['prefill']:.1f} ms ({pm_['prefill'] / max(fm['prefill'], 1e-9):.2f}x), "
              f"decode {pm_['decode']:.1f} vs {fm['decode']:.1f} ms "
              f"({pm_['decode'] / max(fm['decode'], 1e-9):.2f}x); KV cache {main['mean_kv_len']:.0f} vs "
              f"{full['mean_kv_len']:.0f} tokens (timed once, in this run, on this machine)")
    if args.json and result is not None:  # None: a non-main process of a multi-process launch
        print(json.dumps(result, default=str))
    return 0


def _check_split(path: str, limit: int | None) -> None:
    """Before the model loads: --split is a readable records JSONL holding at least one record."""
    from pathlib import Path

    from .data.records import read_records

    p = Path(path)
    if not p.exists():
        raise ValueError(f"--split {path}: no such file")
    if p.is_dir():
        hint = f" (e.g. {p / 'records.jsonl'})" if (p / "records.jsonl").is_file() else ""
        raise ValueError(f"--split {path} is a folder: pass the records JSONL file in it{hint}")
    try:
        records = read_records(p, limit)
    except UnicodeDecodeError as err:
        raise ValueError(f"--split {path}: not a UTF-8 text file ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise ValueError(f"--split {path}: cannot read it ({err.strerror or err})") from None
    except ValueError as err:
        raise ValueError(f"--split {err}") from None
    if not records:
        raise ValueError(f"--split {path} holds no records (an empty file)")


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
    else:
        _check_split(args.split, args.limit)
    skip = (*MASK_METHODS, "full") + (("oracle",) if task is not None else ())  # benchmark tasks have no boxes
    methods = args.methods or [m for m in list_methods() if m not in skip]
    if task is not None and "oracle" in methods:
        raise ValueError(f"method 'oracle' needs ground-truth boxes; task {task.name} has none: leave it out of "
                         "--methods")
    plan(methods, args.budgets, args.cap)  # unknown methods, impossible budgets: refused before OUT is touched
    if ("glimpse" in methods or args.k_sweep) and _module_arg(args) is None:
        raise ValueError(("--k-sweep" if args.k_sweep else "method glimpse") + " needs a glimpse module: pass "
                         "--module DIR" + ("" if args.k_sweep else ", or leave glimpse out of --methods"))
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
    log = (lambda text: _note(args, text)) if args.json else print  # the table is the result, unless --json
    if task is not None:
        from .eval.compare_task import compare_task

        meta["judge_model"] = args.judge_model if judge is not None else None
        runs = compare_task(model, processor, module, task, samples, args.out, methods, args.budgets, args.cap,
                            args.batch_size, args.max_new_tokens, judge=judge, meta=meta, resume=args.resume,
                            progress=not args.quiet, log=log)
    elif args.k_sweep:
        result = k_sweep(model, processor, module, args.split, args.out, args.limit, args.batch_size, meta=meta,
                         log=log)
        if args.json:
            print(json.dumps({"out": str(args.out), "k_sweep": {k: v for k, v in result.items()
                                                                if k != "environment"}}, default=str))
        return 0
    else:
        runs = compare(model, processor, module, args.split, args.out, methods, args.budgets, args.cap, args.limit,
                       args.batch_size, meta=meta, log=log)
    if args.json:
        print(json.dumps({"out": str(args.out), "runs": [_headline(r) for r in runs]}, default=str))
    return 0


def _headline(run: dict) -> dict:
    """A comparison run's headline figures (the whole record is in OUT/runs/<label>.json)."""
    keys = ("label", "method", "setting", "budget", "task", "metric", "n", "exact_match", "score", "seconds",
            "ms_per_sample")
    a = run.get("accounting", {})
    return {**{k: run[k] for k in keys if k in run}, "kept_frac": run["kept_frac"]["mean"],
            "visual_tokens_entering_llm": a.get("visual_tokens_entering_llm"),
            "equivalent_visual_tokens": a.get("equivalent_visual_tokens"),
            "kv_entries_at_decode": a.get("kv_entries_at_decode")}


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
        plus = train_stage2(cfg, resume=args.resume, overwrite=args.overwrite, device=args.device,
                            progress=not getattr(args, "quiet", False))
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

    out = convert_upstream(args.upstream, args.out, vision_depth=args.vision_depth)
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
    from .testing import make_tiny

    kit = make_tiny(args.out, family=args.family, seed=args.seed)
    name = {"qwen2_5_vl": "Qwen2.5-VL", "llava": "LLaVA-1.5"}.get(args.family, args.family)
    print(f"wrote a tiny RANDOM {name} ({kit['model']}), an UNTRAINED glimpse module ({kit['module']}) and "
          f"{kit['image']}; try:\n  glimpseprune ask --model {kit['model']} --module {kit['module']} "
          f"--image {kit['image']} --question 'What colour is the square?'")
    return 0


def cmd_tasks(args) -> int:
    from .eval.tasks import get_task, list_tasks

    for name in list_tasks():
        t = get_task(name)
        print(f"{name:16s} {t.metric:16s} {t.download}")
    return 0


def cmd_methods(args) -> int:
    from .registry import describe_method, list_methods

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


def _model_args(a) -> None:
    a.add_argument("--model", default="embedded", help="local Hugging Face directory of the base VLM "
                   "(default: the embedded world model shipped in the package)")
    a.add_argument("--module", help="glimpse module directory, or embedded / embedded-k0 (packaged; default: embedded "
                   "with the embedded model)")
    a.add_argument("--method", help="a registered pruning method (`glimpseprune methods`) but oracle and mask, "
                   "which need per-request boxes or masks (default: glimpse with a module, else full)")
    a.add_argument("--method-arg", action="append", metavar="KEY=VALUE", help="a setting of --method, e.g. "
                   "keep_ratio=0.1 or prune_layer=2 (repeat; `glimpseprune methods` lists them with defaults); "
                   "glimpse's selection has its own flags (--threshold ...)")
    a.add_argument("--threshold", type=float, default=0.5, help="glimpse: keep a token when its probability > this")
    a.add_argument("--max-keep-ratio", type=float, help="glimpse: cap on the kept fraction per sample (top-k)")
    a.add_argument("--min-keep", type=int, default=1, help="glimpse: keep at least this many visual tokens per "
                   "sample")
    a.add_argument("--fixed-keep-ratio", type=float, help="glimpse: keep exactly this fraction (matched-budget "
                   "mode)")
    a.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    a.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="base model dtype")


class _HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default after its help, unless it is None / off or the help already names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if ("default" in text or d is None or d is False or d == argparse.SUPPRESS or text == argparse.SUPPRESS
                or not (action.option_strings or action.nargs in ("?", "*"))):
            return text
        return text + " (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """The parser of every (sub)command, nested ones included (add_subparsers makes its parsers of this class):
    defaults in --help, and the output options shared by all, so that ``-v`` / ``-q`` work after the subcommand as
    well as before it. Under a subcommand they default to SUPPRESS: an option given before it is not reset."""

    def __init__(self, *args, top: bool = False, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)
        default = False if top else argparse.SUPPRESS
        self.add_argument("-v", "--verbose", action="store_true", default=default,
                          help="log progress at INFO level, show model-loading progress bars, tracebacks on errors")
        self.add_argument("-q", "--quiet", action="store_true", default=default,
                          help="no progress bars, no notes or info logs on stderr (results and errors still print)")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    def of(pkg: str) -> str:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return "not installed"

    return f"glimpseprune {__version__} (torch {of('torch')}, transformers {of('transformers')}, Python " \
           f"{sys.version.split()[0]})"


def cmd_demo(args) -> int:
    check_device(args.device)
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ValueError("the demo needs gradio: pip install 'glimpseprune[demo]'") from None
    from .demo import launch

    _note(args, f"serving the demo on http://{args.host}:{args.port}/ (Ctrl+C stops it)")
    launch(args.model, args.module, host=args.host, port=args.port, device=args.device, dtype=args.dtype,
           max_new_tokens=args.max_new_tokens)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="glimpseprune", top=True, description="Dynamic visual-token pruning for VLMs (offline). "
                "Results go to stdout; progress, notes and errors to stderr.")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    a = sub.add_parser("ask", help="answer one question about an image, printing the answer and `kept n/N (x %%)`")
    a.add_argument("image_pos", nargs="?", metavar="IMAGE", help="image file (or use --image)")
    a.add_argument("question_pos", nargs="?", metavar="QUESTION", help="the question (or use --question)")
    a.add_argument("--image", action="append", help="image file; repeat for several images")
    a.add_argument("--question", help="the question text")
    a.add_argument("--overlay", help="write the (first) image with its kept tokens highlighted to this PNG")
    _model_args(a)
    a.add_argument("--max-new-tokens", type=positive_int, default=32, help="tokens to generate")
    a.add_argument("--json", action="store_true", help="print one JSON line instead of text (notes go to stderr)")
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
    e.add_argument("--json", action="store_true", help="print the summary (OUT/summary.json; with --compare-full "
                   "also the full run's and the relative report) as one JSON object on stdout; the human-readable "
                   "lines go to stderr")
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
    k.add_argument("--json", action="store_true", help="print one JSON object on stdout: the output folder and each "
                   "run's headline figures (with --k-sweep: the sweep); the table and progress go to stderr")
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
    c.add_argument("--vision-depth", type=positive_int, metavar="N", help="blocks of the base model's vision "
                   "encoder. Qwen2.5-VL releases record it (vision_config.depth) and LLaVA-1.5 releases do not "
                   "(assumed 24, CLIP-L); N overrides either, e.g. for a LLaVA with another CLIP tower")
    c.set_defaults(fn=cmd_convert)

    n = sub.add_parser("new-module", help="write an untrained glimpse module sized for a base model")
    n.add_argument("--model", required=True, help="local base model directory")
    n.add_argument("--out", required=True, help="output directory")
    n.add_argument("--preset", help="named preset of a released architecture: qwen2_5_vl_7b, qwen2_5_vl_3b, "
                   "llava_1_5_7b, llava_1_5_13b")
    n.add_argument("--small", action="store_true", help="small VIP widths for tiny test models")
    n.add_argument("--seed", type=int, default=0, help="initialisation seed")
    n.set_defaults(fn=cmd_new_module)

    t = sub.add_parser("make-tiny", help="write a tiny random model (DIR/model: Qwen2.5-VL or LLaVA-1.5), an "
                       "untrained module (DIR/module) and an image (DIR/example.png), for demos and tests")
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--family", choices=["qwen2_5_vl", "llava"], default="qwen2_5_vl", help="model family")
    t.add_argument("--seed", type=int, default=0, help="initialisation seed")
    t.set_defaults(fn=cmd_make_tiny)

    tk = sub.add_parser("tasks", help="list the registered benchmark tasks (eval --task NAME --data DIR)")
    tk.set_defaults(fn=cmd_tasks)

    d = sub.add_parser("demo", help="a browser app (Gradio, offline): ask a question about an image and see the "
                       "answer streamed, the kept tokens drawn and GlimpsePrune's cost beside the full-token run's",
                       description="Serve a Gradio app on this machine (nothing is shared or downloaded; telemetry "
                       "off). Upload an image or pick a rendered world scene, ask a question: the GlimpsePrune answer "
                       "streams in as it is decoded, the image is drawn with its kept visual tokens outlined and a "
                       "caption (question, answer, kept n/N), and a table puts GlimpsePrune's kept tokens, prefill "
                       "and decode time and KV-cache length beside the same question asked with every visual token. "
                       "The threshold and cap sliders re-run the question. Needs gradio: pip install "
                       "'glimpseprune[demo]'.")
    d.add_argument("--model", default="embedded", help="local base model folder (default: the embedded one)")
    d.add_argument("--module", default="embedded", help="glimpse module folder (or a GlimpsePrune+ folder)")
    d.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: reachable from other "
                   "machines)")
    d.add_argument("--port", type=positive_int, default=7860, help="port to serve on")
    d.add_argument("--max-new-tokens", type=positive_int, default=32, help="tokens to generate per answer")
    d.add_argument("--device", default="cpu", help="torch device")
    d.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="base model dtype")
    d.set_defaults(fn=cmd_demo)

    m = sub.add_parser("methods", help="list the registered pruning methods: where each prunes, its settings")
    m.add_argument("--json", action="store_true", help="print them as one JSON list")
    m.set_defaults(fn=cmd_methods)

    from .bench.report import add_bench_parser

    add_bench_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose and args.quiet:
        parser.error("-v/--verbose and -q/--quiet exclude each other")
    # bench runs are long: their progress is logged by default (stderr), other commands log on --verbose
    verbose = args.verbose or (args.cmd == "bench" and not args.quiet)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s" if verbose else "%(levelname)s %(message)s")
    try:
        with _library_output(verbose=args.verbose, quiet=args.quiet):
            return args.fn(args)
    except (ValueError, TypeError, OSError, KeyError) as err:  # what bad input raises: one line, no traceback
        if verbose:
            logging.exception("failed")
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {_printable(_in_flags(str(msg)))}", file=sys.stderr)
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


@contextlib.contextmanager
def _library_output(verbose: bool, quiet: bool):
    """transformers' and huggingface_hub's own output for one command: their progress bars ("Loading weights")
    only with -v; with -q their info and warnings too (which also hides the Trainer's progress bar); restored
    afterwards (``main`` may run inside a longer-lived process)."""
    from transformers.utils import logging as hf_logging

    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    if bars and not verbose:
        hf_logging.disable_progress_bar()  # also huggingface_hub's
    if quiet:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        if bars and not verbose:
            hf_logging.enable_progress_bar()
        hf_logging.set_verbosity(level)


# Library messages written for Python callers, as a command-line user must read them
_PYTHON_TO_FLAGS = [
    (r"pass module=load_module\(DIR\)", "pass --module DIR"),
    (r"pass layers=$", "pass --method-arg layers=A,B,C"),
    (r"Load both with gp\.load\(model_dir, module=.*$",
     "Load both: pass the folder as --module (or as a config's module:), which loads its adapter too"),
]


def _in_flags(message: str) -> str:
    for pattern, text in _PYTHON_TO_FLAGS:
        message = re.sub(pattern, text, message)
    return message


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
