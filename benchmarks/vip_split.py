"""Where the glimpse path's prefill overhead over ``mask`` goes, on the scaled CPU shape by default (a diagnostic beside
``glimpseprune bench overhead``, not a bar): for each visual-token count, four prefills timed interleaved after
warm-up, as paired ratios to ``mask`` (the same kept count, no glimpse token, no VIP):

* ``glimpse``  -- the real GlimpsePrune prefill;
* ``replayed`` -- the same prefill with the VIP's forward replaced by its output captured from one real prefill (the
  glimpse token, query logits, taps, selection and compaction all run; the VIP computes nothing): the overhead that
  is not the VIP;
* ``vip``      -- the VIP's forward alone on the inputs of that prefill;

and, from the profiler, the share of the VIP's own time spent in its attention kernel (the rest: projections, RoPE,
norms, MLP). On a shared 2-core VM run it idle; ratios move by a point or two between runs.

    python benchmarks/vip_split.py --n-vis 1024 2025 --reps 24 --out results/bench/vip_split

The real Qwen2.5-VL-7B shape fits 24 GB of RAM in bfloat16 (random weights; a prefill takes 80-130 s on 2 cores, so
a repetition of the four runs ~5 min, 56 min in all with the warm-up; a line is printed after each):

    python benchmarks/vip_split.py --shape qwen2_5_vl_7b --dtype bfloat16 --n-vis 5041 --n-text 33 --keep 0.034 \
        --warmup 1 --reps 8 --out results/bench/vip_split_7b_cpu

``--tiny-widths`` keeps the shape's structure (decoder layers, K, grouped attention, ViT blocks and taps, VIP blocks
and heads) but makes every width tiny, so that compute is negligible and the times are what the host spends issuing
the ops: on a GPU, where the kernels after K are about as short as their launches, that is the part of the glimpse
path's cost that no FLOP count shows (an indication for a GPU, measured on CPU):

    python benchmarks/vip_split.py --shape qwen2_5_vl_7b --tiny-widths --n-vis 64 --reps 48 --out results/bench/host

Writes OUT/vip_split.json (refuses a folder that holds another run unless --overwrite); the last stdout line is it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn


class Replay(nn.Module):
    """Stands in for a VIP: returns one captured output; anything else (``project_condition``) goes to the real one."""

    def __init__(self, vip: nn.Module, out: torch.Tensor):
        super().__init__()
        self.real, self.out = vip, out

    def project_condition(self, i, feats):
        return self.real.project_condition(i, feats)

    def forward(self, *args, **kwargs):
        return self.out


def tiny_widths(shape):
    """``shape`` with its structure (decoder layers, K, grouped or plain attention, ViT blocks and taps, VIP blocks and
    heads) and tiny widths: the text model gets 4 query heads of 8 dimensions (M-RoPE splits a head in four) and one
    K/V head if the shape groups them (an op runs once for all heads: their number changes no op count), hidden 32."""
    import dataclasses

    from glimpseprune.bench.shapes import VIPShape

    t, v, vip = shape.text, shape.vision, shape.vip
    text = dataclasses.replace(t, hidden_size=32, num_heads=4, num_kv_heads=1 if t.num_kv_heads < t.num_heads else 4,
                               head_dim=8, intermediate_size=64, vocab_size=1024)
    vision = dataclasses.replace(v, hidden_size=4 * v.num_heads, intermediate_size=8 * v.num_heads,
                                 out_hidden_size=text.hidden_size)
    h = vip.vip_heads
    return dataclasses.replace(shape, name=f"{shape.name}_tiny_widths", text=text, vision=vision,
                               vip=VIPShape(vip_width=2 * h, cond_width=2 * h, vip_heads=h, vip_mlp_width=4 * h),
                               prune_layer=shape.default_k)


def vip_attention_share(vip: nn.Module, args, kwargs, reps: int = 5) -> float:
    """Fraction of the VIP's profiled CPU time spent in scaled-dot-product-attention kernels."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            vip(*args, **kwargs)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    attn = sum(e.self_cpu_time_total for e in events if "scaled_dot_product" in e.key)
    return attn / total


