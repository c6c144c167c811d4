"""Efficiency reports: run metadata, one JSON per run, a markdown table, PNG plots (matplotlib, optional), and the
``glimpseprune bench`` command (``add_bench_parser``).

    glimpseprune bench flops --shape qwen2_5_vl_7b --n-vis 5041 --n-text 33 --keep 0.034
    glimpseprune bench flops --shape qwen3_vl_8b --video-frames 16 --frame-size 448x448 --keep 0.1
    glimpseprune bench sweep --shape qwen2_5_vl_3b --keep 0.082 [--measure --shape qwen2_5_vl_scaled_cpu]
    glimpseprune bench run --shape qwen2_5_vl_7b --device cuda --dtype bfloat16 --out runs/bench/table7
    glimpseprune bench ratio-check          (scaled CPU shape: measured vs analytic prefill ratio, < 3 min)

``python -m glimpseprune.bench.report bench ...`` takes the same arguments (``benchmarks/_bench_cmd.sh`` falls back to
it where no ``glimpseprune`` executable is on PATH).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

PLOTS_MISSING = "matplotlib is not installed: plots skipped (pip install matplotlib to get them)"


def write_json(result: dict, out_dir: str | Path, name: str = "result.json") -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return path


def _fmt(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def markdown_table(result: dict) -> str:
    """One row per variant: tokens, analytic and measured prefill cost (absolute and % of full), decode, e2e."""
    rows = result["results"]
    batches = sorted({int(b) for r in rows.values() for b in r.get("end_to_end", {})})
    head = ["variant", "K", "kept %", "KV len", "equiv. tokens", "prefill GFLOPs", "% of full (analytic)",
            "prefill ms", "% of full (measured)", "decode ms/token"]
    head += [f"tok/s B={b}" for b in batches] + [f"decode tok/s B={b}" for b in batches]
    head += [f"{k} MiB B={b}" for b in batches[:1] for k in ("peak", "rise")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        a = r["analytic"]
        cells = [name, str(a["prune_layer"]), _fmt(100 * a["n_kept"] / a["n_vis"]), str(a["kv_len"]),
                 _fmt(a["equivalent_tokens"]), _fmt(a["prefill_llm_flops"] / 1e9),
                 _fmt(100 * r["prefill_ratio_analytic"]), _fmt(1000 * r["prefill_s"]["median"], 2),
                 _fmt(100 * r["prefill_ratio_measured"]),
                 _fmt(r.get("decode_ms_per_token", {}).get("median"), 2)]
        e2e = r.get("end_to_end", {})
        cells += [_fmt(e2e.get(str(b), {}).get("tokens_per_s")) for b in batches]
        cells += [_fmt(e2e.get(str(b), {}).get("decode_tokens_per_s")) for b in batches]
        for b in batches[:1]:
            mem = e2e.get(str(b), {}).get("memory")
            cells += [_fmt(mem[k] / 2**20, 0) if mem else "–" for k in ("peak_bytes", "delta_bytes")]
        lines.append("| " + " | ".join(cells) + " |")
    s, meta = result["settings"], result["meta"]
    mem_method = next((x["memory"]["method"] for r in rows.values() for x in r.get("end_to_end", {}).values()
                       if "memory" in x), "not measured")
    lines += ["", f"Shape {result['shape']['name']}, grid {s['grid'][0]}x{s['grid'][1]} visual + {s['n_text']} text "
              f"tokens, prefill batch {s['prefill_batch']}, {s['reps']} reps (median) after {s['warmup']} warm-up, "
              f"{meta['device']} ({meta['device_name']}), {s['dtype']}, torch {meta['torch']}, transformers "
              f"{meta['transformers']}, commit {meta['git_commit']}. Prefill = LLM part (ViT excluded); FLOPs count "
              f"a multiply-add as 2, attention causal={s['causal']}. Peak memory: {mem_method} (rise = peak minus the "
              f"memory in use before the call)."]
    return "\n".join(lines) + "\n"


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _figure(**kw):
    """A matplotlib ``Figure`` with constrained layout, not registered with pyplot (nothing to close, no global
    state), or None when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure(layout="constrained", **kw)


