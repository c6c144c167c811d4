"""What one more position costs a pruned prefill on the scaled CPU shape: the glimpse token makes GlimpsePrune's
sequence one position longer than ``mask``'s up to K, so part of ``glimpse``/``mask`` may be the matrix kernels' cost
of an odd length rather than the glimpse path's work. Times the ``mask`` prefill (4 % kept after K) with N and N + 1
text tokens, interleaved (order reversed every other repetition, as ``bench run``), and reports the paired ratio
(N + 1) / N per visual-token count. A diagnostic beside ``glimpseprune bench overhead``, not a bar; run it on idle
cores; it prints a line after every repetition.

    python benchmarks/one_more_token.py --n-vis 1024 2025 --n-text 64 --reps 24 --out results/bench/one_more_token

Writes OUT/one_more_token.json (refuses a folder that holds one unless --overwrite); the last stdout line is it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def main(argv=None) -> dict:
    from glimpseprune.bench.efficiency import (
        FrozenEncodeAdapter,
        _order,
        build_model,
        make_variant,
        near_square_grid,
        parse_variant,
        synth_inputs,
    )
    from glimpseprune.bench.meta import environment
    from glimpseprune.bench.overhead import _paired
    from glimpseprune.bench.shapes import load_shape
    from glimpseprune.registry import get_adapter
    from glimpseprune.runtime.engine import prefill

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="qwen2_5_vl_scaled_cpu")
    p.add_argument("--n-vis", type=int, nargs="+", default=[1024, 2025])
    p.add_argument("--n-text", type=int, default=64)
    p.add_argument("--keep", type=float, default=0.04)
    p.add_argument("--reps", type=int, default=24)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    out = Path(a.out) / "one_more_token.json"
    if out.exists() and not a.overwrite:
        raise SystemExit(f"{out} already holds a run: pass --overwrite to replace it")
    try:  # an output that cannot be written fails here, before minutes of timing
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SystemExit(f"--out {a.out}: cannot make that folder ({err})") from None
    shape = load_shape(a.shape)
    model = build_model(shape)
    fns = {}
    with torch.no_grad():
        for n_vis in a.n_vis:
            grid = near_square_grid(n_vis)
            for n_text in (a.n_text, a.n_text + 1):
                inputs = synth_inputs(shape, grid, n_text, 1)
                method, request = make_variant(parse_variant(f"mask:{a.keep}"), shape, [grid[0] * grid[1]],
                                               torch.device("cpu"))
                frozen = FrozenEncodeAdapter(get_adapter(model))
                frozen.prime(model, inputs, method)
                fns[(n_vis, n_text)] = lambda m=method, r=request, f=frozen, i=inputs: prefill(model, f, m, i, r)
        for fn in fns.values():  # warm-up
            fn()
        times = {k: [] for k in fns}
        start = time.perf_counter()
        for rep in range(a.reps):
            for k in _order(list(fns), rep):
                t0 = time.perf_counter()
                fns[k]()
                times[k].append(time.perf_counter() - t0)
            print(f"repetition {rep + 1}/{a.reps} done ({time.perf_counter() - start:.0f} s)", flush=True)
    rows = []
    for n_vis in a.n_vis:
        base, more = times[(n_vis, a.n_text)], times[(n_vis, a.n_text + 1)]
        rows.append({"n_vis": n_vis, "positions": n_vis + a.n_text,
                     "median_ms": {str(a.n_text): 1e3 * statistics.median(base),
                                   str(a.n_text + 1): 1e3 * statistics.median(more)},
                     "paired_ratio": _paired(more, base)})
        r = rows[-1]
        print(f"{n_vis} visual tokens, {r['positions']} -> {r['positions'] + 1} positions: mask prefill "
              f"x{r['paired_ratio']:.4f} (medians {r['median_ms'][str(a.n_text)]:.1f} -> "
              f"{r['median_ms'][str(a.n_text + 1)]:.1f} ms)")
    result = {"settings": vars(a), "environment": environment(torch.device("cpu")), "rows": rows,
              "raw_s": {f"{k[0]}/{k[1]}": v for k, v in times.items()}}
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("settings", "rows")}))
    return result


if __name__ == "__main__":
    main()
