"""``glimpseprune compare``: pruning methods x budgets (or the pruning-layer sweep) on a world split or a
benchmark task: one JSON per run, a table and a plot."""

from __future__ import annotations

import json
from pathlib import Path

from .common import _note, check_device
from .evaluate import _check_split, _judge
from .method_args import _module_arg

DEFAULT_BUDGETS = [0.056, 0.111, 0.222, 0.333]  # kept fractions of the fixed-budget runs
DEFAULT_CAP = 0.111  # GlimpsePrune's capped dynamic run
COMPARE_OWNED = ["runs", "compare.md", "compare.png", "k_sweep.json", "k_sweep.md", "k_sweep.png"]


def _check_split_images(split: str, records: list) -> None:
    """A comparison reruns whole (no --resume): an image missing from the split's ``records`` is named, with its
    record, before the output folder is claimed, not halfway through the first method."""
    root = Path(split).parent
    for n, rec in enumerate(records, 1):
        if not rec.image_path(root).is_file():
            raise ValueError(f"--split {split}: record {n} (id {rec.id}) names image {rec.image}, which is not at "
                             f"{rec.image_path(root)}")


def default_methods(benchmark_task: bool) -> list[str]:
    """What ``compare`` runs without --methods: every registered method a comparison can run (not those needing
    caller masks or another kind of module; not oracle on a benchmark task, which has no boxes)."""
    from ..bench.compare import MASK_METHODS, OTHER_MODULE_METHODS
    from ..registry import list_methods

    skip = (*MASK_METHODS, *OTHER_MODULE_METHODS, "full") + (("oracle",) if benchmark_task else ())
    return [m for m in list_methods() if m not in skip]


def cmd_compare(args) -> int:
    import torch

    from ..api import load_base, module_dtype
    from ..assets import resolve_model, resolve_module
    from ..bench.compare import compare, k_sweep, plan
    from ..checkpoint import adapter_record, load_plus
    from ..outputs import claim_run_dir

    if (args.split is None) == (args.task is None):
        raise ValueError("give either --split (a records JSONL) or --task NAME --data DIR")
    if args.k_sweep:  # the sweep runs its own methods at its own budget: these would be ignored
        given = [f for f, v in (("--methods", args.methods), ("--budgets", args.budgets), ("--cap", args.cap))
                 if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} would be ignored by --k-sweep (it runs GlimpsePrune's masks, the "
                             "oracle boxes and attention top-k at each K): leave them out, or drop --k-sweep")
    args.budgets = DEFAULT_BUDGETS if args.budgets is None else args.budgets
    args.cap = DEFAULT_CAP if args.cap is None else args.cap
    task = samples = None
    if args.task is not None:
        from ..eval.tasks import get_task

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
        _check_split_images(args.split, _check_split(args.split, args.limit))
    methods = args.methods or default_methods(task is not None)
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
    runs_module = "glimpse" in methods or args.k_sweep
    used = module_arg is not None and (runs_module or adapter_record(resolve_module(module_arg)) is not None)
    if used:
        # a GlimpsePrune+ folder brings its LoRA adapter (merged into the base: every method then runs on the
        # adapted model, the one the module was trained with), whichever methods are compared, as in ask / eval
        model, module = load_plus(model, resolve_module(module_arg), device=args.device, dtype=module_dtype(model))
        if not runs_module:
            module = None  # its adapter applies; no method here runs its module
    torch.manual_seed(0)
    meta = {"model": str(args.model), "module": str(module_arg) if used else None}
    log = (lambda text: _note(args, text)) if args.json else print  # the table is the result, unless --json
    if task is not None:
        from ..eval.compare_task import compare_task

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
                       args.batch_size, meta=meta, log=log, progress=not args.quiet)
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