def write_plots(result: dict, out_dir: str | Path) -> list[Path] | str:
    """prefill_ratio.png (analytic vs measured % of full) and, with end-to-end runs, throughput.png. Returns the
    paths, or the message ``PLOTS_MISSING`` when matplotlib is not installed."""
    plt = _pyplot()
    if plt is None:
        logger.warning(PLOTS_MISSING)
        return PLOTS_MISSING
    out, rows, paths = Path(out_dir), result["results"], []
    out.mkdir(parents=True, exist_ok=True)
    names = list(rows)
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 3.5))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [100 * rows[n]["prefill_ratio_analytic"] for n in names], 0.4, label="analytic")
    ax.bar([x + 0.2 for x in xs], [100 * rows[n]["prefill_ratio_measured"] for n in names], 0.4, label="measured")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("prefill, % of full")
    ax.set_title(f"{result['shape']['name']} prefill cost")
    ax.legend()
    fig.tight_layout()
    paths.append(out / "prefill_ratio.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    if any(r.get("end_to_end") for r in rows.values()):
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        for ax, key, label in ((axes[0], "tokens_per_s", "end-to-end tokens/s"),
                               (axes[1], "decode_tokens_per_s", "decode-only tokens/s")):
            for n in names:
                pts = sorted((int(b), x[key]) for b, x in rows[n].get("end_to_end", {}).items() if key in x)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=n)
            ax.set_xlabel("batch size")
            ax.set_ylabel(label)
            ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / "throughput.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def plot_sweep(rows: list[dict], out_dir: str | Path, title: str) -> list[Path] | str:
    plt = _pyplot()
    if plt is None:
        logger.warning(PLOTS_MISSING)
        return PLOTS_MISSING
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["prune_layer"] for r in rows], [100 * r["ratio"] for r in rows], marker=".", label="analytic")
    meas = [r for r in rows if r.get("measured_ratio") is not None]
    if meas:
        ax.plot([r["prune_layer"] for r in meas], [100 * r["measured_ratio"] for r in meas], "o", label="measured")
    ax.set_xlabel("pruning layer K")
    ax.set_ylabel("prefill, % of full")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path = out / "sweep.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


# ----------------------------------------------------------------------------------------------- the command


def _two_sizes(text: str, what: str) -> tuple[int, int]:
    """"AxB" -> (A, B), both whole numbers >= 1; else an argparse error asking for ``what``."""
    a, sep, b = text.lower().partition("x")
    try:
        pair = int(a), int(b)
    except ValueError:
        pair = (0, 0)
    if not sep or min(pair) < 1:
        raise argparse.ArgumentTypeError(f"give {what} (got {text!r})")
    return pair


def _grid(text: str) -> tuple[int, int]:
    """"HxW" merged tokens -> (h, w)."""
    return _two_sizes(text, "the merged-token grid as HxW with both at least 1, e.g. 71x71")


def _pixels(text: str) -> tuple[int, int]:
    """"WxH" in pixels -> (width, height)."""
    return _two_sizes(text, "width x height in pixels, e.g. 448x448")


def _common(p: argparse.ArgumentParser, n_vis: int = 2025, n_text: int = 64) -> None:
    p.add_argument("--shape", default="qwen2_5_vl_scaled_cpu", help="shape name in configs/shapes/ or a JSON path")
    p.add_argument("--n-vis", type=_at_least(1), default=n_vis, help="visual tokens per sample (near-square grid)")
    p.add_argument("--grid", type=_grid, help="merged-token grid HxW (overrides --n-vis), e.g. 71x71")
    p.add_argument("--n-text", type=_at_least(0), default=n_text, help="non-visual prompt tokens per sample")
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True,
                   help="count causal attention pairs n(n+1)/2, as the runtime's maskless causal kernels execute "
                   "(default); --no-causal counts n^2, as an explicit-mask kernel would")


def _settings(args, **kw):
    from .efficiency import BenchSettings

    return BenchSettings(shape=args.shape, n_vis=args.n_vis, grid=args.grid, n_text=args.n_text, causal=args.causal,
                         **kw)


