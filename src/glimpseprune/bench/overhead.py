"""``glimpseprune bench overhead``: what the runtime costs beside the stock model, as ratios within one run.

On a random-initialised model of a ``ModelShape`` (timing and memory do not depend on the weights), one image per
sample, batch 1, for each visual-token count:

* ``stock``   -- transformers' own text model (``model.model.language_model``) with no mask, its own cache, and the
  LM head on the last position: the external reference.
* ``full``    -- our runtime keeping every token (its overhead over stock is pure runtime cost).
* ``mask``    -- our runtime pruning after K with fixed random keep masks (no glimpse token, no VIP).
* ``glimpse`` -- the real GlimpsePrune path at the same kept count (glimpse token, query logits, VIP, taps).

Prefill covers the LLM only (the batch is encoded once and replayed); decode is ms per step after one untimed step.
All four are timed interleaved (order rotated every repetition, see ``rotation``) after warm-up; a ratio is the
median over repetitions of the two runs' ratio within the repetition (paired), which cancels the drift of a shared
machine. Peak memory of each prefill is measured separately (``efficiency.measure_peak``; on CPU the peak of live
tensor bytes, replayed from the profiler, so exact and repeatable), LLM only and with the ViT (glimpse needs its
taps), as is the encode peak with and without the taps. The analytic prefill ratio counts causal attention
(n(n+1)/2 pairs): no mask is built any more. As a diagnostic (no bar), the VIP's forward is also timed alone on the
inputs of a real glimpse prefill, beside its analytic share of the mask prefill's FLOPs: how much of the glimpse
path's cost is the VIP, and how far its kernels run from the LLM's FLOP rate.

Checks (the issue's bar): full/stock prefill and decode <= 1.02, glimpse/mask prefill <= 1.03, measured
glimpse/stock prefill within 5 % of the analytic glimpse/full ratio, glimpse prefill peak <= full prefill peak. Each
timed ratio also gets a 95 % bootstrap interval over the repetitions, and each timed bar a verdict beyond that noise:
pass, fail, or undecided when the interval straddles the bar (on a shared 2-core VM, runs of the same code move by a
few per cent).
"""

from __future__ import annotations

import logging
import math
import random
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..runtime.cache import cache_param
from ..runtime.engine import decode_step, prefill
from .efficiency import (
    Budget,
    FrozenEncodeAdapter,
    _reps,
    _stats,
    _timed,
    analytic,
    build_model,
    make_variant,
    measure_peak,
    near_square_grid,
    parse_variant,
    synth_inputs,
)
from .shapes import load_shape

logger = logging.getLogger(__name__)

SCHEMA = "glimpseprune.bench.overhead/1"
BARS = {"full_vs_stock_prefill": 1.02, "full_vs_stock_decode": 1.02, "glimpse_vs_mask_prefill": 1.03,
        "glimpse_measured_vs_analytic": 0.05}


@dataclass
class OverheadSettings:
    shape: str = "qwen2_5_vl_scaled_cpu"
    n_vis: tuple[int, ...] = (1024, 2025)
    n_text: int = 64
    keep: float = 0.04
    prune_layer: int | None = None  # K of mask and glimpse; None: the shape's (ceil(2L/3) - 1)
    warmup: int = 2
    reps: int = 16
    decode_steps: int = 16
    device: str = "cpu"
    dtype: str = "float32"
    attn: str = "sdpa"
    threads: int | None = None
    seed: int = 0
    memory: bool = True


