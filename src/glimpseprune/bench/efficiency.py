"""Efficiency runner: prefill time, decode ms/token, end-to-end tokens/s, initial KV length and peak memory of full
and pruned runs, on a random-initialised model built from a ``ModelShape`` (timing and memory do not depend on the
weights, so no checkpoint is needed).

Variants (``parse_variant``):

* ``full`` -- no pruning.
* ``glimpse:F[@K]`` -- the real GlimpsePrune path (glimpse token in layers 0..K, its query logits, the VIP, vision
  taps) with a random-initialised module and ``SelectionConfig(fixed_keep_ratio=F)``, so exactly
  max(1, floor(F * n_vis)) tokens are kept per sample. K defaults to the shape's prune layer.
* ``mask:F[@K]`` -- the same pruning schedule with fixed random keep masks (``mask`` method): GlimpsePrune's
  pruning without the glimpse token and VIP cost (the difference to ``glimpse`` is their overhead).
* ``fixed:F[@K]`` -- fixed-ratio pruning with fixed random keep masks at layer K (default -1: before the LLM, as
  VisionZip / DivPrune do; ``@2`` is FastV-like).

Prefill timing covers the LLM part only (decoder layers, pruning, VIP, last-token LM head), as upstream's timer does:
the batch is encoded once (ViT + embeddings + positions) by ``FrozenEncodeAdapter`` and replayed. All variants are
timed in the same process, interleaved (order reversed every other repetition), after warm-up; medians are
reported. End-to-end runs use the ordinary adapter (ViT included) and ``generate`` without EOS (always
``new_tokens`` tokens).
"""

from __future__ import annotations

import logging
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..config import SelectionConfig
from ..methods.base import PruningMethod
from ..runtime.engine import decode_step, generate, prefill
from . import flops as F
from .shapes import ModelShape, load_shape

logger = logging.getLogger(__name__)

SCHEMA = "glimpseprune.bench.efficiency/1"


@dataclass(frozen=True)
class Variant:
    spec: str
    method: str  # "full", "glimpse" or "mask"
    keep: float | None = None
    prune_layer: int | None = None  # None: the shape's default K

    def layer(self, shape: ModelShape) -> int | None:
        return None if self.method == "full" else (shape.default_k if self.prune_layer is None else self.prune_layer)


def parse_variant(spec: str) -> Variant:
    """``full`` | ``glimpse:F[@K]`` | ``mask:F[@K]`` | ``fixed:F[@K]`` (F in (0, 1], K an LLM layer or -1)."""
    spec = spec.strip()
    if spec == "full":
        return Variant("full", "full")
    kind, _, rest = spec.partition(":")
    frac, _, layer = rest.partition("@")
    if kind not in ("glimpse", "mask", "fixed") or not frac:
        raise ValueError(f"bad variant {spec!r}: use full, glimpse:F[@K], mask:F[@K] or fixed:F[@K] "
                         "(e.g. glimpse:0.04)")
    keep = float(frac)
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"variant {spec!r}: kept fraction must be in (0, 1]")
    K = int(layer) if layer else (-1 if kind == "fixed" else None)
    if kind == "glimpse" and K is not None and K < 0:
        raise ValueError(f"variant {spec!r}: the glimpse method prunes after a layer K >= 0")
    return Variant(spec, "mask" if kind == "fixed" else kind, keep, K)


@dataclass
class BenchSettings:
    shape: str = "qwen2_5_vl_scaled_cpu"
    n_vis: int = 2025  # visual tokens per sample (rounded to a grid; see ``grid``)
    grid: tuple[int, int] | None = None  # merged-token grid (h, w); default: near-square for n_vis
    n_text: int = 64  # non-visual prompt tokens per sample (vision start/end included)
    variants: tuple[str, ...] = ("full", "glimpse:0.04")
    prefill_batch: int = 1
    batch_sizes: tuple[int, ...] = (1, 4, 8, 16)  # end-to-end throughput and peak memory
    warmup: int = 1
    reps: int = 5
    new_tokens: int = 16  # generated tokens (end to end) and decode steps timed
    decode: bool = True
    e2e: bool = True
    device: str = "cpu"
    dtype: str = "float32"
    attn: str = "sdpa"
    causal: bool = True  # analytic attention counted as executed: no mask, SDPA's causal kernel (n(n+1)/2 pairs)
    seed: int = 0
    threads: int | None = None  # torch.set_num_threads on CPU
    e2e_reps: int | None = None  # timed end-to-end repetitions per batch size (default: reps)
    budget_s: float | None = None  # wall-clock budget: later repetitions / batch sizes are skipped, and recorded

    def resolved_grid(self) -> tuple[int, int]:
        return tuple(self.grid) if self.grid is not None else near_square_grid(self.n_vis)


