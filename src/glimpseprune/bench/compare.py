"""Head-to-head comparison of pruning methods at matched budgets, on one model, one split, one runtime.

``glimpseprune compare`` runs ``full`` once, every fixed-ratio method at every budget (default 5.6 / 11.1 / 22.2 /
33.3 % of the visual tokens), GlimpsePrune at the same fixed budgets (top-k of its VIP) and in its own dynamic
setting with and without a cap, and the ground-truth-box ``oracle``. It writes one JSON per run (fixed schema,
``RUN_VERSION``), ``compare.md`` (tables) and ``compare.png`` (accuracy vs kept fraction, one line per method).

Budgets are matched on what the decoder keeps, and every run reports three counts so no method gains from
accounting (means over samples):

- ``visual_tokens_entering_llm``: visual tokens fed to the first LLM layer (all of them for methods that prune
  inside the LLM);
- ``equivalent_visual_tokens``: visual tokens averaged over the LLM layers, sum_i n_i / L, with n_i the visual
  tokens layer i processes (the "equivalent tokens" of SparseVLM / PDrop, for single- and multi-stage methods);
- ``kv_entries_at_decode``: cache entries per layer at the start of decoding (text + kept visual tokens), and
  ``visual_kv_at_decode``: the kept visual tokens among them.
"""

from __future__ import annotations

import dataclasses
import json
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.records import boxes_on_image, read_records
from ..outputs import atomic_write_text
from .accuracy import _stats, normalize

RUN_VERSION = 1
BUDGETS = (0.056, 0.111, 0.222, 0.333)
DEFAULT_CAP = 0.111  # the paper's "<= 11.1 %" setting (upstream max_remain_ratio)
MASK_METHODS = ("mask",)  # need masks from the caller; not part of a comparison
# run a module of another kind than the comparison's one glimpse module (``--module``); scored by ``eval`` instead
OTHER_MODULE_METHODS = ("early_glimpse",)


@dataclass
class RunSpec:
    """One (method, setting) run. ``budget`` is the requested kept fraction (None for dynamic settings)."""

    label: str
    method: str
    setting: str  # full | fixed | dynamic | dynamic_cap | oracle
    budget: float | None = None
    kwargs: dict = field(default_factory=dict)
    selection: dict | None = None  # glimpse only


def plan(methods: list[str], budgets: list[float], cap: float = DEFAULT_CAP) -> list[RunSpec]:
    """The runs of a comparison: ``full`` first, then per method its budgets (or its dynamic settings)."""
    from ..registry import get_method, list_methods

    known = list_methods()
    for what, values in (("--methods", methods), ("--budgets", budgets)):
        twice = sorted({str(v) for v in values if list(values).count(v) > 1})
        if twice:  # the runs would overwrite each other's runs/<method>_<budget>.json
            raise ValueError(f"{what} names {', '.join(twice)} more than once")
    for m in methods:
        if m not in known:
            raise ValueError(f"unknown method {m!r} in --methods; registered: {known}")
        if m in MASK_METHODS:
            raise ValueError(f"method {m!r} needs caller-supplied masks; use 'oracle' for ground-truth boxes")
        if m in OTHER_MODULE_METHODS:
            raise ValueError(f"method {m!r} runs an early module, and a comparison takes one glimpse module "
                             f"(--module): score it with `glimpseprune eval --module DIR --method {m}`")
    for b in budgets:
        if not 0.0 < b <= 1.0:
            raise ValueError(f"budget {b} is not a kept fraction in (0, 1]")
    if not 0.0 < cap <= 1.0:
        raise ValueError(f"cap {cap} is not a kept fraction in (0, 1]")
    runs = [RunSpec("full", "full", "full", 1.0)]
    for m in methods:
        if m == "full":
            continue
        if m == "glimpse":
            runs += [RunSpec(f"glimpse@{b:g}", "glimpse", "fixed", b, selection={"fixed_keep_ratio": b})
                     for b in budgets]
            runs.append(RunSpec("glimpse (dynamic)", "glimpse", "dynamic", None, selection={}))
            runs.append(RunSpec(f"glimpse (dynamic, cap {cap:g})", "glimpse", "dynamic_cap", cap,
                                selection={"max_keep_ratio": cap}))
        elif m == "oracle":
            runs.append(RunSpec("oracle (box tokens)", "oracle", "oracle"))
        else:
            fields = {f.name for f in dataclasses.fields(get_method(m).config_class)}
            if "keep_ratio" not in fields:
                raise ValueError(f"method {m!r} has no keep_ratio; it cannot run at a fixed budget")
            runs += [RunSpec(f"{m}@{b:g}", m, "fixed", b, kwargs=budget_kwargs(m, b)) for b in budgets]
    return runs


