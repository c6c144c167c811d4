"""``glimpseprune eval``: a world split (``--split``) or a registered benchmark (``--task``), one method and, with
``--compare-full``, the unpruned reference run; resumable, data parallel under ``accelerate launch``."""

from __future__ import annotations

import argparse
import json
import sys

from ..outputs import atomic_write_text_lines
from .common import _note, _say
from .method_args import _check_method, _load, _module_arg, _run_meta, _selection


def _environment(args) -> dict:
    """What summary.json records of the run's machine and precision (the comparison's runs record the same)."""
    from ..bench.meta import environment

    return {"dtype": args.dtype, "batch_size": args.batch_size, "environment": environment(args.device)}


# judge_cache/ is not a result: --overwrite keeps it (its answers are keyed by judge model + prompt, so reusing them
# is exact, and asking again costs the user)
EVAL_OWNED = ["samples.jsonl", "samples.rank*.jsonl", "summary.json", "errors.jsonl", "errors.rank*.jsonl",
              "summary.md", "relative.json", "full"]


def _for_method(args, method: str | None) -> argparse.Namespace:
    """``args`` for a run of ``method`` (``--compare-full``'s reference run takes none of the method's settings)."""
    kwargs = getattr(args, "method_kwargs", {}) if method == args.method else {}
    return argparse.Namespace(**{**vars(args), "method": method, "method_kwargs": kwargs})


def _eval_one(args, method: str | None, out, resume: bool) -> tuple[dict, dict]:
    """``eval --split``: (headline figures, the summary written to OUT/summary.json); here they are one dict."""
    from ..bench.accuracy import RecordError, read_rows, run
    from ..outputs import atomic_write_json, ensure_writable_dir

    args = _for_method(args, method)
    ensure_writable_dir(out)
    samples, errors = out / "samples.jsonl", out / "errors.jsonl"
    done = read_rows(samples) if resume else []
    if done:
        done = _matching_rows(done, args.split_records, args)
    if resume and done:
        _note(args, f"resuming {out}: {len(done)} samples already evaluated")
    pm, module_used = _load(args)
    meta = _run_meta(args, pm, module_used)
    # rows are written as they come (a crash or a bad record keeps what was done); resume rewrites the file whole
    # first, so a torn last line of the interrupted run is gone
    if done:
        atomic_write_text_lines(samples, done)
    skipped: list[dict] = []
    with samples.open("a" if done else "w") as f, errors.open("w") as ef:  # skipped records are retried on resume
        def on_row(row: dict) -> None:
            f.write(json.dumps(row) + "\n")
            f.flush()

        def on_skip(err) -> None:
            skipped.append({"id": err.record_id, "error": err.reason})
            ef.write(json.dumps(skipped[-1]) + "\n")
            ef.flush()

        try:
            rows, summary = run(pm, args.split, limit=args.limit, batch_size=args.batch_size, meta=meta,
                                on_row=on_row, done=done, on_error=args.on_error, on_skip=on_skip,
                                progress=False if args.quiet else f"eval [{pm.method.name}]")
        except RecordError as err:
            f.flush()
            n = len(read_rows(samples)) if samples.exists() else 0
            raise ValueError(f"{err}; stopped: {n} results so far are saved in {samples}; fix or remove the record "
                             "and rerun with --resume, or pass --on-error skip") from err
    if not errors.stat().st_size:
        errors.unlink()
    summary["skipped"] = [e["id"] for e in skipped]
    summary.update(_environment(args))
    atomic_write_json(out / "summary.json", summary)
    fam = ", ".join(f"{k} {v['exact_match']:.3f} (kept {v['kept_frac']['mean']:.3f})"
                    for k, v in summary["per_family"].items())
    kf = summary["kept_frac"]
    name = pm.method.name
    _say(args, f"[{name}] exact match {summary['exact_match']:.4f} on {summary['n']} samples; kept fraction "
         f"mean {kf['mean']:.4f} median {kf['median']:.4f} min {kf['min']:.4f} max {kf['max']:.4f}")
    _say(args, f"[{name}] per family (exact match, mean kept fraction): {fam}")
    ms = summary["ms_per_sample"]
    _say(args, f"[{name}] wall time per sample (batch {args.batch_size}, this machine): prefill "
         f"{ms['prefill']:.1f} ms (ViT + LLM), decode {ms['decode']:.1f} ms; "
         f"KV cache {summary['mean_kv_len']:.0f} tokens")
    if skipped:  # a warning: shown even with --quiet
        print(f"[{name}] skipped {len(skipped)} records that could not be evaluated: see {errors}", file=sys.stderr)
    _note(args, f"[{name}] wrote {out / 'summary.json'} and {samples}")
    return summary, summary