@torch.no_grad()
def measure(model, shape, n_vis: int, keep: float, warmup: int, reps: int, context: bool = False,
            n_text: int = 64, dtype: str = "float32") -> dict:
    """``context`` also times the stock text model and the runtime's ``full`` (keep everything) beside them. Prints a
    line after every repetition (on the 7B shape on a CPU one takes minutes); keeps the raw seconds, and gives each
    ratio to ``mask`` a 95 % bootstrap interval over the repetitions (``overhead._paired_ci``)."""
    from glimpseprune.bench.efficiency import (
        FrozenEncodeAdapter,
        make_variant,
        near_square_grid,
        parse_variant,
        synth_inputs,
    )
    from glimpseprune.bench.overhead import _paired, _paired_ci, capture_vip_call, rotation
    from glimpseprune.registry import get_adapter
    from glimpseprune.runtime.engine import prefill

    device = torch.device("cpu")
    grid = near_square_grid(n_vis)
    inputs = synth_inputs(shape, grid, n_text, 1, "cpu", 0)
    nv = [grid[0] * grid[1]]
    runs = {n: make_variant(parse_variant(f"{n}:{keep}"), shape, nv, device, 0, dtype=dtype)
            for n in ("mask", "glimpse")}
    frozen = FrozenEncodeAdapter(get_adapter(model))
    for method, _ in runs.values():
        frozen.prime(model, inputs, method)
    method, request = runs["glimpse"]
    module, vip = method.module, method.module.vip
    # three untimed prefills before the warm-up (minutes each on the 7B shape on a CPU): say so
    print("  capturing the VIP's call and checking its replay against a real prefill (3 prefills) ...", flush=True)
    args, kwargs, out = capture_vip_call(model, frozen, runs["glimpse"], inputs)

    def replayed():
        module.vip = Replay(vip, out)
        try:
            return prefill(model, frozen, method, inputs, request)
        finally:
            module.vip = vip

    real, again = prefill(model, frozen, method, inputs, request), replayed()
    if not torch.equal(real.logits, again.logits):  # the stand-in must change nothing but the VIP's cost
        raise RuntimeError("the prefill with the VIP's output replayed differs from the real one")
    del real, again  # their caches freed before timing
    fns = {"mask": lambda: prefill(model, frozen, runs["mask"][0], inputs, runs["mask"][1]),
           "glimpse": lambda: prefill(model, frozen, method, inputs, request),
           "replayed": replayed, "vip": lambda: vip(*args, **kwargs)}
    if context:
        from glimpseprune.bench.overhead import StockRun

        full = make_variant(parse_variant("full"), shape, nv, device, 0, dtype=dtype)
        frozen.prime(model, inputs, full[0])
        stock, enc = StockRun(model), frozen.encode(model, inputs, ())
        fns.update(stock=lambda: stock.prefill(enc), full=lambda: prefill(model, frozen, full[0], inputs, full[1]))
    names = list(fns)
    t_start = time.perf_counter()
    for w in range(warmup):
        for n in names:
            fns[n]()
        print(f"  warm-up {w + 1}/{warmup} done ({time.perf_counter() - t_start:.0f} s)", flush=True)
    sec = {n: [] for n in names}
    for r in range(reps):  # every variant takes every position, and follows every other, equally often
        for n in rotation(names, r):
            t0 = time.perf_counter()
            fns[n]()
            sec[n].append(time.perf_counter() - t0)
        print(f"  repetition {r + 1}/{reps} done ({time.perf_counter() - t_start:.0f} s): "
              + ", ".join(f"{n} {sec[n][-1] / sec['mask'][-1]:.3f}" for n in names if n != "mask")
              + " of mask", flush=True)
    return {"n_vis": nv[0], "grid": list(grid), "keep": keep, "n_text": n_text, "dtype": dtype,
            "median_ms": {n: 1000 * statistics.median(v) for n, v in sec.items()},
            "vs_mask": {n: _paired(sec[n], sec["mask"]) for n in names if n != "mask"},
            "vs_mask_ci95": {n: list(_paired_ci(sec[n], sec["mask"])) for n in names if n != "mask"},
            "raw_s": sec, "vip_attention_share": vip_attention_share(vip, args, kwargs)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="qwen2_5_vl_scaled_cpu", help="shape name in configs/shapes/ or a JSON path")
    ap.add_argument("--n-vis", type=int, nargs="+", default=[1024, 2025])
    ap.add_argument("--n-text", type=int, default=64, help="non-visual prompt tokens")
    ap.add_argument("--keep", type=float, default=0.04)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="model and module dtype (the 7B shape fits 24 GB of RAM in bfloat16 only)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=24)
    ap.add_argument("--out", required=True)
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--tiny-widths", action="store_true",
                    help="the shape's structure with tiny widths: host time, not compute (see the module docstring)")
    a = ap.parse_args(argv)
    out = Path(a.out)
    target = out / "vip_split.json"
    if target.exists() and not a.overwrite:
        raise SystemExit(f"{target} exists: pass --overwrite to replace it")
    try:  # a path that cannot be a folder fails here, before the model is built
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SystemExit(f"--out {out}: cannot make that folder ({err})") from err
    from glimpseprune.bench.efficiency import build_model
    from glimpseprune.bench.meta import environment
    from glimpseprune.bench.shapes import load_shape

    shape = load_shape(a.shape)
    if a.tiny_widths:
        shape = tiny_widths(shape)
    model = build_model(shape, "cpu", a.dtype, "sdpa", 0)
    result = {"shape": shape.name, "settings": vars(a), "environment": environment(torch.device("cpu")), "rows": [],
              "shape_spec": shape.to_dict()}
    for n in a.n_vis:
        print(f"{n} visual tokens: timing {a.reps} repetitions of {6 if a.tiny_widths else 4} runs ...", flush=True)
        row = measure(model, shape, n, a.keep, a.warmup, a.reps, context=a.tiny_widths, n_text=a.n_text,
                      dtype=a.dtype)
        result["rows"].append(row)
        r, (lo, hi) = row["vs_mask"], row["vs_mask_ci95"]["glimpse"]
        print(f"{row['n_vis']} visual tokens: glimpse/mask {r['glimpse']:.3f} ({lo:.3f}-{hi:.3f}), "
              f"replayed-VIP/mask {r['replayed']:.3f}, "
              f"VIP alone/mask {r['vip']:.3f}; attention kernel {row['vip_attention_share']:.0%} of the VIP's time",
              flush=True)
        print("  median ms: " + ", ".join(f"{k} {v:.2f}" for k, v in row["median_ms"].items()), flush=True)
        target.write_text(json.dumps(result, indent=1))  # written as each row comes
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
