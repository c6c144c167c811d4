"""Where a GlimpsePrune(+) folder stands on a world split, and what bounds it: exact match (greedy, per family) with
the module's own masks (inference), with the **ground-truth box masks** dropped at the module's K (what the VIP would
give if it were perfect: the ceiling of the mask side), and with every token, each with its wrong answers counted
per family ("three -> four"); per family, how the module's masks stand against the box tokens (mean precision and
recall, how many questions kept exactly the box tokens and how many of those were still answered wrong);
optionally the probability of a right answer when sampling at temperature 1 (G draws per question from the
module-pruned prefill, split by whether the greedy answer was right: how much a policy-gradient step can find to
reinforce).

Each folder is loaded on a fresh copy of the base (the embedded one unless `--model DIR`; a GlimpsePrune+ folder's
adapter is merged into it). An
early module (kind early) runs as ``early_glimpse``; ``--drop-layer J`` makes its picks leave after LLM layer J (its
box-mask run drops there too).

    python benchmarks/stage2_ceiling.py --split world/records.jsonl --modules embedded embedded-k0 \
        runs/stage2_world/module --samples 16 --out results/stage2_world/ceiling

Writes OUT/ceiling.json at the start and again as each folder finishes (one entry per folder); the last stdout line
is that JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from glimpseprune.api import load_base, module_method_name
from glimpseprune.assets import resolve_model, resolve_module
from glimpseprune.bench.compare import Comparison, RunSpec
from glimpseprune.bench.meta import environment
from glimpseprune.checkpoint import load_plus
from glimpseprune.training.stage1 import RecordDataset


def evaluate(name: str, split: Path, limit: int | None, samples: int, batch: int,
             drop_layer: int | None = None, base: str = "embedded") -> dict:
    """One folder on a fresh copy of the base: its own masks, the ground-truth box tokens at its K (the ``oracle``
    method) and every token, through ``bench.compare.Comparison`` (the split's inputs and box masks prepared once)."""
    model, processor = load_base(resolve_model(base), device="cpu", dtype=torch.float32)
    model, module = load_plus(model, resolve_module(name))
    if drop_layer is not None and module.cfg.kind == "early":  # its picks leave after LLM layer drop_layer
        module.drop_after(drop_layer)
    K = module.cfg.prune_layer
    cmp = Comparison(model, processor, module, split, limit=limit, batch_size=batch)
    runs = {"module": RunSpec("module", module_method_name(module), "dynamic", selection={}),
            "boxes": RunSpec("boxes", "oracle", "oracle", kwargs={"prune_layer": K}),
            "full": RunSpec("full", "full", "full")}
    out: dict = {"K": K}
    for run, spec in runs.items():
        rows, summary = cmp.run(spec, progress=f"{name} {run}")
        out[run] = {"exact_match": summary["exact_match"],
                    "per_family": {f: v["exact_match"] for f, v in summary["per_family"].items()},
                    "kept_frac": summary["kept_frac"]["mean"], "errors": _errors(rows)}
        if run == "module":
            module_rows = rows
            out[run]["masks"] = _mask_agreement(rows, cmp)
        print(f"{name}: K={K} {run}: exact match {out[run]['exact_match']:.3f} kept {out[run]['kept_frac']:.3f} "
              f"{json.dumps(out[run]['per_family'])}", flush=True)
    if samples:
        out["sampling"] = _sampling(model, processor, module, RecordDataset(str(split), limit=limit), module_rows,
                                    samples, batch)
        print(f"{name}: K={K} sampling at temperature 1: mean p(right) {out['sampling']['mean_p_right']:.3f}",
              flush=True)
    return out


def _mask_agreement(rows: list[dict], cmp: Comparison) -> dict:
    """Per family, how the run's keep masks (``cmp.last_keep_masks``) stand against the answer's box tokens: mean
    precision and recall, the questions whose kept set IS the box set (no token missed, none extra) and how many of
    those were still answered wrong (errors no mask could remove)."""
    kept = [torch.as_tensor(m).flatten().bool() for b in cmp.last_keep_masks for m in b]
    boxes = [torch.as_tensor(m).flatten().bool() for _, _, masks in cmp.batches for m in masks]
    if len(kept) != len(rows) or len(boxes) != len(rows):
        raise RuntimeError(f"{len(rows)} rows but {len(kept)} keep masks and {len(boxes)} box masks")
    out: dict = {}
    for r, k, b in zip(rows, kept, boxes, strict=True):
        if k.shape != b.shape:
            raise RuntimeError(f"{r['id']}: keep mask of {k.numel()} tokens, box mask of {b.numel()}")
        tp = int((k & b).sum())
        f = out.setdefault(r["family"], {"n": 0, "precision": [], "recall": [], "exact": 0, "exact_wrong": 0})
        f["n"] += 1
        f["precision"].append(tp / int(k.sum()) if k.any() else 1.0)  # nothing kept: no false pick
        f["recall"].append(tp / int(b.sum()) if b.any() else 1.0)  # no box token: nothing to miss
        if torch.equal(k, b):
            f["exact"] += 1
            f["exact_wrong"] += not r["correct"]
    return {fam: {**v, "precision": statistics.mean(v["precision"]), "recall": statistics.mean(v["recall"])}
            for fam, v in sorted(out.items())}


def _errors(rows: list[dict]) -> dict:
    """Per family, how often each wrong answer was given for each right one: {"count": {"three -> four": 8}}."""
    out: dict = {}
    for r in rows:
        if not r["correct"]:
            key = f"{r['answer']} -> {r['prediction']}"
            fam = out.setdefault(r["family"], {})
            fam[key] = fam.get(key, 0) + 1
    return {f: dict(sorted(v.items())) for f, v in sorted(out.items())}


def _sampling(model, processor, module, ds, greedy_rows: list[dict], G: int, batch: int) -> dict:
    """P(right answer) at temperature 1 from the module-pruned prefill, G seeded draws per question, grouped by
    family and by whether the greedy answer (``greedy_rows``, the module run's rows in split order) was right."""
    from glimpseprune.rewards import make_reward
    from glimpseprune.training.rl.step import GRPOStep
    from glimpseprune.training.stage2 import Stage2Config

    cfg = Stage2Config(num_generations=G, max_new_tokens=8, temperature=1.0, mask_source="vip")
    step = GRPOStep(model, processor, module, cfg, [make_reward("exact")])
    p: list[float] = []
    for i in range(0, len(ds), batch):
        items = [ds[j] for j in range(i, min(i + batch, len(ds)))]
        rolled = step.rollout(items, [i * G + r for r in range(len(items) * G)])
        p += rolled.rewards.view(-1, G).mean(1).tolist()
    fams, greedy_right = [r["family"] for r in greedy_rows], [r["correct"] for r in greedy_rows]
    groups: dict = {}
    for fam in sorted(set(fams)):
        for right in (True, False):
            vals = [p[j] for j in range(len(p)) if fams[j] == fam and greedy_right[j] == right]
            if vals:
                groups[f"{fam}/greedy_{'right' if right else 'wrong'}"] = {
                    "n": len(vals), "mean_p_right": statistics.mean(vals),
                    "any_right": sum(v > 0 for v in vals) / len(vals)}
    return {"G": G, "temperature": 1.0, "mean_p_right": statistics.mean(p), "groups": groups}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", required=True, help="records JSONL from `glimpseprune make-world` (boxes + family)")
    ap.add_argument("--modules", nargs="+", required=True, help="module or GlimpsePrune+ folders ('embedded', ...)")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--samples", type=int, default=0, help="G draws per question at temperature 1 (0: skip)")
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--drop-layer", type=int, help="early modules (kind early): their picks leave after this LLM "
                    "layer instead of the module's own prune_layer (-1: before the LLM)")
    ap.add_argument("--model", default="embedded",
                    help="base model folder (default: the embedded world model), e.g. a further-trained copy")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"error: {out} is not empty (another run's results?); choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    result = {"split": args.split, "limit": args.limit, "drop_layer": args.drop_layer, "model": args.model,
              "environment": environment(),
              "modules": {}}
    (out / "ceiling.json").write_text(json.dumps(result, indent=1))  # an unwritable --out fails here, before any run
    t0 = time.time()
    for name in args.modules:
        result["modules"][name] = evaluate(name, Path(args.split), args.limit, args.samples, args.batch,
                                           args.drop_layer, args.model)
        result["seconds"] = time.time() - t0
        (out / "ceiling.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