def _flops_visual(args, shape) -> tuple[tuple[int, int], int, int, dict | None]:
    """(per-image / per-frame-group grid, frame-groups t, added text tokens, the video's JSON record or None) of
    ``bench flops``: one image of --grid / --n-vis tokens, or with --video-frames one video."""
    from . import flops as F

    if args.frame_size is not None and not args.video_frames:
        raise ValueError("bench flops: --frame-size needs --video-frames")
    if not args.video_frames:
        return _settings(args).resolved_grid(), 1, 0, None
    if args.frame_size is not None:
        t, grid = F.video_grid(shape, args.video_frames, *args.frame_size)
    else:
        t, grid = -(-args.video_frames // shape.vision.temporal_patch_size), _settings(args).resolved_grid()
    extra = F.video_text_tokens(shape, args.video_frames, args.fps)
    video = {"frames": args.video_frames, "frame_size": args.frame_size, "fps": args.fps, "frame_groups": t,
             "group_grid": list(grid), "timestamp_text_tokens": extra}
    return grid, t, extra, video


def cmd_flops(args) -> int:
    from . import flops as F
    from .efficiency import analytic, parse_variant
    from .shapes import load_shape

    shape = load_shape(args.shape)
    grid, t, extra, video = _flops_visual(args, shape)
    n_text = args.n_text + extra
    variants = ["full"] + [f"glimpse:{k}" + (f"@{args.prune_layer}" if args.prune_layer is not None else "")
                           for k in args.keep]
    rows = {v: analytic(shape, parse_variant(v), n_text, grid, args.causal, t) for v in variants}
    full = rows["full"]
    what = f"{grid[0]}x{grid[1]} = {grid[0] * grid[1]} visual"
    if video is not None:
        size = "" if args.frame_size is None else f" of {args.frame_size[0]}x{args.frame_size[1]} px"
        what = (f"video of {args.video_frames} frames{size} at {args.fps:g} fps = {t} frame-groups x {grid[0]}x"
                f"{grid[1]} = {full['n_vis']} visual (VIP over all frames jointly)")
    text = f"{n_text} text" + (f" ({args.n_text} + {extra} timestamp / frame-group wrapper)" if extra else "")
    print(f"{shape.name}: {what} + {text} tokens; causal={args.causal}; 1 multiply-add = 2 FLOPs; "
          f"ViT {full['vit_flops'] / 1e12:.2f} TFLOPs (not in prefill)")
    print("variant | K | kept | KV len | equiv. tokens | prefill TFLOPs | % of full | VIP GFLOPs | "
          f"decode GFLOPs/step (with LM head) | decode GFLOPs, {args.new_tokens} steps, no LM head (paper)")
    for name, a in rows.items():
        dec = F.decode_flops(shape, a["kv_len"], args.new_tokens, lm_head=False)
        print(f"{name} | {a['prune_layer']} | {a['n_kept']} | {a['kv_len']} | {a['equivalent_tokens']:.1f} | "
              f"{a['prefill_llm_flops'] / 1e12:.2f} | {100 * a['prefill_llm_flops'] / full['prefill_llm_flops']:.1f} | "
              f"{a['vip_flops'] / 1e9:.1f} | {a['decode_step_flops'] / 1e9:.2f} | {dec / 1e9:.1f}")
    if args.json:
        record = {"shape": shape.name, "grid": grid, "n_text": n_text, "rows": rows}
        print(json.dumps(record if video is None else {**record, "video": video}))
    return 0


def cmd_sweep(args) -> int:
    from .efficiency import run_benchmark
    from .flops import prune_layer_sweep
    from .shapes import load_shape

    shape, s = load_shape(args.shape), _settings(args)
    if args.out:
        check_writable(args.out, args.overwrite, "sweep.json")
    grid = s.resolved_grid()
    rows = prune_layer_sweep(shape, args.n_text, grid[0] * grid[1], args.keep, args.layers, args.causal,
                             glimpse=not args.no_glimpse, grids=[grid])
    if args.measure:  # fixed masks at each K (mask method, no VIP), timed interleaved with full
        s.variants = tuple(f"mask:{args.keep}@{r['prune_layer']}" for r in rows)
        s.decode, s.e2e, s.reps, s.warmup = False, False, args.reps, 1
        res = run_benchmark(s, shape)
        for r in rows:
            m = res["results"][f"mask:{args.keep}@{r['prune_layer']}"]
            r["measured_ratio"], r["mask_analytic_ratio"] = m["prefill_ratio_measured"], m["prefill_ratio_analytic"]
    print(f"{shape.name}: prefill vs pruning layer K, {grid[0] * grid[1]} visual + {args.n_text} text tokens, "
          f"keep {args.keep}, glimpse overhead {'off' if args.no_glimpse else 'on'}")
    print("K | prefill TFLOPs | % of full | equiv. tokens | KV len"
          + (" | mask: analytic % | mask: measured %" if args.measure else ""))
    for r in rows:
        extra = ""
        if "measured_ratio" in r:
            extra = f" | {100 * r['mask_analytic_ratio']:.1f} | {100 * r['measured_ratio']:.1f}"
        print(f"{r['prune_layer']} | {r['prefill_flops'] / 1e12:.3f} | {100 * r['ratio']:.1f} | "
              f"{r['equivalent_tokens']:.1f} | {r['kv_len']}{extra}")
    if args.out:
        _Results(args.out, "sweep.json").start()
        write_json({"shape": shape.to_dict(), "grid": grid, "n_text": args.n_text, "keep": args.keep, "rows": rows},
                   args.out, "sweep.json")
        plots = plot_sweep(rows, args.out, f"{shape.name}, keep {args.keep}")
        print(plots if isinstance(plots, str) else f"wrote {args.out}/sweep.json and {[str(p) for p in plots]}")
    return 0


class _Results:
    """Writes a run's results into ``out`` (None: nowhere). The first write removes the earlier run's files there
    (``OWNED``: an --overwrite run's stale plot would be read as this run's); ``partial`` saves the result so far
    (``"complete": false``), for ``run_benchmark`` / ``run_overhead`` to call as each stage ends."""

    def __init__(self, out, name: str = "result.json"):
        self.out, self.name, self.started = out, name, False

    def start(self) -> None:
        if self.started or not self.out:
            return
        self.started = True
        for f in OWNED.get(self.name, (self.name,)):
            if (Path(self.out) / f).is_file():
                (Path(self.out) / f).unlink()

    def partial(self, result: dict) -> None:
        if not self.out:
            return
        self.start()
        write_json(result, self.out, self.name)
        logger.info("saved the measurements so far to %s", Path(self.out) / self.name)


def _finish(args, result: dict, results: _Results) -> None:
    if not args.out:
        return
    results.start()
    path = write_json(result, args.out)
    (Path(args.out) / "table.md").write_text(markdown_table(result), encoding="utf-8")
    print(f"wrote {path} and {Path(args.out) / 'table.md'}")
    if getattr(args, "no_plots", False):
        return
    plots = write_plots(result, args.out)
    print(plots if isinstance(plots, str) else "plots: " + ", ".join(str(p) for p in plots))


def _summary(result: dict) -> dict:
    """The compact last stdout line of ``run`` / ``ratio-check``."""
    rows = {}
    for name, r in result["results"].items():
        e2e = r.get("end_to_end", {})
        rows[name] = {"kv_len": r["analytic"]["kv_len"], "prefill_ms": 1000 * r["prefill_s"]["median"],
                      "prefill_ratio_measured": r["prefill_ratio_measured"],
                      "prefill_ratio_analytic": r["prefill_ratio_analytic"],
                      "decode_ms_per_token": r.get("decode_ms_per_token", {}).get("median"),
                      "tokens_per_s": {b: x.get("tokens_per_s") for b, x in e2e.items()},
                      "decode_tokens_per_s": {b: x.get("decode_tokens_per_s") for b, x in e2e.items()},
                      "peak_mib": {b: x["memory"]["peak_bytes"] / 2**20 for b, x in e2e.items() if "memory" in x}}
    return {"shape": result["shape"]["name"], "device": result["meta"]["device_name"], "results": rows,
            "ratio_checks": result.get("ratio_checks")}


def _checks(result: dict, tolerance: float, causal: bool) -> bool:
    from .efficiency import ratio_checks

    checks = ratio_checks(result, tolerance)
    result["ratio_checks"] = [{"variant": c.variant, "measured": c.measured, "analytic": c.analytic,
                               "rel_diff": c.rel_diff, "tolerance": c.tolerance, "ok": c.ok} for c in checks]
    for c in checks:
        print(f"{c.variant}: kept fraction {100 * c.extra['kept_frac']:.2f} %")
        print(f"  analytic prefill ratio (LLM FLOPs, causal={causal}): {c.analytic:.4f}")
        print(f"  measured prefill ratio (median time / median full):  {c.measured:.4f}")
        print(f"  relative difference: {100 * c.rel_diff:+.1f} % (tolerance {100 * c.tolerance:.0f} %): "
              f"{'PASS' if c.ok else 'FAIL'}")
    return all(c.ok for c in checks)


def cmd_run(args) -> int:
    from ..validation import check_device
    from .efficiency import run_benchmark

    check_device(args.device)
    s = _settings(args, variants=tuple(args.variants), batch_sizes=tuple(args.batch_sizes), warmup=args.warmup,
                  reps=args.reps, new_tokens=args.new_tokens, decode=not args.no_decode, e2e=not args.no_e2e,
                  device=args.device, dtype=args.dtype, attn=args.attn, threads=args.threads,
                  e2e_reps=args.e2e_reps, budget_s=args.budget_s)
    if args.out:
        check_writable(args.out, args.overwrite)
    results = _Results(args.out)
    result = run_benchmark(s, on_stage=results.partial)
    print(markdown_table(result))
    _checks(result, 0.15, args.causal)
    _finish(args, result, results)
    print(json.dumps(_summary(result)))
    return 0


def cmd_ratio_check(args) -> int:
    from .efficiency import run_benchmark

    variants = ["full", f"glimpse:{args.keep}"] + ([f"mask:{args.keep}"] if args.with_mask else [])
    s = _settings(args, variants=tuple(variants), warmup=args.warmup, reps=args.reps, decode=False, e2e=False,
                  threads=args.threads)
    if args.out:
        check_writable(args.out, args.overwrite)
    results = _Results(args.out)
    result = run_benchmark(s, on_stage=results.partial)
    g = result["settings"]["grid"]
    print(f"ratio check: {result['shape']['name']}, {g[0] * g[1]} visual + {args.n_text} text tokens, "
          f"{args.reps} interleaved reps after {args.warmup} warm-up, {result['meta']['torch_threads']} threads")
    for name, r in result["results"].items():
        a = r["analytic"]
        print(f"  {name:<16} K={a['prune_layer']!s:<4} kept {a['n_kept']}/{a['n_vis']} KV {a['kv_len']:<5} "
              f"prefill median {1000 * r['prefill_s']['median']:.1f} ms "
              f"(all: {', '.join(f'{1000 * x:.0f}' for x in r['prefill_s']['all'])})")
    ok = _checks(result, args.tolerance, args.causal)
    _finish(args, result, results)
    print(json.dumps(_summary(result)))
    return 1 if args.strict and not ok else 0


def cmd_overhead(args) -> int:
    from ..validation import check_device
    from .overhead import BARS, OverheadSettings, reanalyse, run_overhead, summary, table

    check_device(args.device)
    results = _Results(None)  # --reanalyse rewrites its own files in place
    if args.reanalyse:
        if args.out:
            raise ValueError("--reanalyse DIR rewrites DIR's own result.json and table.md; drop --out")
        out = args.reanalyse
        result = reanalyse(out)
    else:
        s = OverheadSettings(shape=args.shape, n_vis=tuple(args.n_vis), n_text=args.n_text, keep=args.keep,
                             prune_layer=args.prune_layer, warmup=args.warmup, reps=args.reps,
                             decode_steps=args.decode_steps, device=args.device, dtype=args.dtype, attn=args.attn,
                             threads=args.threads, memory=not args.no_memory)
        out = args.out
        if out:
            check_writable(out, args.overwrite)
        results = _Results(out)
        result = run_overhead(s, on_row=results.partial)
    print(table(result), end="")
    for n, r in result["rows"].items():
        q = r["ratios"]
        bad = [k for k, ok in q["checks"].items() if not ok]
        print(f"{n} visual tokens: {'all checks pass' if not bad else 'FAILED: ' + ', '.join(bad)}")
        for k, verdict in q.get("noise", {}).items():
            lo, hi = q["ci95"][k]
            print(f"  {k} {q[k]:.3f} (95 % interval {lo:.3f} to {hi:.3f}, bar {BARS[k]}): {verdict}")
    if out:
        results.start()
        path = write_json(result, out)
        (Path(out) / "table.md").write_text(table(result), encoding="utf-8")
        print(f"wrote {path} and {Path(out) / 'table.md'}")
    print(json.dumps(summary(result)))
    return 1 if args.strict and not result["ok"] else 0


# what a bench command writes into its --out folder: when a run writes its first result there, the earlier run's
# others are removed (a stale plot beside the new result.json would be read as the new run's), and nothing else
OWNED = {"result.json": ("result.json", "table.md", "prefill_ratio.png", "throughput.png"),
         "sweep.json": ("sweep.json", "sweep.png")}


def check_writable(out_dir: str | Path, overwrite: bool = False, name: str = "result.json") -> None:
    """Fail before a run when ``out_dir`` cannot be created or written (its parent is a file, no permission, a
    read-only or pseudo file system), or already holds another run's ``name`` and ``overwrite`` was not asked for.
    Nothing is removed here: the earlier run's files stay until the new run writes its first result
    (``_Results.start``)."""
    p = Path(out_dir)
    if (p / name).exists() and not overwrite:
        raise ValueError(f"{p} already holds a run ({name}): pass --overwrite to replace it, or choose another --out")
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / ".write_probe"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"cannot write results to {p}: {err.strerror or err}") from err