def near_square_grid(n_vis: int) -> tuple[int, int]:
    """(h, w) of a near-square merged-token grid holding about ``n_vis`` tokens."""
    h = max(1, round(math.sqrt(n_vis)))
    return h, max(1, round(n_vis / h))


class FrozenEncodeAdapter:
    """Wraps an adapter; ``encode`` runs once per (inputs, taps, tap_fn) and is replayed, so prefill timing excludes
    the ViT and the embedding. ``prime(model, inputs, method)`` encodes what ``prefill`` will ask for with that
    method. Everything else is delegated to the wrapped adapter."""

    def __init__(self, inner):
        self.inner = inner
        self._memo: dict[tuple, tuple[dict, Any]] = {}

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def encode(self, model, inputs: dict, taps: tuple[int, ...] = (), tap_fn=None):
        key = (id(inputs), tuple(taps), id(tap_fn))
        if key not in self._memo:
            self._memo[key] = (inputs, self.inner.encode(model, inputs, taps=tuple(taps), tap_fn=tap_fn), tap_fn)
        return self._memo[key][1]

    def prime(self, model, inputs: dict, method: PruningMethod):
        """Encode ``inputs`` as ``prefill`` with ``method`` will (its taps and tap function, if it prunes)."""
        taps = tuple(method.vision_taps())
        return self.encode(model, inputs, taps, method.vision_tap_fn() if taps else None)


def build_model(shape: ModelShape, device: str = "cpu", dtype: str = "float32", attn: str = "sdpa", seed: int = 0):
    """A random-initialised model of ``shape`` (``shape.model_class()``: Qwen2.5-VL or Qwen3-VL), created directly
    on ``device``."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = shape.model_class()._from_config(shape.to_hf_config(attn), dtype=getattr(torch, dtype))
    return model.eval().requires_grad_(False)


def synth_inputs(shape: ModelShape, grid: tuple[int, int], n_text: int, batch: int, device: str = "cpu",
                 seed: int = 0) -> dict:
    """Processor-like inputs: per sample [text][vision_start][image_pad x h*w][vision_end][text] with random text
    ids and random pixels (one image of (h, w) merged tokens, i.e. (2h, 2w) patches)."""
    if n_text < 2:
        raise ValueError("n_text counts the vision start/end tokens and must be >= 2")
    ids, v = shape.token_ids(), shape.vision
    h, w = grid
    m = v.spatial_merge_size
    g = torch.Generator().manual_seed(seed)
    before = (n_text - 2) // 2
    text = torch.randint(0, min(ids.values()), (batch, n_text - 2), generator=g)
    img = torch.full((batch, h * w), ids["image"])
    row = [text[:, :before], torch.full((batch, 1), ids["vision_start"]), img,
           torch.full((batch, 1), ids["vision_end"]), text[:, before:]]
    input_ids = torch.cat(row, dim=1)
    n_patch = h * w * m * m
    pixels = torch.randn(batch * n_patch, v.in_channels * v.temporal_patch_size * v.patch_size ** 2, generator=g)
    out = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
           "mm_token_type_ids": (input_ids == ids["image"]).long(), "pixel_values": pixels,
           "image_grid_thw": torch.tensor([[1, h * m, w * m]] * batch)}
    return {k: t.to(device) for k, t in out.items()}


def make_variant(v: Variant, shape: ModelShape, n_vis: list[int], device, seed: int = 0, dtype: str = "float32"
                 ) -> tuple[PruningMethod, dict]:
    """(method, request) for one variant; request carries the fixed keep masks of ``mask``/``fixed``. The glimpse
    module takes the base model's ``dtype``, as ``glimpseprune.load`` gives it."""
    from ..api import make_method
    from ..modules.glimpse import GlimpseModule

    K = v.layer(shape)
    if v.method == "full":
        return make_method("full"), {}
    if v.method == "glimpse":
        torch.manual_seed(seed)
        module = GlimpseModule(shape.glimpse_config(K)).to(device=device, dtype=getattr(torch, dtype)).eval()
        module.requires_grad_(False)
        return make_method("glimpse", module, SelectionConfig(fixed_keep_ratio=v.keep)), {}
    g = torch.Generator().manual_seed(seed)
    masks = []
    for n in n_vis:
        m = torch.zeros(n, dtype=torch.bool)
        m[torch.randperm(n, generator=g)[:F.n_kept_for(n, v.keep)]] = True
        masks.append(m.to(device))
    return make_method("mask", prune_layer=K), {"keep_masks": masks}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> tuple[float, Any]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def _proc_status_kb(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field_name} not in /proc/self/status")


