"""Exact-match accuracy under pruning on a JSONL split, with the kept fraction of every sample.

``evaluate`` returns per-sample rows and a summary with a fixed schema (see ``summarize``); ``glimpseprune eval``
writes them as ``samples.jsonl`` and ``summary.json``.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from ..data.records import Record, read_records
from ..processing import load_image

SUMMARY_VERSION = 1


def normalize(text: str) -> str:
    """Lower case, surrounding space and a final full stop removed."""
    return text.strip().lower().rstrip(".").strip()


def evaluate(pm, records: list[Record], root: Path, batch_size: int = 8, max_new_tokens: int = 8) -> list[dict]:
    """Greedy answers for ``records`` (images under ``root``) with ``pm`` (a PrunedModel); one row per record."""
    rows = []
    for i in range(0, len(records), batch_size):
        chunk = records[i:i + batch_size]
        images = [[load_image(r.image_path(root))] for r in chunk]
        out = pm.generate(images=images, questions=[r.question for r in chunk], max_new_tokens=max_new_tokens)
        per_sample = {k: 1000.0 * out.timing[k] / len(chunk) for k in ("prefill", "decode")}
        for b, r in enumerate(chunk):
            pred = out.texts[b]
            rows.append({"id": r.id, "family": r.family, "question": r.question, "answer": r.answer,
                         "prediction": pred.strip(), "correct": normalize(pred) == normalize(r.answer),
                         "n_vis": out.n_vis[b], "n_kept": out.n_kept[b],
                         "kept_frac": out.n_kept[b] / max(out.n_vis[b], 1), "kv_len": out.kv_len[b],
                         # the batch's wall time shared equally by its samples
                         "prefill_ms": per_sample["prefill"], "decode_ms": per_sample["decode"],
                         "decode_steps": out.timing["decode_steps"]})
    return rows


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": float("nan"), "median": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"mean": statistics.fmean(values), "median": statistics.median(values), "min": min(values),
            "max": max(values)}


def summarize(rows: list[dict], meta: dict) -> dict:
    """Exact match overall and per family; kept-fraction statistics overall and per family."""
    families = sorted({r["family"] for r in rows})
    per = {}
    for f in families:
        sel = [r for r in rows if r["family"] == f]
        per[f] = {"n": len(sel), "exact_match": sum(r["correct"] for r in sel) / len(sel),
                  "kept_frac": _stats([r["kept_frac"] for r in sel])}
    return {
        "version": SUMMARY_VERSION, **meta, "n": len(rows),
        "exact_match": sum(r["correct"] for r in rows) / max(len(rows), 1),
        "kept_frac": _stats([r["kept_frac"] for r in rows]),
        "mean_n_vis": statistics.fmean(r["n_vis"] for r in rows) if rows else float("nan"),
        "mean_n_kept": statistics.fmean(r["n_kept"] for r in rows) if rows else float("nan"),
        "mean_kv_len": statistics.fmean(r["kv_len"] for r in rows) if rows else float("nan"),
        "ms_per_sample": {k: statistics.fmean(r[f"{k}_ms"] for r in rows) if rows else float("nan")
                          for k in ("prefill", "decode")},
        "per_family": per,
    }


def run(pm, split: str | Path, limit: int | None = None, batch_size: int = 8, meta: dict | None = None):
    """Evaluate a JSONL split; returns (rows, summary)."""
    split = Path(split)
    records = read_records(split, limit)
    if records:  # one untimed batch first: lazy initialisation would otherwise be charged to the first run's times
        evaluate(pm, records[:batch_size], split.parent, batch_size)
    t0 = time.time()
    rows = evaluate(pm, records, split.parent, batch_size)
    summary = summarize(rows, {**(meta or {}), "split": str(split), "seconds": round(time.time() - t0, 2)})
    return rows, summary