def _eval_task(args, method: str | None, out, resume: bool) -> tuple[dict, dict | None]:
    """``eval --task NAME --data DIR``: a registered benchmark through the generic task path. Returns (headline
    figures in the shape ``_eval_one`` gives, the summary written to OUT/summary.json; None on a non-main rank)."""
    from ..bench.accuracy import read_rows
    from ..eval.runner import markdown_row, run_task, summarize_task
    from ..eval.tasks import get_task
    from ..outputs import atomic_write_json, atomic_write_text, ensure_writable_dir

    args = _for_method(args, method)
    task = get_task(args.task)
    samples = getattr(args, "task_samples", None) or task.load(args.data, args.limit)  # read by cmd_eval
    if not samples:
        raise ValueError(f"{args.task}: no samples in {args.data}")
    judge = None
    if task.metric == "judge":
        judge = _judge(args, out)
    ensure_writable_dir(out)
    merged = out / "samples.jsonl"
    dist = _distributed()
    order = {smp.id: n for n, smp in enumerate(samples)}
    if dist is not None:  # data parallel (accelerate launch): rank r takes samples r, r + W, ...; its own file
        samples = samples[dist.process_index::dist.num_processes]
        path = out / f"samples.rank{dist.process_index}.jsonl"
    else:
        path = merged
    mine = {smp.id for smp in samples}
    done = [r for r in read_rows(merged) + (read_rows(path) if path != merged else []) if r["id"] in mine] \
        if resume else []
    if done:
        _note(args, f"resuming {out}: {len(done)} samples already evaluated")
        atomic_write_text_lines(path, done)
    pm, module_used = _load(args)
    meta = {**_run_meta(args, pm, module_used), "data": str(args.data),
            "judge_model": args.judge_model if judge is not None else None}
    errors = out / ("errors.jsonl" if dist is None else f"errors.rank{dist.process_index}.jsonl")
    skipped: list[str] = []
    with path.open("a" if done else "w") as f, errors.open("w") as ef:  # skipped samples are retried on resume
        def on_row(row: dict) -> None:
            f.write(json.dumps(row) + "\n")
            f.flush()

        def on_skip(sample_id: str, reason: str) -> None:
            skipped.append(sample_id)
            ef.write(json.dumps({"id": sample_id, "error": reason}) + "\n")
            ef.flush()

        rows = run_task(pm, task, samples, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                        on_row=on_row, done=done, judge=judge, on_error=args.on_error, on_skip=on_skip,
                        progress=False if args.quiet else
                        f"{task.name}" + (f" rank {dist.process_index}" if dist is not None else ""))
    if not skipped:
        errors.unlink()
    else:  # a warning: shown even with --quiet
        print(f"[{pm.method.name}] skipped {len(skipped)} samples that could not be evaluated: see {errors}",
              file=sys.stderr)
    if dist is not None:  # gather: the main process merges every rank's rows, in sample order, into one file
        dist.wait_for_everyone()
        if not dist.is_main_process:
            return {"method": pm.method.name, "exact_match": float("nan"), "kept_frac": {"mean": float("nan")},
                    "per_family": {}, "ms_per_sample": {}, "mean_kv_len": float("nan")}, None
        shards = [out / f"samples.rank{r}.jsonl" for r in range(dist.num_processes)]
        rows = sorted((row for sh in shards for row in read_rows(sh)), key=lambda row: order[row["id"]])
        atomic_write_text_lines(merged, rows)
        for sh in shards:
            sh.unlink()
        path = merged
    summary = summarize_task(task, rows, meta)
    summary.update(_environment(args))
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", markdown_row(summary, header=True))
    _say(args, f"[{pm.method.name}] {task.name}: {task.metric} {summary['score']:.4f} on {summary['n']} samples; "
         f"kept fraction {summary['kept_frac']:.4f}; prefill {summary['ms_per_sample']['prefill']:.1f} ms, decode "
         f"{summary['ms_per_sample']['decode']:.1f} ms per sample")
    _note(args, f"[{pm.method.name}] wrote {out / 'summary.json'}, .md and {path}")
    return {"method": pm.method.name, "exact_match": summary["score"], "kept_frac": {"mean": summary["kept_frac"]},
            "per_family": {k: {"exact_match": v.get("score", float("nan"))}
                           for k, v in summary.get("per_category", {}).items()},
            "ms_per_sample": summary["ms_per_sample"], "mean_kv_len": summary["mean_kv_len"]}, summary