def _trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc ``malloc_trim``), so RSS before a measurement is what is live and
    a later run cannot hide its peak inside memory an earlier run freed but the allocator kept."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux >= 4.0); False where that is impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _proc_status_kb("VmHWM")
        return True
    except OSError:
        return False


def tensor_peak_bytes(fn) -> tuple[int, int]:
    """(peak, net) bytes of CPU tensor memory that ``fn()`` allocates beyond what was live before it: every
    allocation and free of PyTorch's CPU allocator during the call, replayed in time order from
    ``torch.profiler`` (``profile_memory=True``). Exact and repeatable, unlike process RSS: allocator caching, freed
    pages kept by malloc and other threads do not enter it. Memory taken outside PyTorch's allocator is not seen."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas = []
    for e in prof.events():
        d = e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage  # frees / an op's own allocs
        if d:
            deltas.append((e.time_range.start, d))
    deltas.sort(key=lambda x: x[0])
    cur = peak = 0
    for _, d in deltas:
        cur += d
        peak = max(peak, cur)
    return peak, cur


def measure_peak(fn, device) -> dict[str, Any]:
    """Peak memory of ``fn()``, with the method used. CUDA: ``torch.cuda.max_memory_allocated`` (peak_bytes) and its
    rise over the allocation before the call (delta_bytes). CPU: the peak of live tensor bytes the call allocates
    (``tensor_peak_bytes``, delta_bytes; repeatable) and, for scale, process RSS before the call plus that rise
    (peak_bytes); ``rss_delta_bytes`` is the rise of the process's RSS high-water mark (VmHWM after a reset through
    /proc/self/clear_refs, Linux), which includes allocator caching and is only approximate."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"method": "torch.cuda.max_memory_allocated", "peak_bytes": peak, "delta_bytes": peak - base}
    _trim_heap()
    rss_delta = None
    if _reset_peak_rss():
        base = _proc_status_kb("VmRSS")
        fn()
        rss_delta = _proc_status_kb("VmHWM") - base
    else:
        import resource

        scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    peak, _ = tensor_peak_bytes(fn)
    return {"method": "cpu: peak live tensor bytes (torch.profiler allocation replay); peak_bytes = RSS before + it",
            "peak_bytes": base + peak, "delta_bytes": peak, "rss_delta_bytes": rss_delta}


def _order(names: list[str], r: int) -> list[str]:
    """Run order of repetition r: A B C, C B A, A B C, ... (cancels slow drift of the machine)."""
    return names if r % 2 == 0 else names[::-1]


def _interleaved(names: list[str], reps: int):
    for r in range(reps):
        yield from _order(names, r)


class Budget:
    """Wall-clock budget of a benchmark run. Loops ask ``more(done)`` before each further repetition: after the
    deadline they stop (keeping what was measured, at least one repetition) and the skip is logged and recorded,
    so a slow device or shape ends the run in bounded time instead of seeming to hang."""

    def __init__(self, seconds: float | None):
        self.start = time.perf_counter()
        self.seconds = seconds
        self.skipped: list[str] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def over(self) -> bool:
        return self.seconds is not None and self.elapsed() > self.seconds

    def fits(self, seconds: float) -> bool:
        """Whether work of about ``seconds`` started now would end inside the budget (always, without one)."""
        return self.seconds is None or self.elapsed() + seconds <= self.seconds

    def more(self, done: int, what: str) -> bool:
        if done >= 1 and self.over():
            self.skipped.append(what)
            logger.warning("time budget of %.0f s used up (%.0f s): %s cut after %d repetition(s)", self.seconds,
                           self.elapsed(), what, done)
            return False
        return True


