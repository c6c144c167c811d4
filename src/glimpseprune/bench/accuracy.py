"""Exact-match accuracy under pruning on a JSONL split, with the kept fraction of every sample.

``evaluate`` returns per-sample rows and a summary with a fixed schema (see ``summarize``); ``glimpseprune eval``
writes them as ``samples.jsonl`` and ``summary.json``.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from ..data.records import Record, read_records
from ..processing import load_image

SUMMARY_VERSION = 1
logger = logging.getLogger(__name__)


def normalize(text: str) -> str:
    """Lower case, surrounding space and a final full stop removed."""
    return text.strip().lower().rstrip(".").strip()


class RecordError(ValueError):
    """A record that cannot be evaluated (unreadable image, invalid question): names the record."""

    def __init__(self, record: Record, message: str):
        super().__init__(f"record {record.id} ({record.image}): {message}")
        self.record_id, self.reason = record.id, message


ON_ERROR = ("stop", "skip")


def _row(r: Record, out, b: int, per_sample: dict) -> dict:
    pred = out.texts[b]
    return {"id": r.id, "family": r.family, "question": r.question, "answer": r.answer,
            "prediction": pred.strip(), "correct": normalize(pred) == normalize(r.answer),
            "n_vis": out.n_vis[b], "n_kept": out.n_kept[b],
            "kept_frac": out.n_kept[b] / max(out.n_vis[b], 1), "kv_len": out.kv_len[b],
            # the batch's wall time shared equally by its samples
            "prefill_ms": per_sample["prefill"], "decode_ms": per_sample["decode"],
            "decode_steps": out.timing["decode_steps"]}


def _generate_rows(pm, chunk: list[Record], images: list, max_new_tokens: int) -> list[dict]:
    out = pm.generate(images=images, questions=[r.question for r in chunk], max_new_tokens=max_new_tokens)
    per_sample = {k: 1000.0 * out.timing[k] / len(chunk) for k in ("prefill", "decode")}
    return [_row(r, out, b, per_sample) for b, r in enumerate(chunk)]


def evaluate(pm, records: list[Record], root: Path, batch_size: int = 8, max_new_tokens: int = 8,
             on_row: Callable[[dict], None] | None = None, on_error: str = "stop",
             on_skip: Callable[[RecordError], None] | None = None, progress: bool | str = False) -> list[dict]:
    """Greedy answers for ``records`` (images under ``root``) with ``pm`` (a PrunedModel); one row per record.
    ``progress``: a progress bar on stderr (records done / all, rate, ETA; a string is its label).

    ``on_row`` gets each row as soon as its batch is done (to write it). A record that cannot be evaluated (its
    image unreadable, its question refused by the processor) raises ``RecordError`` naming it (``on_error="stop"``;
    the rows before it have been handed to ``on_row``), or with ``"skip"`` is logged, given to ``on_skip`` and left
    out. A batch the processor refuses is retried one record at a time to find the bad one.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    rows: list[dict] = []

    def bad(err: RecordError) -> None:
        if on_error == "stop":
            raise err
        logger.error("skipped %s", err)
        if on_skip is not None:
            on_skip(err)

    def emit(new: list[dict]) -> None:
        for row in new:
            rows.append(row)
            if on_row is not None:
                on_row(row)

    with tqdm(total=len(records), unit="sample", dynamic_ncols=True, disable=not progress,
              desc=progress if isinstance(progress, str) else "eval") as bar:
        for i in range(0, len(records), batch_size):
            _evaluate_batch(pm, records[i:i + batch_size], root, max_new_tokens, emit, bad)
            bar.update(min(batch_size, len(records) - i))
    return rows


def _evaluate_batch(pm, batch: list[Record], root: Path, max_new_tokens: int, emit, bad) -> None:
    chunk, images, failed = [], [], []
    for r in batch:
        try:
            images.append([load_image(r.image_path(root))])
            chunk.append(r)
        except ValueError as err:
            failed.append(RecordError(r, str(err)))
    try:
        if chunk:
            emit(_generate_rows(pm, chunk, images, max_new_tokens))
    except ValueError:
        for r, ims in zip(chunk, images, strict=True):  # find the record the batch failed on
            try:
                emit(_generate_rows(pm, [r], [ims], max_new_tokens))
            except ValueError as one:
                failed.append(RecordError(r, str(one)))
    for err in failed:  # after the batch's good records are done (and handed to on_row)
        bad(err)


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
        # no rows (every record skipped): not a measured 0 % but no figure, as for the statistics below
        "exact_match": sum(r["correct"] for r in rows) / len(rows) if rows else float("nan"),
        "kept_frac": _stats([r["kept_frac"] for r in rows]),
        "mean_n_vis": statistics.fmean(r["n_vis"] for r in rows) if rows else float("nan"),
        "mean_n_kept": statistics.fmean(r["n_kept"] for r in rows) if rows else float("nan"),
        "mean_kv_len": statistics.fmean(r["kv_len"] for r in rows) if rows else float("nan"),
        "ms_per_sample": {k: statistics.fmean(r[f"{k}_ms"] for r in rows) if rows else float("nan")
                          for k in ("prefill", "decode")},
        "per_family": per,
    }


def run(pm, split: str | Path, limit: int | None = None, batch_size: int = 8, meta: dict | None = None,
        on_row: Callable[[dict], None] | None = None, done: list[dict] | None = None, on_error: str = "stop",
        on_skip: Callable[[RecordError], None] | None = None, progress: bool | str = False):
    """Evaluate a JSONL split; returns (rows, summary). ``done``: rows of an earlier, interrupted run of the same
    settings (``--resume``): their records are not run again and the summary covers both."""
    split = Path(split)
    records = read_records(split, limit)
    if not records:
        raise ValueError(f"split {split} holds no records")
    done = list(done or [])
    seen = {r["id"] for r in done}
    todo = [r for r in records if r.id not in seen]
    if todo:  # one untimed batch first: lazy initialisation would otherwise be charged to the first run's times
        try:
            evaluate(pm, todo[:batch_size], split.parent, batch_size)
        except RecordError:
            pass  # reported by the timed run below
    t0 = time.time()
    rows = done + evaluate(pm, todo, split.parent, batch_size, on_row=on_row, on_error=on_error, on_skip=on_skip,
                           progress=progress)
    summary = summarize(rows, {**(meta or {}), "split": str(split), "seconds": round(time.time() - t0, 2)})
    return rows, summary


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a ``samples.jsonl`` written by an earlier run; a torn last line (a crash mid-write) is dropped."""
    p = Path(path)
    if not p.is_file():
        return []
    rows = []
    lines = p.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if n == len(lines):
                logger.warning("%s: dropping a torn last line (the earlier run stopped while writing it)", p)
                break
            raise ValueError(f"{p}:{n}: not JSON ({err})") from err
        if not isinstance(row, dict) or "id" not in row:
            raise ValueError(f"{p}:{n}: not a result row of this run (a JSON object with an 'id'), got {line:.60}; "
                             "pass --overwrite to start again")
        rows.append(row)
    return rows
