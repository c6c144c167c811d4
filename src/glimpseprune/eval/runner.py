"""Run a registered benchmark task through a ``PrunedModel``: answers, per-sample scores, and the task's summary.

``run_task`` generates in batches (length-sorted: samples with similar prompts share a batch), hands each row to
``on_row`` as soon as its batch is done (``glimpseprune eval --task`` writes it to ``samples.jsonl``), skips the ids
in ``done`` (``--resume``), and scores with the task's metric (``eval/metrics.py``); free-form tasks are scored by an
LLM judge (``rewards.judge``: cached on disk, so a resumed run asks nothing twice). ``summarize_task`` gives the
task's headline number and its per-category breakdown (POPE's F1 and yes-ratio per split, MME's perception /
cognition scores with acc+, Visual-CoT per subset).
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable

from . import metrics

logger = logging.getLogger(__name__)


def _choices(meta: dict) -> list[str] | None:
    c = meta.get("choices")
    if isinstance(c, dict):
        return [c[k] for k in sorted(c)]
    return list(c) if c else None


def score(task, sample, pred: str) -> float | None:
    """The per-sample score of ``pred`` under the task's metric; None for the judge (scored in batches) and for a
    sample without reference answers (a test split, e.g. MMBench's: its predictions are kept for the server)."""
    m, refs = task.metric, sample.answers
    if not refs:
        return None
    if m == "vqa_accuracy":
        return metrics.vqa_accuracy(pred, refs)
    if m == "anls":
        return metrics.anls(pred, refs)
    if m == "relaxed_accuracy":
        return max(metrics.relaxed_accuracy(pred, a) for a in refs)
    if m == "exact_match":
        return max(metrics.exact_match(pred, a) for a in refs)
    if m == "choice":
        return metrics.choice_accuracy(pred, refs[0], _choices(sample.meta))
    if m == "pope":
        return float(metrics.pope_answer(pred) == refs[0].strip().lower())
    if m == "mme":
        return float(metrics.mme_answer(pred) == refs[0].strip().lower())
    if m == "judge":
        return None
    raise ValueError(f"task {task.name}: unknown metric {m!r}")


def run_task(pm, task, samples: list, batch_size: int = 8, max_new_tokens: int = 32,
             on_row: Callable[[dict], None] | None = None, done: list[dict] | None = None, judge=None,
             on_error: str = "stop", on_skip: Callable[[str, str], None] | None = None,
             progress: bool | str = False) -> list[dict]:
    """Rows for ``samples`` not in ``done`` (by id), in length-sorted batches; returns ``done`` + the new rows.

    A sample the model refuses (its prompt too long, an unreadable image) stops the run naming it (the rows before it
    are already handed to ``on_row``) or, with ``on_error="skip"``, is logged and given to ``on_skip(id, reason)``.
    ``progress``: a progress bar on stderr (samples done / all, rate, ETA; a string is its label), counting the
    resumed rows as done. Each row also carries the layer accounting of ``compare``: ``entering`` (visual tokens
    fed to the first LLM layer) and ``equivalent`` (visual tokens averaged over the LLM layers)."""
    from tqdm.auto import tqdm

    if task.metric == "judge" and judge is None:
        raise ValueError(f"task {task.name} is scored by an LLM judge: pass --judge-url and --judge-model")
    seen = {r["id"] for r in (done or [])}
    todo = sorted((s for s in samples if s.id not in seen),
                  key=lambda s: (len(s.video), len(s.image_paths), len(s.prompt)))
    rows = list(done or [])
    n_layers = len(pm.adapter.layers(pm.model))
    with tqdm(total=len(rows) + len(todo), initial=len(rows), unit="sample", dynamic_ncols=True,
              desc=progress if isinstance(progress, str) else task.name, disable=not progress) as bar:
        for i in range(0, len(todo), batch_size):
            _batch(pm, task, todo[i:i + batch_size], rows, n_layers, max_new_tokens, on_row, judge, on_error,
                   on_skip)
            bar.update(min(batch_size, len(todo) - i))
    return rows


def _batch(pm, task, chunk, rows, n_layers, max_new_tokens, on_row, judge, on_error, on_skip) -> None:
    """Generate, score and hand on one batch of samples (appended to ``rows``)."""
    from ..bench.compare import layer_counts
    from ..processing import load_image
    from ..rewards import RewardInput

    try:
        images = [[load_image(p) for p in s.image_paths] for s in chunk]
        kw = {}
        if any(s.video for s in chunk):  # frame files, sampled at the record's fps
            from ..video import Video

            kw["videos"] = [Video([load_image(p) for p in s.video], fps=float(s.meta.get("fps", 2.0)),
                                  source=str(s.video[0].parent)) if s.video else None for s in chunk]
        out = pm.generate(images=images, questions=[s.prompt for s in chunk], max_new_tokens=max_new_tokens, **kw)
    except ValueError as err:
        if len(chunk) > 1:  # find the sample(s) at fault: the others are evaluated, one at a time
            for s in chunk:
                _batch(pm, task, [s], rows, n_layers, max_new_tokens, on_row, judge, on_error, on_skip)
            return
        if on_error != "skip":
            raise ValueError(f"{task.name}: sample {chunk[0].id}: {err}") from err
        logger.error("skipped %s: %s", chunk[0].id, err)
        if on_skip is not None:
            on_skip(chunk[0].id, str(err))
        return
    per = {k: 1000.0 * out.timing[k] / len(chunk) for k in ("prefill", "decode")}
    new = []
    pre = out.prefill
    for b, s in enumerate(chunk):
        pred = out.texts[b].strip()
        counts = layer_counts(out.n_vis[b], pre.prune_layers, [k[b] for k in pre.stage_kept], n_layers)
        new.append({"id": s.id, "prediction": pred, "answers": s.answers, "score": score(task, s, pred),
                    "meta": {k: v for k, v in s.meta.items() if isinstance(v, (str, int, float, bool))},
                    "n_vis": out.n_vis[b], "n_kept": out.n_kept[b],
                    "kept_frac": out.n_kept[b] / max(out.n_vis[b], 1), "kv_len": out.kv_len[b],
                    "entering": counts[0], "equivalent": statistics.fmean(counts),
                    "prefill_ms": per["prefill"], "decode_ms": per["decode"]})
    graded = [(s, r) for s, r in zip(chunk, new, strict=True) if s.answers]  # no reference: nothing to grade
    if judge is not None and graded:
        marks = judge([RewardInput(question=s.question, answer=s.answers[0], completion=r["prediction"])
                       for s, r in graded])
        for (_, r), m in zip(graded, marks, strict=True):
            r["score"] = float(m)
    for r in new:
        rows.append(r)
        if on_row is not None:
            on_row(r)


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def summarize_task(task, rows: list[dict], meta: dict | None = None) -> dict:
    """The task's headline score (``score``: the mean per-sample score, or the task's own aggregate) and
    breakdowns, with kept-token and timing statistics."""
    scores = [r["score"] for r in rows if r.get("score") is not None]
    out: dict = {**(meta or {}), "task": task.name, "metric": task.metric, "n": len(rows), "n_scored": len(scores),
                 "score": _mean(scores),
                 "kept_frac": _mean([r["kept_frac"] for r in rows]), "mean_kv_len": _mean([r["kv_len"] for r in rows]),
                 "ms_per_sample": {k: _mean([r[f"{k}_ms"] for r in rows]) for k in ("prefill", "decode")}}
    groups: dict[str, list[dict]] = {}
    for r in rows:
        key = r["meta"].get("subset") or r["meta"].get("category") or r["meta"].get("type")  # type: ChartQA's split
        if key:
            groups.setdefault(str(key), []).append(r)
    if task.metric == "pope":
        out["per_category"] = {k: metrics.pope_scores([r["prediction"] for r in g], [r["answers"][0] for r in g])
                               for k, g in groups.items()}
        out["score"] = _mean([v["f1"] for v in out["per_category"].values()])  # POPE reports F1 (mean over splits)
    elif task.metric == "mme":
        mme = metrics.mme_scores([{"subtask": r["meta"]["category"], "image": r["meta"]["image_id"],
                                   "pred": r["prediction"], "answer": r["answers"][0]} for r in rows])
        out["mme"] = mme
        out["score"] = mme["total"]
    elif groups:
        out["per_category"] = {k: {"n": len(g), "score": _mean([r["score"] for r in g if r["score"] is not None])}
                               for k, g in sorted(groups.items())}
    return out


ROW_FIELDS = ("task", "method", "model", "module", "metric", "score", "n", "kept %", "KV at decode", "prefill ms",
              "decode ms", "judge")


def markdown_row(summary: dict, header: bool = False) -> str:
    """One markdown table row for a ``summarize_task`` summary (``header``: with the table's header lines first), so
    the rows of several runs paste into one table."""
    ms = summary.get("ms_per_sample", {})
    cells = [summary.get("task"), summary.get("method"), summary.get("model"), summary.get("module") or "-",
             summary.get("metric"), f"{summary['score']:.4f}", summary["n"], f"{100 * summary['kept_frac']:.1f}",
             f"{summary['mean_kv_len']:.1f}", f"{ms.get('prefill', float('nan')):.1f}",
             f"{ms.get('decode', float('nan')):.1f}", summary.get("judge_model") or "-"]
    row = "| " + " | ".join(str(c) for c in cells) + " |\n"
    if not header:
        return row
    return "| " + " | ".join(ROW_FIELDS) + " |\n|" + "---|" * len(ROW_FIELDS) + "\n" + row