def batch_projection(last: tuple[int, float] | None, B: int) -> float:
    """Seconds a batch of B is expected to take, from the last batch size's (batch, seconds), scaled linearly (a
    lower bound where batches are host-bound); 0 before the first."""
    return 0.0 if last is None else last[1] * B / last[0]


def _reps(names: list[str], reps: int, budget: Budget | None, what: str, order=_order):
    """``_interleaved`` that logs each repetition and stops at a repetition boundary once the budget is spent;
    ``order(names, r)`` is repetition r's run order."""
    for r in range(reps):
        if budget is not None and not budget.more(r, what):
            return
        yield from order(names, r)
        logger.info("%s: repetition %d/%d done (%.1f s elapsed)", what, r + 1, reps,
                    budget.elapsed() if budget else 0.0)


@torch.no_grad()
def time_prefill(model, adapter, runs: dict[str, tuple], inputs: dict, warmup: int, reps: int, device,
                 budget: Budget | None = None) -> tuple[dict[str, list[float]], dict[str, dict]]:
    """Seconds per prefill for every run (interleaved), and per run the kept counts and KV lengths."""
    names, times, info = list(runs), {n: [] for n in runs}, {}
    for name in _interleaved(names, warmup):
        prefill(model, adapter, runs[name][0], inputs, runs[name][1])
    for name in _reps(names, reps, budget, "prefill"):
        sec, pre = _timed(lambda n=name: prefill(model, adapter, runs[n][0], inputs, runs[n][1]), device)
        times[name].append(sec)
        info[name] = {"n_vis": pre.n_vis, "n_kept": pre.n_kept, "kv_len": pre.kv_len}
        del pre
    return times, info


@torch.no_grad()
def time_decode(model, adapter, runs: dict[str, tuple], inputs: dict, steps: int, reps: int, device,
                budget: Budget | None = None, what: str = "decode") -> dict[str, list[float]]:
    """Milliseconds per decode step (mean over ``steps`` steps after one untimed step), one value per repetition."""
    out = {n: [] for n in runs}
    for name in _reps(list(runs), reps, budget, what):
        method, request = runs[name]
        pre = prefill(model, adapter, method, inputs, request)
        tok = pre.logits.argmax(-1)
        tok = decode_step(model, adapter, pre, tok, 0).argmax(-1)

        def steps_fn(pre=pre, tok=tok):
            for s in range(steps):
                tok = decode_step(model, adapter, pre, tok, s + 1).argmax(-1)

        sec, _ = _timed(steps_fn, device)
        out[name].append(1000.0 * sec / max(steps, 1))
        del pre
    return out


def _generate(model, adapter, run: tuple, inputs: dict, new_tokens: int):
    return generate(model, adapter, run[0], inputs, max_new_tokens=new_tokens, eos_token_id=None,
                    request=run[1])


def _e2e_batch(model, adapter, runs: dict[str, tuple], inputs: dict, B: int, s: BenchSettings, device,
               budget: Budget | None = None) -> dict[str, dict]:
    def call(name: str):
        return lambda: _generate(model, adapter, runs[name], inputs, s.new_tokens)

    times: dict[str, list[float]] = {n: [] for n in runs}
    for name in _interleaved(list(runs), min(s.warmup, 1)):  # ViT + generate: one warm-up is enough
        call(name)()
    reps = s.e2e_reps if s.e2e_reps is not None else s.reps
    for name in _reps(list(runs), reps, budget, f"end-to-end batch {B}"):
        times[name].append(_timed(call(name), device)[0])
    # decode alone at this batch size (after an untimed prefill): where the KV cache, not the weights, is read
    decode = time_decode(model, adapter, runs, inputs, s.new_tokens, reps, device, budget, f"decode batch {B}")
    out = {}
    for name in runs:
        med = statistics.median(times[name])
        step_ms = statistics.median(decode[name])
        out[name] = {"seconds": _stats(times[name]), "tokens_per_s": B * s.new_tokens / med,
                     "decode_ms_per_step": _stats(decode[name]), "decode_tokens_per_s": 1000.0 * B / step_ms,
                     "memory": measure_peak(call(name), device)}
        logger.info("end-to-end batch %d, %s: %.2f s per generate, peak %.0f MiB", B, name, med,
                    out[name]["memory"]["peak_bytes"] / 2**20)
    return out


