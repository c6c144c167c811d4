"""Accuracy vs measured prefill cost of GlimpsePrune modules trained at different pruning layers K on the embedded
world model (issue 12's stretch: is 2/3 depth necessary?). For each module: exact match on a split (greedy, as the
main job), the mean kept fraction, and the LLM prefill time relative to keeping everything, measured on the same
batches (encode replayed), interleaved, paired medians; plus the analytic prefill ratio at the split's mean counts.

    python benchmarks/k_trained_cpu.py --split world/records.jsonl --modules embedded runs/stage1-world-k1/module \
        runs/stage1-world-k0/module --out results/k_trained/result.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import glimpseprune as gp
from glimpseprune.assets import resolve_model, resolve_module
from glimpseprune.bench import accuracy
from glimpseprune.bench.efficiency import FrozenEncodeAdapter
from glimpseprune.bench.flops import prefill_flops
from glimpseprune.bench.meta import environment
from glimpseprune.bench.shapes import ModelShape
from glimpseprune.data.records import read_records
from glimpseprune.processing import load_image
from glimpseprune.runtime.engine import prefill


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--split", required=True)
    p.add_argument("--modules", nargs="+", required=True, help="module folders ('embedded' for the shipped one)")
    p.add_argument("--limit", type=int, default=500)
    p.add_argument("--timing-batches", type=int, default=8, help="batches of 8 of the split timed per repetition")
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--out")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    split = Path(args.split)
    model, processor = gp.load_base(resolve_model("embedded"))
    adapter = gp.get_adapter(model)
    mods = {m: gp.load_module(resolve_module(m), adapter.dims(model)) for m in args.modules}
    rows = {}
    full_pm = gp.apply(model, "full", processor=processor)
    _, full = accuracy.run(full_pm, split, limit=args.limit)
    for name, mod in mods.items():
        _, summ = accuracy.run(gp.apply(model, "glimpse", module=mod, processor=processor), split, limit=args.limit)
        rows[name] = {"K": mod.cfg.prune_layer, "exact_match": summ["exact_match"],
                      "relative_accuracy": summ["exact_match"] / full["exact_match"],
                      "kept_frac": summ["kept_frac"]["mean"], "kv_len": summ["mean_kv_len"]}
        print(f"{name}: K={mod.cfg.prune_layer} exact match {summ['exact_match']:.4f} "
              f"({100 * rows[name]['relative_accuracy']:.1f} % of full {full['exact_match']:.4f}), kept "
              f"{100 * summ['kept_frac']['mean']:.1f} %", flush=True)
    # timing: the same batches for every run, encode replayed
    recs = read_records(split, args.timing_batches * 8)
    batches = []
    for i in range(0, len(recs), 8):
        chunk = recs[i:i + 8]
        batches.append(full_pm.prepare([[load_image(r.image_path(split.parent))] for r in chunk],
                                       [r.question for r in chunk]))
    frozen = FrozenEncodeAdapter(adapter)
    methods = {"full": gp.make_method("full")}
    methods.update({n: gp.make_method("glimpse", m) for n, m in mods.items()})
    for m in methods.values():
        for b in batches:
            frozen.prime(model, b, m)

    def run(m):
        for b in batches:
            prefill(model, frozen, m, b)
    names = list(methods)
    for n in names:
        run(methods[n])
    times = {n: [] for n in names}
    for r in range(args.reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            run(methods[n])
            times[n].append(time.perf_counter() - t0)
    shape = ModelShape.from_hf(model.config, name="embedded")
    n_vis, n_text = full["mean_n_vis"], round(full["mean_kv_len"] - full["mean_n_vis"])
    base = prefill_flops(shape, n_text, round(n_vis)).llm
    for name, mod in mods.items():
        row = rows[name]
        row["prefill_ratio_measured"] = statistics.median(a / b for a, b in zip(times[name], times["full"]))
        # the pruning schedule's LLM FLOPs at the split's mean counts (glimpse token and VIP not included)
        row["prefill_ratio_analytic"] = prefill_flops(
            shape, n_text, round(n_vis), max(1, round(row["kept_frac"] * n_vis)), mod.cfg.prune_layer).llm / base
    result = {"schema": "glimpseprune.bench.k_trained/1", "meta": environment("cpu"), "split": str(split),
              "full_exact_match": full["exact_match"], "full_prefill_ms_per_batch": 1000 * statistics.median(
                  times["full"]) / len(batches), "rows": rows}
    print("| module | K | exact match | % of full | kept % | prefill vs full, measured | analytic |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['K']} | {r['exact_match']:.4f} | {100 * r['relative_accuracy']:.1f} | "
              f"{100 * r['kept_frac']:.1f} | {r['prefill_ratio_measured']:.3f} | {r['prefill_ratio_analytic']:.3f} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({n: {k: r[k] for k in ("K", "exact_match", "prefill_ratio_measured")} for n, r in rows.items()}))


if __name__ == "__main__":
    main()