class StockRun:
    """transformers' text model as shipped: no mask argument, its own ``DynamicCache``, LM head on the last token."""

    def __init__(self, model):
        self.model, self.lm = model, model.model.language_model

    def _cache(self, cache) -> dict:  # the keyword this transformers takes the cache by
        return {cache_param(type(self.lm).forward): cache}

    def prefill(self, enc):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.lm.config)
        out = self.lm(inputs_embeds=enc.embeds, position_ids=enc.positions, use_cache=True, **self._cache(cache))
        return self.model.lm_head(out.last_hidden_state[:, -1:])[:, -1], cache

    def decode(self, cache, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        emb = self.lm.embed_tokens(tok[:, None])
        out = self.lm(inputs_embeds=emb, position_ids=pos.view(1, -1, 1).expand(3, -1, 1), use_cache=True,
                      **self._cache(cache))
        return self.model.lm_head(out.last_hidden_state)[:, -1]


def rotation(names: list[str], r: int) -> list[str]:
    """Run order of repetition r: a rotation of ``names`` that moves one place each repetition (reversed every other
    full turn), so every variant takes every position, and follows every other, equally often over len(names)
    repetitions: position effects of a shared machine (caches, allocator state, clocks) cancel in the pairing."""
    n = len(names)
    order = names[r % n:] + names[:r % n]
    return order[::-1] if (r // n) % 2 else order


def _prefill_fns(model, frozen, stock: StockRun, runs: dict, inputs: dict) -> dict[str, Any]:
    enc = frozen.encode(model, inputs, ())
    fns = {"stock": lambda: stock.prefill(enc)}
    for name, (method, request) in runs.items():
        fns[name] = lambda m=method, r=request: prefill(model, frozen, m, inputs, r)
    return fns


def _decode_fn(model, frozen, stock: StockRun, name: str, runs: dict, inputs: dict, steps: int):
    """A closure timing ``steps`` decode steps of ``name`` after an untimed prefill and first step."""
    if name == "stock":
        enc = frozen.encode(model, inputs, ())
        logits, cache = stock.prefill(enc)
        tok = stock.decode(cache, logits.argmax(-1), enc.next_pos).argmax(-1)

        def run_stock(tok=tok):
            for s in range(steps):
                tok = stock.decode(cache, tok, enc.next_pos + s + 1).argmax(-1)
        return run_stock
    method, request = runs[name]
    pre = prefill(model, frozen, method, inputs, request)
    tok = decode_step(model, frozen, pre, pre.logits.argmax(-1), 0).argmax(-1)

    def run_ours(tok=tok):
        for s in range(steps):
            tok = decode_step(model, frozen, pre, tok, s + 1).argmax(-1)
    return run_ours


@torch.no_grad()
def measure_one(model, shape, s: OverheadSettings, n_vis: int, device: torch.device) -> dict[str, Any]:
    from ..registry import get_adapter

    grid = near_square_grid(n_vis)
    inputs = synth_inputs(shape, grid, s.n_text, 1, s.device, s.seed)
    nv = [grid[0] * grid[1]]
    at = "" if s.prune_layer is None else f"@{s.prune_layer}"
    specs = {"full": "full", "mask": f"mask:{s.keep}{at}", "glimpse": f"glimpse:{s.keep}{at}"}
    runs = {n: make_variant(parse_variant(v), shape, nv, device, s.seed, dtype=s.dtype) for n, v in specs.items()}
    frozen = FrozenEncodeAdapter(get_adapter(model))
    for method, _ in runs.values():
        frozen.prime(model, inputs, method)
    stock = StockRun(model)
    fns = _prefill_fns(model, frozen, stock, runs, inputs)
    names = list(fns)
    t0 = time.perf_counter()
    # each loop logs every repetition: on a real shape on a CPU one takes minutes (no budget: ``clock`` only times)
    clock = Budget(None)
    for n in _reps(names, s.warmup, clock, "prefill warm-up"):
        fns[n]()
    prefill_s = {n: [] for n in names}
    for n in _reps(names, s.reps, clock, "prefill", order=rotation):
        prefill_s[n].append(_timed(fns[n], device)[0])
    logger.info("  %d visual tokens: prefill timed (%d reps, %.0f s)", grid[0] * grid[1], s.reps,
                time.perf_counter() - t0)
    vip_s = _vip_alone(model, frozen, runs["glimpse"], inputs, s.reps, device)
    decode_ms = {n: [] for n in names}
    for n in _reps(names, s.reps, clock, "decode", order=rotation):
        fn = _decode_fn(model, frozen, stock, n, runs, inputs, s.decode_steps)
        decode_ms[n].append(1000.0 * _timed(fn, device)[0] / s.decode_steps)
    logger.info("  %d visual tokens: decode timed (%.0f s so far)", grid[0] * grid[1], time.perf_counter() - t0)
    out: dict[str, Any] = {"grid": list(grid), "n_vis": grid[0] * grid[1],
                           "prefill_s": {n: _stats(v) for n, v in prefill_s.items()},
                           "decode_ms": {n: _stats(v) for n, v in decode_ms.items()}, "vip_s": _stats(vip_s)}
    if s.memory:
        out["prefill_peak"] = {n: measure_peak(fns[n], device) for n in names}
        inner = get_adapter(model)
        taps = tuple(runs["glimpse"][0].vision_taps())
        fn = runs["glimpse"][0].vision_tap_fn()
        out["encode_peak"] = {"no_taps": measure_peak(lambda: inner.encode(model, inputs, ()), device),
                              "taps": measure_peak(lambda: inner.encode(model, inputs, taps, fn), device)}
        # what a user's prefill holds at its peak: ViT (with the taps glimpse needs) + LLM prefill
        out["vit_prefill_peak"] = {n: measure_peak(lambda m=m, r=r: prefill(model, inner, m, inputs, r), device)
                                   for n, (m, r) in runs.items()}
    cost = {n: analytic(shape, parse_variant(v), s.n_text, grid, causal=True) for n, v in specs.items()}
    out["analytic"] = {n: {k: c[k] for k in ("prune_layer", "n_kept", "kv_len", "prefill_llm_flops", "vip_flops")}
                       for n, c in cost.items()}
    out["ratios"] = ratios(out)
    return out


def capture_vip_call(model, frozen, run: tuple, inputs: dict) -> tuple[tuple, dict, torch.Tensor]:
    """The (args, kwargs, output) of the VIP's one call in a ``glimpse`` prefill (``run``: (method, request)),
    captured by a forward hook that is removed afterwards."""
    method, request = run
    got: list = []
    handle = method.module.vip.register_forward_hook(
        lambda _m, args, kwargs, out: got.append((args, kwargs, out)), with_kwargs=True)
    try:
        prefill(model, frozen, method, inputs, request)
    finally:
        handle.remove()
    if len(got) != 1:
        raise RuntimeError(f"the glimpse prefill called its VIP {len(got)} times, expected once")
    return got[0]


def _vip_alone(model, frozen, run: tuple, inputs: dict, reps: int, device: torch.device) -> list[float]:
    """Seconds of the VIP's forward alone, ``reps`` times, on the inputs it got in one ``glimpse`` prefill
    (``capture_vip_call``): where the glimpse path's time goes beside its FLOPs."""
    vip = run[0].module.vip
    args, kwargs, _ = capture_vip_call(model, frozen, run, inputs)
    vip(*args, **kwargs)  # warm-up
    return [_timed(lambda: vip(*args, **kwargs), device)[0] for _ in range(reps)]


def _paired(a: list[float], b: list[float]) -> float:
    """Median over repetitions of a[r] / b[r]: both ran in the same repetition, back to back, so slow drift of a
    shared machine cancels (medians of each alone do not pair the runs)."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def _paired_ci(a: list[float], b: list[float], level: float = 0.95, n_boot: int = 2000, seed: int = 0
               ) -> tuple[float, float]:
    """Bootstrap percentile interval of ``_paired(a, b)``: the repetitions (pairs) resampled with replacement,
    ``n_boot`` times with a fixed seed (the same data give the same interval)."""
    rs = [x / y for x, y in zip(a, b, strict=True)]
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(rs, k=len(rs))) for _ in range(n_boot))
    tail = (1.0 - level) / 2
    return meds[int(tail * (n_boot - 1))], meds[int(round((1.0 - tail) * (n_boot - 1)))]


def _noise_verdict(lo: float, hi: float, bar: float, two_sided: bool = False) -> str:
    """'pass' / 'fail' when the whole interval is on one side of the bar, 'undecided' when it straddles it (the
    run cannot tell; more repetitions or a quieter machine can). Two-sided: the bar bounds |value|."""
    if two_sided:
        if max(abs(lo), abs(hi)) <= bar:
            return "pass"
        return "fail" if lo > bar or hi < -bar else "undecided"
    return "pass" if hi <= bar else "fail" if lo > bar else "undecided"


def ratios(r: dict) -> dict[str, Any]:
    """The checked ratios of one ``measure_one`` result (paired medians), each with its bar and verdict, and for the
    timed ones a 95 % bootstrap interval (``ci95``) and whether the bar is decided beyond that noise (``noise``)."""
    p = {n: v["all"] for n, v in r["prefill_s"].items()}
    d = {n: v["all"] for n, v in r["decode_ms"].items()}
    a = r["analytic"]
    analytic = a["glimpse"]["prefill_llm_flops"] / a["full"]["prefill_llm_flops"]
    pairs = {"full_vs_stock_prefill": (p["full"], p["stock"]), "full_vs_stock_decode": (d["full"], d["stock"]),
             "glimpse_vs_mask_prefill": (p["glimpse"], p["mask"]), "mask_vs_stock_prefill": (p["mask"], p["stock"]),
             "glimpse_vs_stock_prefill": (p["glimpse"], p["stock"]),
             "glimpse_vs_stock_decode": (d["glimpse"], d["stock"])}
    out = {k: _paired(*v) for k, v in pairs.items()}
    out["glimpse_analytic_prefill"] = analytic
    out["glimpse_measured_vs_analytic"] = out["glimpse_vs_stock_prefill"] / analytic - 1.0
    checks = {k: (abs(out[k]) <= bar if k == "glimpse_measured_vs_analytic" else out[k] <= bar)
              for k, bar in BARS.items()}
    timed = ("full_vs_stock_prefill", "full_vs_stock_decode", "glimpse_vs_mask_prefill", "glimpse_vs_stock_prefill")
    ci = {k: _paired_ci(*pairs[k]) for k in timed}
    lo, hi = ci["glimpse_vs_stock_prefill"]
    ci["glimpse_measured_vs_analytic"] = (lo / analytic - 1.0, hi / analytic - 1.0)
    out["ci95"] = {k: list(v) for k, v in ci.items()}
    out["noise"] = {k: _noise_verdict(*ci[k], bar, two_sided=k == "glimpse_measured_vs_analytic")
                    for k, bar in BARS.items()}
    if "prefill_peak" in r:
        peak = {n: m["delta_bytes"] for n, m in r["prefill_peak"].items()}
        out["glimpse_vs_full_peak"] = peak["glimpse"] / max(peak["full"], 1)
        checks["glimpse_peak_le_full"] = peak["glimpse"] <= peak["full"]
    if "vit_prefill_peak" in r:
        peak = {n: m["delta_bytes"] for n, m in r["vit_prefill_peak"].items()}
        out["glimpse_vs_full_vit_prefill_peak"] = peak["glimpse"] / max(peak["full"], 1)
        checks["glimpse_vit_prefill_peak_le_full"] = peak["glimpse"] <= peak["full"]
    if "vip_s" in r:  # a diagnostic, not a bar: the VIP's time and FLOPs as shares of the mask prefill's
        out["vip_vs_mask_prefill"] = r["vip_s"]["median"] / r["prefill_s"]["mask"]["median"]
        out["vip_analytic_vs_mask"] = a["glimpse"]["vip_flops"] / a["mask"]["prefill_llm_flops"]
    out["checks"] = checks
    return out


def run_overhead(s: OverheadSettings, model=None, on_row=None) -> dict[str, Any]:
    """Every row of ``s`` (keyed by the visual tokens measured: ``n_vis`` rounded to a near-square grid);
    ``on_row(result so far)`` after each row, with ``"complete": False``, so a killed run keeps its rows."""
    from .meta import environment

    measured = {n: math.prod(near_square_grid(n)) for n in s.n_vis}
    if len(set(measured.values())) < len(measured):
        raise ValueError(f"--n-vis {list(s.n_vis)} give the same grid twice ({measured}): give distinct sizes")
    shape = load_shape(s.shape)
    device = torch.device(s.device)
    if s.threads and device.type == "cpu":
        torch.set_num_threads(s.threads)
    model = model if model is not None else build_model(shape, s.device, s.dtype, s.attn, s.seed)
    meta, rows = environment(device), {}

    def result(complete: bool) -> dict[str, Any]:
        return {"schema": SCHEMA, "meta": meta, "settings": asdict(s), "shape": shape.to_dict(), "bars": BARS,
                "rows": dict(rows), "ok": _all_checks_pass(rows), "complete": complete}

    for n in s.n_vis:
        if measured[n] != n:
            logger.info("overhead: --n-vis %d runs as a %s grid, %d visual tokens", n, near_square_grid(n),
                        measured[n])
        logger.info("overhead: %s, %d visual + %d text tokens, keep %s", shape.name, measured[n], s.n_text, s.keep)
        rows[str(measured[n])] = measure_one(model, shape, s, n, device)
        if on_row is not None and len(rows) < len(s.n_vis):
            on_row(result(complete=False))
    return result(complete=True)


def _all_checks_pass(rows: dict) -> bool:
    return all(all(r["ratios"]["checks"].values()) for r in rows.values())


def reanalyse(run_dir) -> dict[str, Any]:
    """A saved run (``run_dir/result.json``) with its ratios, checks, intervals and ``ok`` recomputed from its raw
    timings by this version's ``ratios``; the timings, peaks and analytic counts are left as they were, and
    ``analysis`` records which version re-analysed it and when."""
    from pathlib import Path

    from ..outputs import read_json
    from .meta import environment

    path = Path(run_dir) / "result.json"
    if not path.is_file():
        raise ValueError(f"--reanalyse: no {path}")
    result = read_json(path, "--reanalyse:")
    if not isinstance(result, dict) or result.get("schema") != SCHEMA:
        raise ValueError(f"--reanalyse: {path} is not a `bench overhead` result (schema {SCHEMA!r})")
    for n, r in result.get("rows", {}).items():
        try:
            r["ratios"] = ratios(r)
        except (KeyError, TypeError, ZeroDivisionError) as err:
            raise ValueError(f"--reanalyse: row {n} of {path} lacks the raw timings or counts it needs ({err!r})"
                             ) from None
    result["ok"] = _all_checks_pass(result["rows"])
    env = environment(torch.device("cpu"))
    result["analysis"] = {k: env[k] for k in ("glimpseprune", "git_commit", "time_utc")}
    return result


def table(result: dict) -> str:
    """Markdown: one line per visual-token count with the medians and the checked ratios."""
    lines = ["| visual tokens | K | stock ms | full ms | mask ms | glimpse ms | full/stock prefill | "
             "full/stock decode | glimpse/mask (95 % interval; verdict) | glimpse/stock (analytic) | "
             "VIP alone/mask (analytic) | peak glimpse/full (LLM) | peak glimpse/full (ViT + LLM) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"].values():
        p, q = r["prefill_s"], r["ratios"]
        ms = [f"{1000 * p[n]['median']:.1f}" for n in ("stock", "full", "mask", "glimpse")]
        vip = (f"{q['vip_vs_mask_prefill']:.3f} ({q['vip_analytic_vs_mask']:.3f})" if "vip_vs_mask_prefill" in q
               else "-")
        gm = f"{q['glimpse_vs_mask_prefill']:.3f}"
        if "ci95" in q:
            lo, hi = q["ci95"]["glimpse_vs_mask_prefill"]
            gm += f" ({lo:.3f}–{hi:.3f}; {q['noise']['glimpse_vs_mask_prefill']})"
        peak = " | ".join(f"{q[k]:.3f}" if k in q else "-"
                          for k in ("glimpse_vs_full_peak", "glimpse_vs_full_vit_prefill_peak"))
        lines.append(f"| {r['n_vis']} | {r['analytic']['glimpse']['prune_layer']} | {' | '.join(ms)} | "
                     f"{q['full_vs_stock_prefill']:.3f} | "
                     f"{q['full_vs_stock_decode']:.3f} | {gm} | "
                     f"{q['glimpse_vs_stock_prefill']:.3f} ({q['glimpse_analytic_prefill']:.3f}) | {vip} | {peak} |")
    return "\n".join(lines) + "\n"


def summary(result: dict) -> dict:
    return {"shape": result["shape"]["name"], "device": result["meta"]["device_name"], "ok": result["ok"],
            "ratios": {n: r["ratios"] for n, r in result["rows"].items()},
            "decode_ms_median": {n: {k: v["median"] for k, v in r["decode_ms"].items()}
                                 for n, r in result["rows"].items()}}