def time_end_to_end(model, adapter, shape: ModelShape, variants: list[Variant], s: BenchSettings, device,
                    budget: Budget | None = None, on_batch=None) -> dict[str, dict[int, dict]]:
    """tokens/s (B * new_tokens / median seconds, ViT included), decode-only tokens/s (B / median ms per decode
    step of the whole batch) and peak memory per variant and batch size, smallest batch first.
    A batch size that runs out of GPU memory is recorded as {"error": "out of memory"}; batch sizes not started
    before the budget ran out, or that would not end inside it (the last batch size's seconds scaled by the batch
    ratio: a batch size's minimum of runs cannot be cut short once it starts), are recorded as
    {"error": "skipped: time budget"}. ``on_batch(out)`` is called after each batch size (results written as they
    come)."""
    out: dict[str, dict[int, dict]] = {v.spec: {} for v in variants}
    last: tuple[int, float] | None = None  # (batch size, its wall seconds)
    for B in sorted(s.batch_sizes):
        projected = batch_projection(last, B)
        if budget is not None and not budget.fits(projected):
            budget.skipped.append(f"end-to-end batch {B}")
            logger.warning("time budget of %.0f s (%.0f s used): end-to-end batch %d skipped (would take ~%.0f s)",
                           budget.seconds, budget.elapsed(), B, projected)
            for v in variants:
                out[v.spec][B] = {"error": "skipped: time budget"}
            continue
        logger.info("end-to-end batch %d: %d variants (%.1f s elapsed)", B, len(variants),
                    budget.elapsed() if budget else 0.0)
        inputs = synth_inputs(shape, s.resolved_grid(), s.n_text, B, s.device, s.seed)
        n_vis = (inputs["input_ids"] == shape.token_ids()["image"]).sum(1).tolist()
        runs = {v.spec: make_variant(v, shape, n_vis, device, s.seed, s.dtype) for v in variants}
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                for name, r in _e2e_batch(model, adapter, runs, inputs, B, s, device, budget).items():
                    out[name][B] = r
            last = (B, time.perf_counter() - t0)
        except torch.cuda.OutOfMemoryError as err:
            logger.warning("batch %d: out of memory (%s)", B, err)
            for name in runs:
                out[name].setdefault(B, {"error": "out of memory"})
            torch.cuda.empty_cache()
        if on_batch is not None:
            on_batch(out)
    return out


def _stats(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "all": list(values)}


def analytic(shape: ModelShape, v: Variant, n_text: int, grid: tuple[int, int], causal: bool,
             frame_groups: int = 1) -> dict[str, Any]:
    """Per-sample FLOPs and token counts of a variant (``flops.variant_cost``; ``frame_groups`` > 1: a video)."""
    return F.variant_cost(shape, v.method, v.keep, v.layer(shape), n_text, grid, causal, frame_groups)


