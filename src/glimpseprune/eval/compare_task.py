"""``glimpseprune compare --task NAME --data DIR``: pruning methods x budgets on a registered benchmark.

The same plan as the world comparison (``bench.compare.plan``: ``full`` once, every fixed-ratio method at every
budget, GlimpsePrune at the same budgets and in its dynamic settings), each run through the generic task path
(``eval.runner.run_task``: the task's prompt, length-sorted batches, the task's metric, the judge for free-form
tasks). Per run it writes ``OUT/runs/<label>.samples.jsonl`` as the samples come and ``OUT/runs/<label>.json`` when
the run is done (the world schema, with ``score`` / ``metric`` in place of exact match and the same three token
counts); then ``compare.md`` and ``compare.png``. ``resume``: finished runs are read back, an interrupted run
continues from its samples file.

The ground-truth-box ``oracle`` needs boxes in the world's coordinates; benchmark tasks have none, so it is refused.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from ..bench.accuracy import read_rows
from ..bench.compare import BUDGETS, DEFAULT_CAP, RUN_VERSION, RunSpec, _method, plan, plot, slug
from ..outputs import atomic_write_text, atomic_write_text_lines, read_json
from .runner import run_task, summarize_task


def _run_summary(spec: RunSpec, task, rows: list[dict], summary: dict, n_layers: int, seconds: float) -> dict:
    from ..bench.accuracy import _stats

    mean = lambda key: statistics.fmean(r[key] for r in rows) if rows else float("nan")  # noqa: E731
    per = {}
    for k, v in summary.get("per_category", {}).items():
        per[k] = {"n": v.get("n"), "score": v["score"] if "score" in v else v.get("f1")}
    return {
        "version": RUN_VERSION, "label": spec.label, "method": spec.method, "setting": spec.setting,
        "budget": spec.budget, "config": {**spec.kwargs, **({"selection": spec.selection}
                                                             if spec.selection is not None else {})},
        "task": task.name, "metric": task.metric, "n": len(rows), "n_layers": n_layers,
        "score": summary["score"],
        "kept_frac": _stats([r["kept_frac"] for r in rows]),
        "accounting": {
            "mean_n_vis": mean("n_vis"),
            "visual_tokens_entering_llm": mean("entering"),
            "equivalent_visual_tokens": mean("equivalent"),
            "equivalent_frac": statistics.fmean(r["equivalent"] / max(r["n_vis"], 1) for r in rows) if rows
            else float("nan"),
            "kv_entries_at_decode": mean("kv_len"),
            "visual_kv_at_decode": mean("n_kept"),
        },
        "per_family": per,
        "task_summary": {k: v for k, v in summary.items() if k in ("per_category", "mme")},
        "ms_per_sample": summary["ms_per_sample"],
        "seconds": round(seconds, 2),
    }


def _done_summary(path: Path, label: str) -> dict:
    """The summary an earlier run of ``label`` wrote (``--resume``); a file that is not one is named, not trusted."""
    summary = read_json(path, "compare run summary")
    if not isinstance(summary, dict) or summary.get("label") != label or summary.get("version") != RUN_VERSION:
        raise ValueError(f"{path} is not the summary of run {label!r} (version {RUN_VERSION}): delete it to rerun "
                         "that run, or pass --overwrite to start again")
    return summary


def compare_task(model, processor, module, task, samples: list, out, methods: list[str],
                 budgets: list[float] = BUDGETS, cap: float = DEFAULT_CAP, batch_size: int = 8,
                 max_new_tokens: int = 32, judge=None, meta: dict | None = None, resume: bool = False,
                 progress: bool = True, log=print) -> list[dict]:
    """Run the plan on ``samples`` of ``task``; returns one summary per run (see the module docstring)."""
    from ..api import PrunedModel
    from ..bench.compare import markdown
    from ..bench.meta import environment
    from ..registry import get_adapter

    if "oracle" in methods:
        raise ValueError(f"method 'oracle' needs ground-truth boxes; task {task.name} has none: leave it out of "
                         "--methods")
    if "glimpse" in methods and module is None:
        raise ValueError("method 'glimpse' needs a glimpse module (--module)")
    if not samples:
        raise ValueError(f"{task.name}: no samples to compare on")
    specs = plan(methods, list(budgets), cap)
    out = Path(out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    n_layers = len(get_adapter(model).layers(model))
    env: dict[str, Any] = environment(next(model.parameters()).device)
    results = []
    for n, spec in enumerate(specs, 1):
        done_file = out / "runs" / f"{slug(spec.label)}.json"
        rows_file = out / "runs" / f"{slug(spec.label)}.samples.jsonl"
        if resume and done_file.is_file():
            results.append(_done_summary(done_file, spec.label))
            log(f"{spec.label:32s} done in the earlier run ({done_file})")
            continue
        done = read_rows(rows_file) if resume else []
        if done:  # rewrite whole first: a torn last line of the interrupted run is gone
            atomic_write_text_lines(rows_file, done)
        pm = PrunedModel(model, _method(spec, module), processor)
        t0 = time.time()
        with rows_file.open("a" if done else "w") as f:
            def on_row(row: dict) -> None:
                f.write(json.dumps(row) + "\n")
                f.flush()

            rows = run_task(pm, task, samples, batch_size=batch_size, max_new_tokens=max_new_tokens, on_row=on_row,
                            done=done, judge=judge, progress=f"[{n}/{len(specs)}] {spec.label}" if progress else False)
        summary = _run_summary(spec, task, rows, summarize_task(task, rows), n_layers, time.time() - t0)
        summary.update({**(meta or {}), "environment": env})
        atomic_write_text(done_file, json.dumps(summary, indent=1) + "\n")
        results.append(summary)
        a = summary["accounting"]
        log(f"{spec.label:32s} {task.metric} {summary['score']:.4f}  kept {100 * summary['kept_frac']['mean']:5.1f} %"
            f"  entering {a['visual_tokens_entering_llm']:6.1f}  equiv {a['equivalent_visual_tokens']:6.1f}  "
            f"KV {a['kv_entries_at_decode']:6.1f}  ({summary['seconds']:.0f} s)")
    md = markdown(results, score_key="score", score_name=f"{task.name} {task.metric}")
    atomic_write_text(out / "compare.md", md)
    png = plot(results, out / "compare.png", score_key="score", score_name=f"{task.name} {task.metric}")
    log(md)
    log(f"wrote {out / 'runs'}/*.json, {out / 'compare.md'}" + (f", {png}" if png else
                                                                   " (no plot: pip install matplotlib)"))
    return results
