"""How the embedded base counts, read from its attention (why GlimpsePrune+ cannot sharpen it; README, GlimpsePrune+).

The world-model trainer taught one head (layer ``--layer``, head ``--head``; ``training/world_model.py``,
``attention_supervision``) a uniform attention, from the position that predicts the answer, over one token per
counted object (its top-left cell) and ``<|vision_start|>`` as a sink, so that the head's output carries 1 / (n + 1).
This script runs the shipped base with every token (eager attention, teacher-forced on the split's own answers) on
the counting questions of a held-out split and reports, per true count n: greedy accuracy over the number words, the
sink's attention weight (ideal 1 / (n + 1)) and the attention on the object anchors, on the objects' other cells and
on every other visual token. Spread in the sink weight is how far the head is from a clean counter::

    python benchmarks/world_model_probe/count_head.py --seed 1 --n 500 --out results/world_model_probe/count_head.json

The last stdout line is the JSON written to ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=1, help="the split's seed (make-world --seed; the main job's is 1)")
    ap.add_argument("--n", type=int, default=500, help="the split's size (its counting questions are every 5th)")
    ap.add_argument("--model", default="embedded", help="base model folder (default: the shipped embedded base)")
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--head", type=int, default=2)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"error: {out} exists (another run's results?); choose a new --out")
    try:  # an unwritable --out fails here, before the model runs
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"args": vars(args)}))
    except OSError as e:
        raise SystemExit(f"error: cannot write --out {out}: {e.strerror}") from None

    from glimpseprune.api import load_base
    from glimpseprune.assets import resolve_model
    from glimpseprune.bench.meta import environment
    from glimpseprune.data import world
    from glimpseprune.training.world_model import _first_answer, _qa_batch

    torch.set_num_threads(args.threads)
    model, processor = load_base(resolve_model(args.model), device="cpu", dtype=torch.float32)
    model.set_attn_implementation("eager")  # attention weights are returned by the eager path only
    tok = processor.tokenizer
    words = world.NUMBERS[1:5]
    word_ids = torch.tensor(tok.convert_tokens_to_ids(words))
    samples = [world.sample(args.seed * 1_000_000 + i, world.FAMILIES[i % len(world.FAMILIES)])
               for i in range(args.n) if world.FAMILIES[i % len(world.FAMILIES)] == "count"]
    rows = []
    for s0 in range(0, len(samples), args.batch):
        chunk = samples[s0:s0 + args.batch]
        batch = _qa_batch(processor, chunk)
        first = _first_answer(batch)
        del batch["labels"]
        with torch.no_grad():
            res = model(**batch, output_attentions=True)
        ids = batch["input_ids"]
        for b, s in enumerate(chunk):
            pred = words[int(res.logits[b, first[b], word_ids].argmax())]
            img = (ids[b] == model.config.image_token_id).nonzero().flatten()  # one token per 28 px cell
            cols = s.scene.cols
            # the counted objects are the sample's boxes (as in world_model.attention_supervision); anchor = the
            # top-left cell of each
            cell = world.CELL
            anchors = {int(img[(y1 // cell) * cols + x1 // cell]) for x1, y1, _, _ in s.boxes}
            cells = {int(img[r * cols + c]) for x1, y1, x2, y2 in s.boxes for r in range(y1 // cell, y2 // cell)
                     for c in range(x1 // cell, x2 // cell)}
            a = res.attentions[args.layer][b, args.head, first[b]]  # (T,)
            on_anchor = float(a[sorted(anchors)].sum())
            on_cells = float(a[sorted(cells - anchors)].sum()) if cells - anchors else 0.0
            rows.append({"n": len(s.boxes), "answer": s.answer, "prediction": pred, "correct": pred == s.answer,
                         "sink": float(a[int(img.min()) - 1]), "anchors": on_anchor, "other_cells": on_cells,
                         "other_visual": float(a[img].sum()) - on_anchor - on_cells})
    per_n = {}
    for n in sorted({r["n"] for r in rows}):
        g = [r for r in rows if r["n"] == n]
        sink = np.array([r["sink"] for r in g])
        per_n[str(n)] = {"questions": len(g), "accuracy": float(np.mean([r["correct"] for r in g])),
                         "ideal_sink": 1 / (n + 1), "sink_mean": float(sink.mean()),
                         "sink_p10_p90": [float(np.quantile(sink, 0.1)), float(np.quantile(sink, 0.9))],
                         "anchors_mean": float(np.mean([r["anchors"] for r in g])),
                         "other_cells_mean": float(np.mean([r["other_cells"] for r in g])),
                         "other_visual_mean": float(np.mean([r["other_visual"] for r in g]))}
    result = {"args": vars(args), "environment": environment(),
              "accuracy": float(np.mean([r["correct"] for r in rows])), "per_n": per_n, "rows": rows}
    out.write_text(json.dumps(result, indent=1))
    for n, v in per_n.items():
        print(f"n={n}: {v['questions']} questions, accuracy {v['accuracy']:.2f}; sink {v['sink_mean']:.2f} "
              f"(ideal {v['ideal_sink']:.2f}; 10-90 % {v['sink_p10_p90'][0]:.2f}-{v['sink_p10_p90'][1]:.2f}), "
              f"anchors {v['anchors_mean']:.2f}, other cells {v['other_cells_mean']:.2f}, "
              f"other visual {v['other_visual_mean']:.2f}")
    print(json.dumps({k: result[k] for k in ("accuracy", "per_n")}))


if __name__ == "__main__":
    main()