def _ratio(a: float, b: float) -> float | None:
    """a / b; None when b is 0 (or not a number): a ratio against nothing is not 1e9."""
    return a / b if b and b == b else None


def _distributed():
    """accelerate's process state under a multi-process launch (``accelerate launch --num_processes N``), else
    None: one process evaluates everything."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    return PartialState()


def _judge(args, out):
    from ..rewards.judge import JudgeConfig, JudgeReward, check_judge

    if not (args.judge_url and args.judge_model):
        raise ValueError(f"task {args.task} is scored by an LLM judge: pass --judge-url and --judge-model")
    # a reply without a usable score is that answer's 0; a request that fails stops the run (its rows are not
    # written, so --resume asks again) instead of being saved as a wrong answer
    cfg = JudgeConfig(url=args.judge_url, model=args.judge_model, on_error="zero_malformed",
                      cache_dir=args.judge_cache or str(out / "judge_cache"))
    check_judge(cfg)  # a judge that refuses connections fails here, before the first sample
    return JudgeReward(config=cfg)


def cmd_eval(args) -> int:
    import dataclasses
    from pathlib import Path

    from ..outputs import atomic_write_json, claim_run_dir

    if (args.split is None) == (args.task is None):
        raise ValueError("give either --split (a records JSONL) or --task NAME --data DIR")
    if args.task is not None and args.data is None:
        raise ValueError(f"--task {args.task} needs --data DIR (the benchmark's local release folder)")
    _check_method(args)
    if args.split is not None:
        args.split_records = _check_split(args.split, args.limit)  # read once: a resume matches its rows to them
    out = Path(args.out)
    if args.task is not None:  # an unknown task or a foreign layout fails here, before the folder is claimed
        from ..eval.tasks import get_task

        args.task_samples = get_task(args.task).load(args.data, args.limit)
        if not args.task_samples:
            raise ValueError(f"{args.task}: no samples in {args.data}")
    # what decides the results; a resumed run must match them (the split's rows are matched to its records on
    # resume, see _matching_rows); for a task, the answer length too (free-form answers are cut by it)
    source = ({"split": str(Path(args.split).resolve())} if args.split else
              {"task": args.task, "data": str(Path(args.data).resolve()), "judge_model": args.judge_model,
               "max_new_tokens": args.max_new_tokens})
    settings = {**source, "limit": args.limit, "model": str(args.model),
                "module": _module_arg(args), "method": args.method, "compare_full": args.compare_full,
                "selection": dataclasses.asdict(_selection(args)), "dtype": args.dtype,
                "method_args": args.method_kwargs or None}  # None: as recorded by runs before --method-arg
    dist = _distributed() if args.task else None
    if dist is None or dist.is_main_process:
        claim_run_dir(out, "eval", settings, EVAL_OWNED, resume=args.resume, overwrite=args.overwrite)
    if dist is not None:
        dist.wait_for_everyone()
        if args.compare_full:
            raise ValueError("--compare-full is not supported under a multi-process launch; run the two separately")
    one = _eval_one if args.split else _eval_task
    main, result = one(args, args.method, out, args.resume)
    if args.compare_full and main["method"] != "full":
        full, full_summary = one(args, "full", out / "full", args.resume)
        ratio = _ratio(main["exact_match"], full["exact_match"])  # None where full scores 0: no ratio exists
        per = {f: _ratio(main["per_family"][f]["exact_match"], v["exact_match"])
               for f, v in full["per_family"].items() if f in main["per_family"]}
        report = {"method": main["method"], "exact_match": main["exact_match"],
                  "full_exact_match": full["exact_match"], "relative_accuracy": ratio,
                  "mean_kept_frac": main["kept_frac"]["mean"], "relative_accuracy_per_family": per,
                  "ms_per_sample": {"pruned": main["ms_per_sample"], "full": full["ms_per_sample"]},
                  "mean_kv_len": {"pruned": main["mean_kv_len"], "full": full["mean_kv_len"]}}
        atomic_write_json(out / "relative.json", report)
        result = {**result, "full": full_summary, "relative": report}
        kept = "an undefined share (full scores 0)" if ratio is None else f"{100 * ratio:.1f} %"
        _say(args, f"{main['method']} keeps {kept} of the full-token accuracy "
              f"({main['exact_match']:.4f} vs {full['exact_match']:.4f}) with {100 * main['kept_frac']['mean']:.1f} % "
              f"of the visual tokens on average; wrote {out / 'relative.json'}")
        pm_, fm = main["ms_per_sample"], full["ms_per_sample"]
        _say(args, f"wall time per sample, {main['method']} vs full: prefill {pm_['prefill']:.1f} vs "
              f"{fm['prefill']:.1f} ms ({pm_['prefill'] / max(fm['prefill'], 1e-9):.2f}x), "
              f"decode {pm_['decode']:.1f} vs {fm['decode']:.1f} ms "
              f"({pm_['decode'] / max(fm['decode'], 1e-9):.2f}x); KV cache {main['mean_kv_len']:.0f} vs "
              f"{full['mean_kv_len']:.0f} tokens (timed once, in this run, on this machine)")
    if args.json and result is not None:  # None: a non-main process of a multi-process launch
        print(json.dumps(result, default=str))
    return 0


def _matching_rows(done: list[dict], split_records: list, args) -> list[dict]:
    """The saved rows of a resumed ``eval --split`` that belong to the split as it is now (``split_records``, as
    ``_check_split`` read them): a row whose record is gone is dropped (noted); one whose record now asks another
    question or expects another answer means the file was replaced under the run, which is refused rather than mixed
    into one summary."""
    split = args.split
    records = {r.id: r for r in split_records}
    changed = [row["id"] for row in done if row["id"] in records and
               (row.get("question"), row.get("answer")) != (records[row["id"]].question, records[row["id"]].answer)]
    if changed:
        raise ValueError(f"cannot resume: {len(changed)} saved results no longer match the records of {split} with "
                         f"their ids (e.g. {changed[0]!r}: another question or answer); the split was replaced "
                         "since that run: pass --overwrite to start again")
    kept = [row for row in done if row["id"] in records]
    if len(kept) < len(done):
        _note(args, f"{len(done) - len(kept)} saved results belong to records no longer in {split}: left out")
    return kept


def _check_split(path: str, limit: int | None) -> list:
    """Before the model loads: --split is a readable records JSONL holding at least one record; returns them."""
    from pathlib import Path

    from ..data.records import read_records

    p = Path(path)
    if not p.exists():
        raise ValueError(f"--split {path}: no such file")
    if p.is_dir():
        hint = f" (e.g. {p / 'records.jsonl'})" if (p / "records.jsonl").is_file() else ""
        raise ValueError(f"--split {path} is a folder: pass the records JSONL file in it{hint}")
    try:
        records = read_records(p, limit)
    except UnicodeDecodeError as err:
        raise ValueError(f"--split {path}: not a UTF-8 text file ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise ValueError(f"--split {path}: cannot read it ({err.strerror or err})") from None
    except ValueError as err:
        raise ValueError(f"--split {err}") from None
    if not records:
        raise ValueError(f"--split {path} holds no records (an empty file)")
    return records