def budget_kwargs(method: str, fraction: float) -> dict:
    """Config of ``method`` whose decoder keeps ``fraction`` of the visual tokens: the method class's
    ``budget_kwargs`` hook when it has one (multi-stage methods), else ``keep_ratio=fraction``."""
    from ..registry import get_method

    hook = getattr(get_method(method), "budget_kwargs", None)
    return dict(hook(fraction)) if hook is not None else {"keep_ratio": fraction}


def layer_counts(n_vis: int, prune_layers: tuple[int, ...], stage_kept: list[int], n_layers: int) -> list[int]:
    """Visual tokens each LLM layer processes: n_vis until the first compaction, then each stage's kept count from
    the layer after it (-1: from the first layer)."""
    counts = [n_vis] * n_layers
    for k, kept in zip(prune_layers, stage_kept, strict=True):
        for i in range(k + 1, n_layers):
            counts[i] = kept
    return counts


def _method(spec: RunSpec, module):
    from ..api import MODULE_METHODS, make_method
    from ..config import SelectionConfig

    if spec.method in MODULE_METHODS:  # glimpse, early_glimpse: the comparison's module
        return make_method(spec.method, module, SelectionConfig(**(spec.selection or {})), **spec.kwargs)
    return make_method(spec.method, **spec.kwargs)


