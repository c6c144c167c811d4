"""Can fine-tuning the LLM teach the embedded base to count? Two tools for GlimpsePrune+'s counting question.

``mix``: write a family-weighted training split of the synthetic world (seeds in the training range, disjoint from
the held-out splits), e.g. counting three times as often as each other family, or counting alone; use it as a stage-2
config's ``train_data``::

    python benchmarks/stage2_counting.py mix --out /tmp/mix3 --n 4000 --weights count=3
    python benchmarks/stage2_counting.py mix --out /tmp/countonly --n 4000 \
        --weights count=1,lookup=0,glyph=0,relation=0,exist=0

``sft``: the supervised bound of what an LLM adapter can learn here: the stage-2 LoRA (r 32 / alpha 64 on every
decoder linear) trained with the cross-entropy of the reference answer alone (no RL), teacher-forced on exactly the
pruned prefill GlimpsePrune+ rolls out from (an early module's picks dropped after LLM layer ``--drop-layer``), and
the held-out per-family exact match of count / exist / relation every 100 steps (``--merger`` also trains the ViT's
patch merger, the layer that makes the LLM's visual tokens; ``--train-all`` replaces the LoRA by full fine-tuning of
every weight of the model, ViT included: the bound past any adapter)::

    python benchmarks/stage2_counting.py sft --train /tmp/mix3/records.jsonl --split world/records.jsonl \
        --module results/early_glimpse/module --steps 300 --lr 3e-4 --out results/stage2_world/counting/sft_mix3.json
    python benchmarks/stage2_counting.py sft --train /tmp/mix3/records.jsonl --split world/records.jsonl \
        --train-all --families count exist relation glyph lookup --out results/stage2_world/counting/full_mix3.json

Writes OUT (JSON) after every evaluation; the last stdout line is that JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

TRAIN_SEED0 = 3_000_000_000  # as stage 1 / stage 2's synthetic training scenes (held-out splits: seed * 10^6 + i)


def mix(out: Path, n: int, weights: dict[str, int]) -> None:
    from glimpseprune.data.world import FAMILIES, render, sample

    unknown = set(weights) - set(FAMILIES)
    if unknown:
        raise SystemExit(f"error: unknown families {sorted(unknown)}; choose from {FAMILIES}")
    cycle = [f for f in FAMILIES for _ in range(int(weights.get(f, 1)))]
    if not cycle:
        raise SystemExit("error: every family has weight 0")
    if (out / "records.jsonl").exists():
        raise SystemExit(f"error: {out}/records.jsonl exists (another split?); choose a new --out")
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        s = sample(TRAIN_SEED0 + i, cycle[i % len(cycle)])
        rel = f"images/t-{i:06d}.png"
        render(s.scene).save(out / rel)
        w, h = s.scene.size
        lines.append(json.dumps({"id": f"t-{i:06d}", "image": rel, "question": s.question, "answer": s.answer,
                                 "width": w, "height": h, "bboxs": s.boxes, "family": s.family}) + "\n")
    (out / "records.jsonl").write_text("".join(lines))
    print(json.dumps({"out": str(out), "n": n, "weights": weights}))


def sft(args) -> None:
    from glimpseprune.api import load_base
    from glimpseprune.assets import resolve_model
    from glimpseprune.bench.meta import environment
    from glimpseprune.checkpoint import load_module
    from glimpseprune.lora import LoraSettings, add_lora, lora_parameters
    from glimpseprune.registry import get_adapter
    from glimpseprune.runtime.engine import prefill
    from glimpseprune.runtime.rollout import completion_logprobs, expand_prefill
    from glimpseprune.training.rl.grpo import sft_loss
    from glimpseprune.training.rl.step import GRPOStep
    from glimpseprune.training.stage1 import RecordDataset
    from glimpseprune.training.stage2 import Stage2Config, evaluate_exact

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    model, processor = load_base(resolve_model("embedded"), device="cpu", dtype=torch.float32)
    adapter = get_adapter(model)
    module = load_module(args.module, adapter.dims(model))
    if module.cfg.kind == "early":
        module.drop_after(args.drop_layer)
    for p in module.parameters():
        p.requires_grad_(False)
    if args.train_all:  # the bound past any adapter: every weight of the model (ViT, merger, LLM) trained
        params = list(model.parameters())
        for p in params:
            p.requires_grad_(True)
    else:
        add_lora(model, LoraSettings(r=32, alpha=64, dropout=0.05), base_model_name="embedded")
        params = lora_parameters(model)
    if args.merger and not args.train_all:
        merger = list(model.model.visual.merger.parameters())
        for p in merger:
            p.requires_grad_(True)
        params += merger
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    # the GRPO step's own pieces: the module's masks, the reference tokens and the prefill on the rollouts' pruned
    # schedule (num_generations is unused here: one row per prompt is scored)
    step = GRPOStep(model, processor, module, Stage2Config(), [])
    train, held = RecordDataset(args.train), RecordDataset(args.split)
    by_family: dict[str, list] = {}
    for i, r in enumerate(held.records):
        by_family.setdefault(r.family, []).append(i)
    result = {"args": vars(args), "environment": environment(), "evals": []}

    def evaluate(at: int) -> None:
        model.eval()
        ev = {"step": at}
        for fam in args.families:
            items = [held[i] for i in by_family.get(fam, [])]
            ev[fam] = evaluate_exact(model, processor, module, items, None, None)["exact_match"]
        model.train()
        result["evals"].append(ev)
        out.write_text(json.dumps(result, indent=1))
        print(json.dumps(ev), flush=True)

    evaluate(0)
    order = list(range(len(train)))
    random.shuffle(order)
    t0, B = time.time(), args.batch
    model.train()
    for s in range(args.steps):
        items = [train[order[(s * B + j) % len(order)]] for j in range(B)]
        inputs = step.inputs(items)
        with torch.no_grad():
            model.eval()
            pre = prefill(model, adapter, step.vip, inputs)  # the module's masks, as a rollout takes them
            model.train()
        gold, gold_mask = step.reference([it["answer"] for it in items])
        fixed = step.fixed_prefill(inputs, pre.keep_masks)  # with grad, as GRPOStep.update's prefill
        gold_logp = completion_logprobs(model, adapter, expand_prefill(model, adapter, fixed, 1), gold, 1.0)
        loss = sft_loss(gold_logp, gold_mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (s + 1) / 20)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (s + 1) % 10 == 0:  # progress on stderr (stdout: the evals' JSON lines)
            print(f"step {s + 1}: loss {float(loss.detach()):.4f}, {time.time() - t0:.0f} s", file=sys.stderr,
                  flush=True)
        if (s + 1) % 100 == 0 or s + 1 == args.steps:
            result["seconds"] = time.time() - t0
            evaluate(s + 1)
    print(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("mix", help="write a family-weighted training split")
    m.add_argument("--out", required=True)
    m.add_argument("--n", type=int, default=4000)
    m.add_argument("--weights", default="count=3", help="family=weight (integers; others 1)")
    s = sub.add_parser("sft", help="supervised LoRA on GlimpsePrune+'s pruned prefill; per-family held-out accuracy")
    s.add_argument("--train", required=True, help="records JSONL (e.g. from `mix`)")
    s.add_argument("--split", required=True, help="held-out records JSONL (the main job's: world/records.jsonl)")
    s.add_argument("--module", default="results/early_glimpse/module")
    s.add_argument("--drop-layer", type=int, default=0, help="an early module's picks leave after this LLM layer")
    s.add_argument("--steps", type=int, default=300)
    s.add_argument("--batch", type=int, default=16)
    s.add_argument("--lr", type=float, default=3e-4)
    s.add_argument("--merger", action="store_true", help="also train the ViT's patch merger")
    s.add_argument("--train-all", action="store_true",
                   help="train every weight of the model instead of a LoRA (full fine-tuning: the bound past LoRA)")
    s.add_argument("--families", nargs="+", default=["count", "exist", "relation"])
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--out", required=True, help="JSON file for the results")
    args = ap.parse_args()
    if args.cmd == "mix":
        weights = {}
        for item in filter(None, args.weights.split(",")):
            fam, _, w = item.partition("=")
            weights[fam] = int(w)
        mix(Path(args.out), args.n, weights)
    else:
        if Path(args.out).exists():
            raise SystemExit(f"error: {args.out} exists (another run's results?); choose a new --out")
        sft(args)


if __name__ == "__main__":
    main()