@torch.no_grad()
def run_benchmark(s: BenchSettings, shape: ModelShape | None = None, model=None, on_stage=None) -> dict[str, Any]:
    """Run every measurement of ``s``; returns the result dict (schema ``SCHEMA``) written by ``report``.
    ``on_stage(result)``: called with the result so far (``"complete": False``) after the prefill timings, the
    decode timings and each end-to-end batch size, so a run that is killed keeps what it measured."""
    from ..registry import get_adapter
    from .meta import environment

    shape = shape or load_shape(s.shape)
    device = torch.device(s.device)
    budget = Budget(s.budget_s)
    if s.threads and device.type == "cpu":
        torch.set_num_threads(s.threads)
    variants = [parse_variant(x) for x in s.variants]
    if "full" not in [v.spec for v in variants]:
        variants.insert(0, parse_variant("full"))
    if model is None:
        logger.info("building a random %s (%s, %s, %s)", shape.name, s.device, s.dtype, s.attn)
        model = build_model(shape, s.device, s.dtype, s.attn, s.seed)
    grid = s.resolved_grid()
    logger.info("shape %s, grid %s (%d visual + %d text tokens), variants %s", shape.name, grid, grid[0] * grid[1],
                s.n_text, [v.spec for v in variants])
    inputs = synth_inputs(shape, grid, s.n_text, s.prefill_batch, s.device, s.seed)
    n_vis = (inputs["input_ids"] == shape.token_ids()["image"]).sum(1).tolist()
    runs = {v.spec: make_variant(v, shape, n_vis, device, s.seed, s.dtype) for v in variants}
    frozen = FrozenEncodeAdapter(get_adapter(model))
    vit_sec = {}  # encode every (inputs, taps) once, untimed by the prefill loop: seconds of ViT + embedding
    for method, _ in runs.values():  # every method primed (each glimpse module projects its own taps)
        sec = _timed(lambda m=method: frozen.prime(model, inputs, m), device)[0]
        vit_sec.setdefault(str(tuple(method.vision_taps())), sec)
    logger.info("encoded once per set of vision taps (%s); timing prefill: %d warm-up + %d reps x %d variants",
                ", ".join(f"{k}: {v:.2f} s" for k, v in vit_sec.items()), s.warmup, s.reps, len(runs))
    meta = environment(device)

    def result(decode: dict, e2e: dict, complete: bool) -> dict[str, Any]:
        results = {}
        full_med = statistics.median(times["full"])
        full_flops = analytic(shape, parse_variant("full"), s.n_text, grid, s.causal)["prefill_llm_flops"]
        for v in variants:
            a = analytic(shape, v, s.n_text, grid, s.causal)
            r = {"variant": asdict(v), "analytic": a, "measured": info[v.spec], "prefill_s": _stats(times[v.spec])}
            r["prefill_ratio_measured"] = r["prefill_s"]["median"] / full_med
            r["prefill_ratio_analytic"] = a["prefill_llm_flops"] / full_flops
            if decode:
                r["decode_ms_per_token"] = _stats(decode[v.spec])
            if e2e:
                r["end_to_end"] = {str(b): x for b, x in e2e[v.spec].items()}
            results[v.spec] = r
        return {"schema": SCHEMA, "meta": meta, "settings": {**asdict(s), "n_vis": grid[0] * grid[1],
                                                             "grid": list(grid)},
                "shape": shape.to_dict(), "encode_s_by_taps": vit_sec, "results": results,
                "elapsed_s": budget.elapsed(), "skipped_for_budget": list(budget.skipped), "complete": complete}

    def stage(decode: dict, e2e: dict) -> None:
        if on_stage is not None:
            on_stage(result(decode, e2e, complete=False))

    times, info = time_prefill(model, frozen, runs, inputs, s.warmup, s.reps, device, budget)
    stage({}, {})
    decode = time_decode(model, frozen, runs, inputs, s.new_tokens, s.reps, device, budget) if s.decode else {}
    if decode:
        stage(decode, {})
    e2e = time_end_to_end(model, get_adapter(model), shape, variants, s, device, budget,
                          on_batch=lambda so_far: stage(decode, so_far)) if s.e2e else {}
    return result(decode, e2e, complete=True)


@dataclass
class RatioCheck:
    """Measured vs analytic prefill-cost ratio of one pruned variant against ``full``."""

    variant: str
    measured: float
    analytic: float
    tolerance: float = 0.15
    extra: dict = field(default_factory=dict)

    @property
    def rel_diff(self) -> float:
        return self.measured / self.analytic - 1.0

    @property
    def ok(self) -> bool:
        return abs(self.rel_diff) <= self.tolerance


def ratio_checks(result: dict, tolerance: float = 0.15) -> list[RatioCheck]:
    """One ``RatioCheck`` per pruned variant of a ``run_benchmark`` result."""
    out = []
    for name, r in result["results"].items():
        if name != "full":
            out.append(RatioCheck(name, r["prefill_ratio_measured"], r["prefill_ratio_analytic"], tolerance,
                                  {"kept_frac": r["analytic"]["n_kept"] / r["analytic"]["n_vis"]}))
    return out
