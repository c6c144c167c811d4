"""Video masks against the ground truth, on the embedded default and the video world.

For every clip: the oracle (keep exactly the tokens of the question's evidence boxes, in the frames where they are
visible, dropped after the module's layer K through the ``mask`` method), and GlimpsePrune's own masks measured
against those evidence tokens: recall (evidence tokens kept), the share of the kept tokens that lie in the evidence's
moment (frame pair), and the kept fraction. The world's canvases are whole multiples of 28 px, so one visual token
is one cell of each frame pair and the boxes map onto tokens exactly.

    python benchmarks/world_video_oracle.py --data runs/world_video_split --out results/world_video/oracle.json

The last stdout line is the JSON summary.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

import glimpseprune as gp
from glimpseprune.data.world import CELL
from glimpseprune.data.world_video import TEMPORAL_PATCH, read_video_records
from glimpseprune.eval.metrics import exact_match
from glimpseprune.outputs import atomic_write_text, check_writable_file
from glimpseprune.processing import load_image
from glimpseprune.video import Video


def evidence_grid(rec, shape) -> torch.Tensor:
    """(t, h, w) bool: the cells of the evidence boxes, in the frame pair(s) where they are visible."""
    t, h, w = shape
    out = torch.zeros(t, h, w, dtype=torch.bool)
    for f, boxes in enumerate(rec.frame_boxes):
        for x1, y1, x2, y2 in boxes:
            out[f // TEMPORAL_PATCH, y1 // CELL:(y2 + CELL - 1) // CELL, x1 // CELL:(x2 + CELL - 1) // CELL] = True
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="a video-world folder (glimpseprune make-world --video)")
    ap.add_argument("--out", required=True, help="result JSON")
    ap.add_argument("--limit", type=int, help="first N clips")
    args = ap.parse_args()
    check_writable_file(args.out)
    split = Path(args.data) / "video_records.jsonl"
    recs = read_video_records(split, args.limit)
    pm = gp.load("embedded", module="embedded")
    K = pm.method.module.cfg.prune_layer
    oracle = gp.apply(pm.model, "mask", prune_layer=K, processor=pm.processor)
    rows = []
    for rec in recs:
        clip = Video([load_image(p) for p in rec.frame_paths(split.parent)], fps=rec.fps)
        g = pm.generate(videos=[clip], images=[[]], questions=[rec.question], max_new_tokens=8)
        kept = g.video_keep_masks[0].cpu()
        if tuple(kept.shape[1:]) != (rec.height // CELL, rec.width // CELL):
            raise SystemExit(f"{rec.id}: token grid {tuple(kept.shape)} is not the world's cell grid")
        ev = evidence_grid(rec, tuple(kept.shape))
        o = oracle.generate(videos=[clip], images=[[]], questions=[rec.question], max_new_tokens=8,
                            keep_masks=[ev.flatten()])
        rows.append({  # exact match as `eval --task world_video` scores it (the eval metrics' normalisation)
            "id": rec.id, "family": rec.family, "answer": rec.answer,
            "glimpse_correct": bool(exact_match(g.texts[0].strip(), rec.answer)),
            "oracle_correct": bool(exact_match(o.texts[0].strip(), rec.answer)),
            "n_vis": int(kept.numel()), "glimpse_kept": int(kept.sum()), "evidence": int(ev.sum()),
            "recall": float((kept & ev).sum() / max(int(ev.sum()), 1)),
            "in_moment": float(kept[rec.moment].sum() / max(int(kept.sum()), 1)),
        })
    mean = lambda k, sel=rows: statistics.fmean(float(r[k]) for r in sel)  # noqa: E731
    fams = sorted({r["family"] for r in rows})
    summary = {
        "n": len(rows), "split": str(split), "prune_layer": K,
        "glimpse_exact_match": mean("glimpse_correct"), "oracle_exact_match": mean("oracle_correct"),
        "glimpse_kept_frac": statistics.fmean(r["glimpse_kept"] / r["n_vis"] for r in rows),
        "oracle_kept_frac": statistics.fmean(r["evidence"] / r["n_vis"] for r in rows),
        "glimpse_recall_of_evidence": mean("recall"),
        "glimpse_kept_share_in_evidence_moment": mean("in_moment"),
        "per_family": {f: {"glimpse": mean("glimpse_correct", sel), "oracle": mean("oracle_correct", sel),
                           "recall": mean("recall", sel), "in_moment": mean("in_moment", sel)}
                       for f in fams for sel in [[r for r in rows if r["family"] == f]]},
        "rows": rows,
    }
    atomic_write_text(args.out, json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("rows", "per_family")}))


if __name__ == "__main__":
    main()
