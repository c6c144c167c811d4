"""Padded vs grouped execution after pruning, on the scaled CPU shape: a batch of 8 one-image samples (32 x 32 = 1,024
visual + 64 text tokens each) whose kept counts are 8, 40, ..., 232 visual tokens (fixed random masks, ``mask``
method), pruned after layer K. Prefill (LLM part, encode replayed) timed interleaved, `group=False` vs `group=True`,
paired median ratio; also the live-tensor peak of each and the slot counts after K. Last stdout line: JSON.

    python benchmarks/grouping_cpu.py [--ks -1 2 5] [--reps 8] [--out results/bench/grouping_cpu/result.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from glimpseprune.bench import efficiency as E
from glimpseprune.bench.meta import environment
from glimpseprune.bench.shapes import load_shape
from glimpseprune.registry import get_adapter
from glimpseprune.runtime.engine import prefill
from glimpseprune.runtime.groups import plan_groups


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ks", type=int, nargs="+", default=[-1, 2, 5], help="pruning layers K to measure")
    p.add_argument("--reps", type=int, default=8, help="timed, interleaved repetitions")
    p.add_argument("--out", help="JSON result path")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    shape = load_shape("qwen2_5_vl_scaled_cpu")
    model = E.build_model(shape)
    B, grid = 8, (32, 32)
    inputs = E.synth_inputs(shape, grid, 64, B)
    n = grid[0] * grid[1]
    kept = [8 + 32 * b for b in range(B)]
    g = torch.Generator().manual_seed(0)
    masks = []
    for k in kept:
        m = torch.zeros(n, dtype=torch.bool)
        m[torch.randperm(n, generator=g)[:k]] = True
        masks.append(m)
    frozen = E.FrozenEncodeAdapter(get_adapter(model))
    frozen.encode(model, inputs, ())
    rows = {}
    for K in args.ks:
        method = E.make_variant(E.parse_variant(f"mask:0.5@{K}"), shape, [n] * B, "cpu")[0]
        fns = {grp: (lambda grp=grp, method=method: prefill(model, frozen, method, inputs, {"keep_masks": masks},
                                                            group=grp))
               for grp in (False, True)}
        lengths = fns[False]().key_mask.sum(1).tolist()
        groups = plan_groups(lengths)
        for f in fns.values():
            f()
        times = {grp: [] for grp in fns}
        for r in range(args.reps):
            for grp in ((False, True) if r % 2 == 0 else (True, False)):
                t0 = time.perf_counter()
                fns[grp]()
                times[grp].append(time.perf_counter() - t0)
        ratio = statistics.median(b / a for a, b in zip(times[False], times[True]))
        peaks = {str(grp): E.tensor_peak_bytes(f)[0] for grp, f in fns.items()}
        slots_padded = B * max(lengths)
        slots_grouped = sum(len(gr) * max(lengths[i] for i in gr) for gr in groups) if groups else slots_padded
        rows[str(K)] = {"K": K, "lengths_after_K": lengths, "groups": groups, "slots_padded": slots_padded,
                        "slots_grouped": slots_grouped,
                        "prefill_ms": {str(grp): 1000 * statistics.median(t) for grp, t in times.items()},
                        "grouped_vs_padded_prefill": ratio, "peak_bytes": peaks}
        print(f"K={K}: lengths after K {lengths}; groups {groups}; slots {slots_padded} -> {slots_grouped}; prefill "
              f"padded {1000 * statistics.median(times[False]):.0f} ms, grouped "
              f"{1000 * statistics.median(times[True]):.0f} ms (paired ratio {ratio:.3f}); live-tensor peak "
              f"{peaks['False'] / 2**20:.1f} -> {peaks['True'] / 2**20:.1f} MiB", flush=True)
    result = {"schema": "glimpseprune.bench.grouping/1", "meta": environment("cpu"), "shape": shape.name,
              "batch": B, "grid": list(grid), "n_text": 64, "kept": kept, "reps": args.reps, "rows": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: {"ratio": r["grouped_vs_padded_prefill"], "slots": [r["slots_padded"], r["slots_grouped"]]}
                      for k, r in rows.items()}))


if __name__ == "__main__":
    main()
