"""Where a GlimpsePrune(+) folder stands on a world split, and what bounds it: exact match (greedy, per family) with
the module's own masks (inference), with the **ground-truth box masks** dropped at the module's K (what the VIP would
give if it were perfect: the ceiling of the mask side), and with every token; optionally the probability of a right
answer when sampling at temperature 1 (G draws per question from the module-pruned prefill, split by whether the
greedy answer was right: how much a policy-gradient step can find to reinforce).

Each folder is loaded on a fresh copy of the embedded base (a GlimpsePrune+ folder's adapter is merged into it).

    python benchmarks/stage2_ceiling.py --split world/records.jsonl --modules embedded embedded-k0 \
        runs/stage2_world/module --samples 16 --out results/stage2_world/ceiling

Writes OUT/ceiling.json (one entry per folder) as each folder finishes; the last stdout line is that JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

from glimpseprune.api import apply, load_base, make_method
from glimpseprune.assets import resolve_model, resolve_module
from glimpseprune.bench.accuracy import normalize
from glimpseprune.bench.meta import environment
from glimpseprune.checkpoint import load_plus
from glimpseprune.methods.glimpse import GlimpseMethod
from glimpseprune.processing import build_inputs
from glimpseprune.registry import get_adapter
from glimpseprune.training.stage1 import RecordDataset


def _families(split: Path) -> list[str]:
    return [json.loads(line).get("family", "all") for line in split.read_text().splitlines() if line.strip()]


def _box_masks(model, processor, items) -> list[torch.Tensor]:
    inputs = dict(build_inputs(processor, [[it["image"]] for it in items], [it["question"] for it in items]))
    masks = get_adapter(model).box_masks(model, processor, inputs, [it["boxes"] for it in items],
                                         [(it["width"], it["height"]) for it in items])
    return [torch.from_numpy(m.reshape(-1)) for m in masks]


def _score(per_family: dict[str, list[bool]]) -> dict:
    every = [x for v in per_family.values() for x in v]
    return {"exact_match": sum(every) / len(every),
            "per_family": {k: sum(v) / len(v) for k, v in sorted(per_family.items())}}


def evaluate(name: str, split: Path, limit: int | None, samples: int, batch: int) -> dict:
    model, processor = load_base(resolve_model("embedded"), device="cpu", dtype=torch.float32)
    model, module = load_plus(model, resolve_module(name))
    K = module.cfg.prune_layer
    ds = RecordDataset(str(split), limit=limit)
    fams = _families(split)[:len(ds)]
    runs = {"module": apply(model, GlimpseMethod(module=module), processor=processor),
            "boxes": apply(model, make_method("mask", prune_layer=K), processor=processor),
            "full": apply(model, "full", processor=processor)}
    out: dict = {"K": K}
    greedy_right: list[bool] = []
    for run, pm in runs.items():
        per_family, kept = defaultdict(list), []
        for i in range(0, len(ds), batch):
            items = [ds[j] for j in range(i, min(i + batch, len(ds)))]
            kw = {"keep_masks": _box_masks(model, processor, items)} if run == "boxes" else {}
            res = pm.generate(images=[[it["image"]] for it in items], questions=[it["question"] for it in items],
                              max_new_tokens=8, **kw)
            for b, it in enumerate(items):
                right = normalize(res.texts[b]) == normalize(it["answer"])
                per_family[fams[i + b]].append(right)
                kept.append(res.n_kept[b] / max(res.n_vis[b], 1))
                if run == "module":
                    greedy_right.append(right)
        out[run] = {**_score(per_family), "kept_frac": sum(kept) / len(kept)}
        print(f"{name}: K={K} {run}: exact match {out[run]['exact_match']:.3f} kept {out[run]['kept_frac']:.3f} "
              f"{json.dumps(out[run]['per_family'])}", flush=True)
    if samples:
        out["sampling"] = _sampling(model, processor, module, ds, fams, greedy_right, samples, batch)
    return out


def _sampling(model, processor, module, ds, fams, greedy_right, G: int, batch: int) -> dict:
    """P(right answer) at temperature 1 from the module-pruned prefill, G seeded draws per question."""
    from glimpseprune.rewards import make_reward
    from glimpseprune.training.grpo_step import GRPOStep
    from glimpseprune.training.stage2 import Stage2Config

    cfg = Stage2Config(num_generations=G, max_new_tokens=8, temperature=1.0, mask_source="vip")
    step = GRPOStep(model, processor, module, cfg, [make_reward("exact")])
    p: list[float] = []
    for i in range(0, len(ds), batch):
        items = [ds[j] for j in range(i, min(i + batch, len(ds)))]
        rolled = step.rollout(items, [i * G + r for r in range(len(items) * G)])
        p += rolled.rewards.view(-1, G).mean(1).tolist()
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
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"error: {out} is not empty (another run's results?); choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    result = {"split": args.split, "limit": args.limit, "environment": environment(), "modules": {}}
    t0 = time.time()
    for name in args.modules:
        result["modules"][name] = evaluate(name, Path(args.split), args.limit, args.samples, args.batch)
        result["seconds"] = time.time() - t0
        (out / "ceiling.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