class Comparison:
    """Holds the model, the module and the prepared batches of a split; ``run`` evaluates one RunSpec."""

    def __init__(self, model, processor, module, split: str | Path, limit: int | None = None, batch_size: int = 16,
                 max_new_tokens: int = 8):
        from ..processing import load_image
        from ..registry import get_adapter

        self.model, self.processor, self.module = model, processor, module
        self.adapter = get_adapter(model)
        self.n_layers = len(self.adapter.layers(model))
        self.split = Path(split)
        self.records = read_records(self.split, limit)
        if not self.records:
            raise ValueError(f"no records in {self.split}")
        self.max_new_tokens = max_new_tokens
        from ..api import PrunedModel
        from ..methods.full import FullMethod

        pm = PrunedModel(model, FullMethod(), processor)
        self.batches = []  # (records, inputs, per-image box masks); prepared once, shared by every run
        for i in range(0, len(self.records), batch_size):
            chunk = self.records[i:i + batch_size]
            images = [load_image(r.image_path(self.split.parent)) for r in chunk]
            inputs = pm.prepare([[im] for im in images], [r.question for r in chunk])
            masks = self.adapter.box_masks(model, processor, inputs,
                                           [boxes_on_image(r, im.size) for r, im in zip(chunk, images)],
                                           [im.size for im in images])
            self.batches.append((chunk, inputs, masks))

    def run(self, spec: RunSpec, keep_masks: list | None = None, progress: bool | str = False
            ) -> tuple[list[dict], dict]:
        """Evaluate one run. ``keep_masks`` (per batch, per sample) feeds the ``mask`` method; the keep masks of
        the run are left in ``self.last_keep_masks`` (same layout). ``progress``: a progress bar on stderr (samples
        done, rate, ETA; a string is its label)."""
        import torch
        from tqdm.auto import tqdm

        from ..api import PrunedModel

        pm = PrunedModel(self.model, _method(spec, self.module), self.processor)
        rows, t0 = [], time.time()
        self.last_keep_masks = []
        bar = tqdm(total=len(self.records), unit="sample", dynamic_ncols=True, disable=not progress,
                   desc=progress if isinstance(progress, str) else spec.label)
        for j, (chunk, inputs, masks) in enumerate(self.batches):
            kw = {}
            if spec.method == "oracle":
                kw = {"keep_masks": [torch.as_tensor(m) for m in masks]}
            elif spec.method == "mask":
                if keep_masks is None:
                    raise ValueError("a 'mask' run needs keep_masks")
                kw = {"keep_masks": keep_masks[j]}
            out = pm.generate(inputs, max_new_tokens=self.max_new_tokens, **kw)
            self.last_keep_masks.append([m.cpu() for m in out.keep_masks])
            pre = out.prefill
            stage_kept = pre.stage_kept
            for b, r in enumerate(chunk):
                counts = layer_counts(out.n_vis[b], pre.prune_layers, [s[b] for s in stage_kept], self.n_layers)
                n_vis = out.n_vis[b]
                rows.append({
                    "id": r.id, "family": r.family, "answer": r.answer, "prediction": out.texts[b].strip(),
                    "correct": normalize(out.texts[b]) == normalize(r.answer), "n_vis": n_vis,
                    "n_kept": out.n_kept[b], "kept_frac": out.n_kept[b] / max(n_vis, 1), "entering": counts[0],
                    "equivalent": statistics.fmean(counts), "kv_len": out.kv_len[b]})
            bar.update(len(chunk))
        bar.close()
        seconds = time.time() - t0
        return rows, self._summary(spec, rows, seconds, list(pre.prune_layers))

    def _summary(self, spec: RunSpec, rows: list[dict], seconds: float, prune_layers: list[int]) -> dict:
        fams = sorted({r["family"] for r in rows})
        mean = lambda key, sel=rows: statistics.fmean(r[key] for r in sel)  # noqa: E731
        return {
            "version": RUN_VERSION, "label": spec.label, "method": spec.method, "setting": spec.setting,
            "budget": spec.budget, "config": {**spec.kwargs, **({"selection": spec.selection}
                                                                 if spec.selection is not None else {})},
            "split": str(self.split), "n": len(rows), "n_layers": self.n_layers, "prune_layers": prune_layers,
            "exact_match": mean("correct"),
            "kept_frac": _stats([r["kept_frac"] for r in rows]),
            "accounting": {
                "mean_n_vis": mean("n_vis"),
                "visual_tokens_entering_llm": mean("entering"),
                "equivalent_visual_tokens": mean("equivalent"),
                "equivalent_frac": statistics.fmean(r["equivalent"] / max(r["n_vis"], 1) for r in rows),
                "kv_entries_at_decode": mean("kv_len"),
                "visual_kv_at_decode": mean("n_kept"),
            },
            "per_family": {f: {"n": len(sel), "exact_match": mean("correct", sel),
                               "kept_frac_mean": mean("kept_frac", sel)}
                           for f in fams for sel in [[r for r in rows if r["family"] == f]]},
            "seconds": round(seconds, 2),
        }


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", label).strip("_")


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def markdown(results: list[dict], score_key: str = "exact_match", score_name: str = "exact match") -> str:
    """Two tables: every run with its accounting, and the score (``score_key`` of each run and of its per-family
    entries; exact match on the world) per method x budget."""
    full = next((r for r in results if r["method"] == "full"), None)
    fams = sorted({f for r in results for f in r["per_family"]})
    head = ["run", score_name, "rel. to full", "kept % (mean)", "entering LLM", "equiv. tokens", "KV at decode",
            *fams]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        a = r["accounting"]
        rel = f"{100 * r[score_key] / full[score_key]:.1f} %" if full and full[score_key] else "-"
        lines.append("| " + " | ".join([
            r["label"], f"{r[score_key]:.3f}", rel, f"{100 * r['kept_frac']['mean']:.1f}",
            f"{a['visual_tokens_entering_llm']:.1f}", f"{a['equivalent_visual_tokens']:.1f}",
            f"{a['kv_entries_at_decode']:.1f}", 
            *[_cell(r['per_family'].get(f, {}).get(score_key), '.2f') for f in fams]]) + " |")
    budgets = sorted({r["budget"] for r in results if r["setting"] == "fixed"})
    methods = list(dict.fromkeys(r["method"] for r in results if r["setting"] == "fixed"))
    pivot = ["", "| method | " + " | ".join(f"{100 * b:.1f} %" for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    for m in methods:
        cells = []
        for b in budgets:
            hit = [r for r in results if r["method"] == m and r["setting"] == "fixed" and r["budget"] == b]
            cells.append(f"{hit[0][score_key]:.3f}" if hit else "-")
        pivot.append(f"| {m} | " + " | ".join(cells) + " |")
    n = results[0]["n"] if results else 0
    mean_vis = results[0]["accounting"]["mean_n_vis"] if results else 0
    intro = (f"{n} samples, {mean_vis:.1f} visual tokens per sample on average. Counts are means per sample: visual "
             "tokens entering the LLM, layer-averaged equivalent visual tokens, KV entries per layer at decode "
             "start (text + visual).")
    title = score_name[:1].upper() + score_name[1:]
    return intro + "\n\n" + "\n".join(lines) + f"\n\n{title} by method and budget (kept fraction):\n" + \
        "\n".join(pivot) + "\n"


# ------------------------------------------------------------------------------------------------------ figures

GLIMPSE_COLOR = "#c2185b"  # the headline method: one strong colour, drawn last and thickest
PEER_COLORS = ("#5b7fa6", "#6f9e76", "#a88a5c", "#8f7bab", "#5fa3b3", "#9a9a5a", "#8c8c8c", "#b07f94", "#d08c3c",
               "#b5523b", "#4f8a4b")
PEER_MARKERS = ("s", "^", "D", "v", "P", "X", "<", ">", "h", "p")
POINT_STYLE = {  # single-point settings: their own colours and markers, never a line's
    "dynamic": {"marker": "*", "color": "#f0a202", "s": 320, "short": "dynamic"},
    "dynamic_cap": {"marker": "h", "color": "#2a9d8f", "s": 90, "short": "dynamic, capped"},
    "oracle": {"marker": "D", "color": "#222222", "s": 80, "short": "oracle"},
}


def _short_path(text: str) -> str:
    """``/a/b/world/records.jsonl`` -> ``world/records.jsonl``; a folder or name as it is."""
    p = Path(str(text))
    return f"{p.parent.name}/{p.name}" if p.parent.name else p.name or str(text)


def _model_name(result: dict) -> str | None:
    model = result.get("model")
    return Path(str(model)).name or str(model) if model else None


def _data_name(result: dict) -> str | None:
    if result.get("task"):
        data = result.get("data") or result.get("split")
        return f"{result['task']} ({_short_path(data)})" if data else str(result["task"])
    for key in ("data", "split"):
        if result.get(key):
            return _short_path(result[key])
    return None


def figure_title(result: dict, what: str) -> str:
    """``what``, naming the model and the data of ``result`` when it carries them (``model``, ``task`` / ``data``
    / ``split``)."""
    model, data = _model_name(result), _data_name(result)
    where = " on ".join(x for x in (model, data) if x)
    return f"{what}: {where}" if where else what


def compare_figure(results: list[dict], score_key: str = "exact_match", score_name: str = "exact match",
                   title: str | None = None):
    """The figure of :func:`plot` (a matplotlib ``Figure``, not registered with pyplot), or None without
    matplotlib."""
    from .report import _figure

    fig = _figure(figsize=(10, 5.2))
    if fig is None:
        return None
    ax = fig.add_subplot()
    first = results[0] if results else {}
    fixed = [r for r in results if r["setting"] == "fixed"]
    methods = list(dict.fromkeys(r["method"] for r in fixed))
    peers = [m for m in methods if m != "glimpse"]
    for i, m in enumerate(peers):
        pts = sorted((r["kept_frac"]["mean"], r[score_key]) for r in fixed if r["method"] == m)
        color = PEER_COLORS[i % len(PEER_COLORS)]
        # hollow markers, a little larger than glimpse's: a peer hidden under glimpse's line still shows its rim
        ax.plot([100 * x for x, _ in pts], [y for _, y in pts], color=color, linewidth=1.4, alpha=0.9,
                marker=PEER_MARKERS[i % len(PEER_MARKERS)], markersize=9, markerfacecolor="white",
                markeredgewidth=1.4, label=m, zorder=2 + i / 100)
    if "glimpse" in methods:
        pts = sorted((r["kept_frac"]["mean"], r[score_key]) for r in fixed if r["method"] == "glimpse")
        ax.plot([100 * x for x, _ in pts], [y for _, y in pts], color=GLIMPSE_COLOR, linewidth=2.8, marker="o",
                markersize=6.5, label="glimpse (GlimpsePrune, fixed budget)", zorder=10, gid="glimpse")
    singles = [r for r in results if r["setting"] in POINT_STYLE]
    for i, r in enumerate(singles):
        st = POINT_STYLE[r["setting"]]
        x, y = 100 * r["kept_frac"]["mean"], r[score_key]
        ax.scatter([x], [y], marker=st["marker"], s=st["s"], color=st["color"], edgecolors="black",
                   linewidths=0.8, zorder=12, label=f"{r['label']}: {x:.1f} %")
        # the points sit close together (a few % kept): their labels stacked one under another never collide
        ax.annotate(st["short"], (x, y), xytext=(0, -14 - 11 * i), textcoords="offset points", ha="center",
                    va="top", fontsize=7.5, color=st["color"] if st["color"] != "#f0a202" else "#a86f00",
                    fontweight="bold", zorder=13)
    full = next((r for r in results if r["method"] == "full"), None)
    if full:
        ax.axhline(full[score_key], color="black", linestyle="--", linewidth=1.1, zorder=1,
                   label=f"full (all visual tokens): {full[score_key]:.3f}")
        ax.annotate(f"full\n{full[score_key]:.3f}", (1, full[score_key]), xycoords=("axes fraction", "data"),
                    xytext=(4, 0), textcoords="offset points", va="center", fontsize=8)
    ax.set_xlabel("visual tokens kept (% of N, mean per sample)")
    ax.set_ylabel(score_name)
    ax.set_xlim(left=0)
    ax.margins(y=0.08)
    ax.grid(alpha=0.3, zorder=0)
    what = "Exact match" if score_name == "exact match" else score_name  # a task's own name keeps its case
    fig.suptitle(title or figure_title(first, f"{what} vs visual tokens kept"),
                 fontsize=12, fontweight="bold")
    ns = sorted({r["n"] for r in results})
    sub = [f"{ns[0]} samples" if len(ns) == 1 else f"{ns[0]}-{ns[-1]} samples"] if ns else []
    if first.get("accounting"):
        sub.append(f"N = {first['accounting']['mean_n_vis']:.0f} visual tokens per sample (mean)")
    if first.get("module"):
        sub.append(f"module: {_model_name({'model': first['module']})}")
    ax.set_title(" · ".join(sub) + "\nbudgets matched on the visual tokens kept at decode", loc="left",
                 fontsize=8.5, color="#444444")
    handles, labels = ax.get_legend_handles_labels()
    if "glimpse" in methods:  # the headline first in the legend too
        i = labels.index("glimpse (GlimpsePrune, fixed budget)")
        handles.insert(0, handles.pop(i))
        labels.insert(0, labels.pop(i))
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.07, 1.0), borderaxespad=0, fontsize=8,
              frameon=False)
    return fig