def _at_least(minimum: int):
    """argparse type: a whole number >= minimum (``cli.common.int_at_least``, imported when the parser is built: the
    CLI package imports this module)."""
    from ..cli.common import int_at_least

    return int_at_least(minimum)


def _float_where(ok, what: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (math.isfinite(value) and ok(value)):
            raise argparse.ArgumentTypeError(f"must be a {what} number, got {text}")
        return value
    return parse


_positive_float = _float_where(lambda v: v > 0, "positive")
_non_negative_float = _float_where(lambda v: v >= 0, "non-negative")


def _kept_fraction(text: str) -> float:
    value = _positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"a kept fraction is at most 1, got {text}")
    return value


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``bench`` (flops, sweep, run, ratio-check) to a CLI's subparsers; each handler is ``args.fn(args)``."""
    b = subparsers.add_parser("bench", help="efficiency: analytic FLOPs, pruning-layer sweep, timing runs")
    sub = b.add_subparsers(dest="bench_cmd", required=True)

    f = sub.add_parser("flops", help="analytic FLOPs, KV length and equivalent tokens, full vs GlimpsePrune")
    _common(f, n_vis=5041, n_text=33)
    f.add_argument("--keep", type=_kept_fraction, nargs="+", default=[0.034], help="kept visual fraction(s)")
    f.add_argument("--prune-layer", type=int, help="K (default: the shape's)")
    f.add_argument("--new-tokens", type=_at_least(1), default=22, help="decode steps for the decode-FLOPs total")
    f.add_argument("--json", action="store_true", help="also print one JSON line")
    f.add_argument("--video-frames", type=_at_least(1), metavar="F", help="count one video of F frames instead of "
                   "one image: ceil(F / temporal patch) frame-groups, each of --frame-size (else --grid / --n-vis) "
                   "tokens; the VIP attends over all frames jointly; Qwen3-VL adds its per-group timestamp text")
    f.add_argument("--frame-size", type=_pixels, metavar="WxH", help="video frame width x height in pixels (with "
                   "--video-frames), rounded to the model's token size (28 px Qwen2.5-VL, 32 px Qwen3-VL), e.g. "
                   "448x448")
    f.add_argument("--fps", type=_positive_float, default=2.0, help="frames per second the video was sampled at "
                   "(Qwen3-VL's timestamp text; default 2)")
    f.set_defaults(fn=cmd_flops)

    w = sub.add_parser("sweep", help="prefill cost vs pruning layer K (analytic; --measure also times it)")
    _common(w)
    w.add_argument("--keep", type=_kept_fraction, default=0.04, help="kept visual fraction")
    w.add_argument("--layers", type=int, nargs="+", help="layers K to evaluate (default: -1..L-1)")
    w.add_argument("--no-glimpse", action="store_true", help="leave out the glimpse token and VIP")
    w.add_argument("--measure", action="store_true", help="time prefill at each K (mask method; cheap shapes only)")
    w.add_argument("--reps", type=_at_least(1), default=3, help="timed repetitions with --measure")
    w.add_argument("--out", help="folder for sweep.json and sweep.png")
    w.add_argument("--overwrite", action="store_true", help="replace the sweep already in --out")
    w.set_defaults(fn=cmd_sweep)

    r = sub.add_parser("run", help="time prefill, decoding and end-to-end generation; JSON + markdown + plots")
    _common(r)
    r.add_argument("--variants", nargs="+", default=["full", "glimpse:0.04", "mask:0.04", "fixed:0.111"],
                   help="full | glimpse:F[@K] | mask:F[@K] | fixed:F[@K] (fixed: default K=-1, before the LLM)")
    r.add_argument("--batch-sizes", type=_at_least(1), nargs="+", default=[1, 4, 8, 16], help="end-to-end batch sizes")
    r.add_argument("--warmup", type=_at_least(0), default=1, help="untimed runs of every variant first")
    r.add_argument("--reps", type=_at_least(1), default=5, help="timed repetitions (medians reported)")
    r.add_argument("--new-tokens", type=_at_least(1), default=16, help="generated tokens / timed decode steps")
    r.add_argument("--no-decode", action="store_true", help="skip decode timing")
    r.add_argument("--no-e2e", action="store_true", help="skip end-to-end throughput and memory")
    r.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    r.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model dtype")
    r.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, eager)")
    r.add_argument("--threads", type=_at_least(1), help="torch CPU threads")
    r.add_argument("--e2e-reps", type=_at_least(1), help="timed end-to-end repetitions per batch size (default: "
                   "--reps)")
    r.add_argument("--budget-s", type=_positive_float, help="wall-clock budget in seconds: once spent, remaining "
                   "repetitions and batch sizes are skipped (logged, and listed in result.json); default: none")
    r.add_argument("--out", help="folder for result.json, table.md and PNG plots")
    r.add_argument("--no-plots", action="store_true", help="write no PNGs (redraw them later from result.json: "
                   "glimpseprune.bench.report.write_plots(json.load(...), DIR))")
    r.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    r.set_defaults(fn=cmd_run)

    c = sub.add_parser("ratio-check", help="measured vs analytic prefill ratio of full vs GlimpsePrune (CPU)")
    _common(c)
    c.add_argument("--keep", type=_kept_fraction, default=0.04, help="kept visual fraction")
    c.add_argument("--warmup", type=_at_least(0), default=1, help="untimed runs of every variant first")
    c.add_argument("--reps", type=_at_least(1), default=7, help="timed, interleaved repetitions (medians)")
    c.add_argument("--tolerance", type=_non_negative_float, default=0.15, help="allowed |measured / analytic - 1|")
    c.add_argument("--with-mask", action="store_true", help="also time mask:KEEP (no glimpse token / VIP)")
    c.add_argument("--strict", action="store_true", help="exit 1 when a ratio is outside the tolerance")
    c.add_argument("--threads", type=_at_least(1), help="torch CPU threads")
    c.add_argument("--out", help="folder for result.json, table.md and PNG plots")
    c.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    c.set_defaults(fn=cmd_ratio_check)

    o = sub.add_parser("overhead", help="runtime cost beside the stock model: full vs stock, glimpse vs mask "
                       "(prefill, decode, peak memory), interleaved ratios with pass/fail bars")
    o.add_argument("--shape", default="qwen2_5_vl_scaled_cpu", help="shape name in configs/shapes/ or a JSON path")
    o.add_argument("--n-vis", type=_at_least(1), nargs="+", default=[1024, 2025], help="visual tokens per sample (one "
                   "near-square image each)")
    o.add_argument("--n-text", type=_at_least(0), default=64, help="non-visual prompt tokens per sample")
    o.add_argument("--keep", type=_kept_fraction, default=0.04, help="kept visual fraction of mask and glimpse")
    o.add_argument("--prune-layer", type=int, help="K of mask and glimpse, >= 0 (default: the shape's); e.g. 0: the "
                   "schedule of an early module whose picks leave after layer 0")
    o.add_argument("--warmup", type=_at_least(0), default=2, help="untimed runs of every variant first")
    o.add_argument("--reps", type=_at_least(1), default=16, help="timed, interleaved repetitions (medians; a multiple "
                   "of 4 gives every variant every position equally often)")
    o.add_argument("--decode-steps", type=_at_least(1), default=16, help="timed decode steps per repetition")
    o.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    o.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model dtype")
    o.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, eager, flash_attention_2)")
    o.add_argument("--threads", type=_at_least(1), help="torch CPU threads")
    o.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    o.add_argument("--strict", action="store_true", help="exit 1 when a check fails")
    o.add_argument("--out", help="folder for result.json and table.md")
    o.add_argument("--reanalyse", metavar="DIR", help="measure nothing: recompute the ratios, intervals and verdicts "
                   "of the run in DIR/result.json from its raw timings with this version's analysis, and rewrite "
                   "DIR's result.json (timings untouched) and table.md")
    o.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    o.set_defaults(fn=cmd_overhead)
    return b


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m glimpseprune.bench.report")
    add_bench_parser(p.add_subparsers(dest="cmd", required=True))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