def plot(results: list[dict], path: str | Path, score_key: str = "exact_match", score_name: str = "exact match",
         title: str | None = None) -> Path | None:
    """Score vs kept fraction (mean): one line per fixed-budget method (glimpse on top, peers muted), dynamic
    settings and the oracle as labelled points, the full model as a dashed line; the legend outside the axes; the
    title names the model and the data. None when matplotlib is not installed."""
    fig = compare_figure(results, score_key, score_name, title)
    if fig is None:
        return None
    fig.savefig(path, dpi=130)
    return Path(path)


def k_sweep_figure(result: dict, title: str | None = None):
    """The figure of :func:`plot_k_sweep` (a matplotlib ``Figure``), or None without matplotlib."""
    from .report import _figure

    fig = _figure(figsize=(8.6, 4.8))
    if fig is None:
        return None
    from matplotlib.ticker import MaxNLocator

    ax = fig.add_subplot()
    rows = result["rows"]
    ks = [r["K"] for r in rows]
    ax2 = ax.twinx()  # the cost behind the scores: its line muted, its axis on the right
    ax2.plot(ks, [100 * r["prefill_ratio_analytic"] for r in rows], color="#9e9e9e", linestyle=":", linewidth=1.8,
             label="prefill cost, % of full (right axis)")
    ax2.set_ylabel("prefill cost, % of full (analytic)", color="#6e6e6e")
    ax2.tick_params(axis="y", colors="#6e6e6e")
    ax2.set_ylim(0, 105)
    ax.set_zorder(ax2.get_zorder() + 1)  # the scores above the cost line
    ax.patch.set_visible(False)
    fv = [r for r in rows if r.get("fastv_topk") is not None]
    ax.plot([r["K"] for r in fv], [r["fastv_topk"] for r in fv], color=PEER_COLORS[0], marker="^", markersize=8,
            markerfacecolor="white", markeredgewidth=1.4, linewidth=1.4, label="top-k by attention at layer K",
            zorder=2)
    ax.plot(ks, [r["oracle"] for r in rows], color="#222222", marker="D", markersize=6, linewidth=1.4,
            label="oracle box tokens, dropped after K", zorder=3)
    ax.plot(ks, [r["glimpse_masks"] for r in rows], color=GLIMPSE_COLOR, marker="o", markersize=6.5,
            linewidth=2.8, label="GlimpsePrune's masks, dropped after K", zorder=4)
    full = result.get("full_exact_match")
    if full is not None:
        ax.axhline(full, color="black", linestyle="--", linewidth=1.1, zorder=1,
                   label=f"full (all visual tokens): {full:.3f}")
    K = result.get("module_prune_layer")
    if K is not None:
        ax.axvline(K, color=GLIMPSE_COLOR, linestyle=(0, (1, 3)), linewidth=1.2, zorder=1,
                   label=f"the module's K = {K}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("pruning layer K (-1: before the LLM)")
    ax.set_ylabel("exact match")
    ax.margins(y=0.08)
    ax.grid(alpha=0.3)
    fig.suptitle(title or figure_title(result, "Accuracy vs pruning layer K"), fontsize=12,
                 fontweight="bold")
    sub = [f"{result['n']} samples" if "n" in result else None,
           f"the module's K = {K}" if K is not None else None,
           f"GlimpsePrune keeps {100 * result['glimpse_kept_frac_mean']:.1f} %"
           if result.get("glimpse_kept_frac_mean") is not None else None,
           f"{result['n_layers']} LLM layers" if result.get("n_layers") else None]
    ax.set_title(" · ".join(x for x in sub if x), loc="left", fontsize=8.5, color="#444444")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    order = [2, 1, 0, *range(3, len(h1))]  # glimpse first, as drawn last
    ax.legend([h1[i] for i in order] + h2, [l1[i] for i in order] + l2, loc="upper center",
              bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=8, frameon=False)
    return fig


def plot_k_sweep(result: dict, path: str | Path, title: str | None = None) -> Path | None:
    """``k_sweep.png`` from a :func:`k_sweep` result: exact match of GlimpsePrune's masks, the oracle boxes and
    attention top-k dropped after each K, the full model, the module's own K, and the analytic prefill cost on a
    second axis (all in one legend, below the axes). None when matplotlib is not installed."""
    fig = k_sweep_figure(result, title)
    if fig is None:
        return None
    fig.savefig(path, dpi=130)
    return Path(path)


def compare(model, processor, module, split, out, methods: list[str], budgets: list[float] = BUDGETS,
            cap: float = DEFAULT_CAP, limit: int | None = None, batch_size: int = 16, meta: dict | None = None,
            log=print, progress: bool = False) -> list[dict]:
    """Run the plan and write ``OUT/runs/<label>.json``, ``OUT/compare.md``, ``OUT/compare.png``. ``progress``: a
    bar per run on stderr, labelled ``[i/N] run``, with its ETA."""
    from .meta import environment

    specs = plan(methods, list(budgets), cap)
    if "glimpse" in methods and module is None:
        raise ValueError("method 'glimpse' needs a glimpse module (--module)")
    out = Path(out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    cmp = Comparison(model, processor, module, split, limit, batch_size)
    env: dict[str, Any] = environment(next(model.parameters()).device)
    results = []
    for n, spec in enumerate(specs, 1):
        rows, summary = cmp.run(spec, progress=f"[{n}/{len(specs)}] {spec.label}" if progress else False)
        summary.update({**(meta or {}), "environment": env})
        atomic_write_text(out / "runs" / f"{slug(spec.label)}.json", json.dumps(summary, indent=1) + "\n")
        results.append(summary)
        a = summary["accounting"]
        log(f"{spec.label:32s} exact match {summary['exact_match']:.3f}  "
            f"kept {100 * summary['kept_frac']['mean']:5.1f} %  entering {a['visual_tokens_entering_llm']:6.1f}  "
            f"equiv {a['equivalent_visual_tokens']:6.1f}"
            f"  KV {a['kv_entries_at_decode']:6.1f}  ({summary['seconds']:.0f} s)")
    md = markdown(results)
    atomic_write_text(out / "compare.md", md)
    png = plot(results, out / "compare.png")
    log(md)
    log(f"wrote {out / 'runs'}/*.json, {out / 'compare.md'}" + (f", {png}" if png else
                                                                   " (no plot: pip install matplotlib)"))
    return results


def k_sweep(model, processor, module, split, out, limit: int | None = None, batch_size: int = 16,
            meta: dict | None = None, log=print) -> dict:
    """Accuracy and prefill cost vs the pruning layer K (upstream issue #14, "why prune so late?").

    For every K in -1 (before the LLM) .. L-1: (a) GlimpsePrune's own keep masks (chosen by its VIP at the
    module's K) dropped after layer K instead (``mask`` method): where to drop, with the choice fixed; (b) the
    ground-truth box tokens dropped after K (``oracle``); (c) FastV-style top-k by the last prompt token's attention
    at layer K, at GlimpsePrune's mean kept fraction: how well layer K's attention can choose. Plus the analytic
    prefill cost of dropping after K (LLM layers, this model's shape, the split's mean token counts).
    Writes ``OUT/k_sweep.json``, ``OUT/k_sweep.md``, ``OUT/k_sweep.png``."""
    from .flops import prefill_flops
    from .meta import environment
    from .shapes import ModelShape

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cmp = Comparison(model, processor, module, split, limit, batch_size)
    L = cmp.n_layers
    _, full = cmp.run(RunSpec("full", "full", "full", 1.0))
    _, dyn = cmp.run(RunSpec("glimpse (dynamic)", "glimpse", "dynamic", selection={}))
    glimpse_masks = cmp.last_keep_masks
    frac = dyn["kept_frac"]["mean"]
    n_vis, n_kept = full["accounting"]["mean_n_vis"], dyn["accounting"]["visual_kv_at_decode"]
    n_text = round(full["accounting"]["kv_entries_at_decode"] - n_vis)
    shape = ModelShape.from_hf(model.config, name="embedded")
    base = prefill_flops(shape, n_text, round(n_vis)).llm
    rows = []
    for K in range(-1, L):
        row = {"K": K, "prefill_ratio_analytic": prefill_flops(shape, n_text, round(n_vis), round(n_kept), K).llm
               / base}
        _, s = cmp.run(RunSpec(f"glimpse masks @{K}", "mask", "fixed", kwargs={"prune_layer": K}), glimpse_masks)
        row["glimpse_masks"] = s["exact_match"]
        _, s = cmp.run(RunSpec(f"oracle @{K}", "oracle", "oracle", kwargs={"prune_layer": K}))
        row["oracle"] = s["exact_match"]
        row["fastv_topk"] = None
        if K >= 0:
            _, s = cmp.run(RunSpec(f"fastv @{K}", "fastv", "fixed", frac, kwargs={"keep_ratio": frac,
                                                                                  "prune_layer": K}))
            row["fastv_topk"] = s["exact_match"]
        rows.append(row)
        log(f"K={K:2d}  prefill {100 * row['prefill_ratio_analytic']:5.1f} % of full  glimpse masks "
            f"{row['glimpse_masks']:.3f}  oracle {row['oracle']:.3f}  fastv top-k "
            + ("-" if row["fastv_topk"] is None else f"{row['fastv_topk']:.3f}"))
    result = {"version": RUN_VERSION, **(meta or {}), "split": str(split), "n": full["n"], "n_layers": L,
              "module_prune_layer": dyn["prune_layers"][0] if dyn["prune_layers"] else None,
              "full_exact_match": full["exact_match"], "glimpse_dynamic_exact_match": dyn["exact_match"],
              "glimpse_kept_frac_mean": frac, "mean_n_vis": n_vis, "mean_n_text": n_text, "rows": rows,
              "environment": environment(next(model.parameters()).device)}
    atomic_write_text(out / "k_sweep.json", json.dumps(result, indent=1) + "\n")
    md = [f"{full['n']} samples; full {full['exact_match']:.3f}; GlimpsePrune (its own K = "
          f"{result['module_prune_layer']}) {dyn['exact_match']:.3f} keeping {100 * frac:.1f} %. Prefill: analytic "
          f"LLM FLOPs of dropping after K ({round(n_vis)} visual + {n_text} text tokens, {round(n_kept)} kept).", "",
          "| K | prefill % of full | GlimpsePrune masks dropped after K | oracle box tokens | FastV top-k at K |",
          "|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['K']} | {100 * r['prefill_ratio_analytic']:.1f} | {r['glimpse_masks']:.3f} | "
                  f"{r['oracle']:.3f} | " + ("-" if r["fastv_topk"] is None else f"{r['fastv_topk']:.3f}") + " |")
    atomic_write_text(out / "k_sweep.md", "\n".join(md) + "\n")
    plot_k_sweep(result, out / "k_sweep.png")
    log("\n".join(md))
    return result
