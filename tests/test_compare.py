"""``glimpseprune compare``: the run plan, the token accounting on hand-computed schedules, matched budgets of
multi-stage methods, and an end-to-end comparison on the tiny model (JSON schema, table, plot)."""

from __future__ import annotations

import json
import math

import pytest
import torch

import glimpseprune as gp
from glimpseprune.bench.compare import Comparison, budget_kwargs, compare, layer_counts, markdown, plan
from glimpseprune.data.records import write_split
from glimpseprune.methods.common import ratio_count


def test_plan_has_full_budgets_and_dynamic_settings():
    runs = plan(["random", "glimpse", "oracle"], [0.1, 0.5], cap=0.2)
    labels = [r.label for r in runs]
    assert labels[0] == "full"
    assert [r.budget for r in runs if r.method == "random"] == [0.1, 0.5]
    glimpse = {r.setting: r for r in runs if r.method == "glimpse"}
    assert glimpse["dynamic"].selection == {}
    assert glimpse["dynamic_cap"].selection == {"max_keep_ratio": 0.2}
    assert glimpse["fixed"].selection["fixed_keep_ratio"] in (0.1, 0.5)
    assert sum(r.method == "oracle" for r in runs) == 1


@pytest.mark.parametrize("methods,budgets,match", [
    (["nope"], [0.1], "unknown method"),
    (["mask"], [0.1], "caller-supplied masks"),
    (["random"], [0.0], "not a kept fraction"),
    (["random"], [1.5], "not a kept fraction"),
    (["early_glimpse"], [0.1], "glimpseprune eval --module DIR --method early_glimpse"),
    (["fastv", "fastv"], [0.1], "--methods names fastv more than once"),
    (["fastv"], [0.2, 0.2], "--budgets names 0.2 more than once"),
])
def test_plan_rejects_bad_input(methods, budgets, match):
    with pytest.raises(ValueError, match=match):
        plan(methods, budgets)


@pytest.mark.parametrize("benchmark_task", [False, True])
def test_the_default_methods_can_all_be_planned(benchmark_task):
    """`compare` without --methods: every default method plans (early_glimpse in the default list made every
    default comparison fail before it started)."""
    from glimpseprune.cli.compare import default_methods

    methods = default_methods(benchmark_task)
    assert "glimpse" in methods and "fastv" in methods and "early_glimpse" not in methods and "mask" not in methods
    assert ("oracle" in methods) is not benchmark_task
    assert len(plan(methods, [0.1, 0.2])) > len(methods)


def test_layer_counts_hand_computed():
    # 8 layers, 100 visual tokens
    assert layer_counts(100, (), [], 8) == [100] * 8  # full
    assert layer_counts(100, (-1,), [10], 8) == [10] * 8  # before the LLM
    assert layer_counts(100, (2,), [10], 8) == [100, 100, 100] + [10] * 5  # after layer 2
    # three stages (pdrop-like): 50 after layer 1, 25 after layer 3, 12 after layer 5
    assert layer_counts(100, (1, 3, 5), [50, 25, 12], 8) == [100, 100, 50, 50, 25, 25, 12, 12]
    assert sum(layer_counts(100, (1, 3, 5), [50, 25, 12], 8)) / 8 == pytest.approx(374 / 8)


@pytest.mark.parametrize("fraction", [0.056, 0.111, 0.222, 0.333])
def test_pdrop_budget_kwargs_end_at_the_budget(fraction):
    kw = budget_kwargs("pdrop", fraction)
    method = gp.make_method("pdrop", **kw)
    for n in (64, 144, 256, 2025):
        assert method.budget(n) == ratio_count(n, fraction)
        counts = [method.stage_count(n, s) for s in range(3)]
        assert counts == sorted(counts, reverse=True)  # a pyramid: each stage keeps no more than the one before
    assert budget_kwargs("random", fraction) == {"keep_ratio": fraction}
    assert math.isclose(kw["keep_ratio"] * kw["lam"] ** 2, fraction, rel_tol=1e-12)


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return write_split(tmp_path_factory.mktemp("cmp-world"), 5, seed=3)


def test_compare_end_to_end(model, processor, module, split, tmp_path):
    methods = ["random", "fastv", "glimpse", "oracle"]
    lines = []
    results = compare(model, processor, module, split, tmp_path, methods, [0.25], cap=0.2, batch_size=3,
                      meta={"model": "tiny"}, log=lines.append)
    labels = [r["label"] for r in results]
    assert labels == ["full", "random@0.25", "fastv@0.25", "glimpse@0.25", "glimpse (dynamic)",
                      "glimpse (dynamic, cap 0.2)", "oracle (box tokens)"]
    files = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(files) == len(results)
    full = json.loads((tmp_path / "runs" / "full.json").read_text())
    for key in ("version", "label", "method", "setting", "budget", "config", "n", "n_layers", "prune_layers",
                "exact_match", "kept_frac", "accounting", "per_family", "environment", "model"):
        assert key in full
    n_layers = full["n_layers"]
    by = {r["label"]: r for r in results}
    acc = {k: r["accounting"] for k, r in by.items()}
    # full keeps all; its equivalent tokens are every visual token
    assert by["full"]["kept_frac"]["min"] == 1.0
    assert acc["full"]["equivalent_visual_tokens"] == pytest.approx(acc["full"]["mean_n_vis"])
    # matched budgets: random (before the LLM) and fastv / glimpse (inside) keep the same count at decode ...
    for k in ("random@0.25", "fastv@0.25", "glimpse@0.25"):
        assert acc[k]["visual_kv_at_decode"] == pytest.approx(acc["random@0.25"]["visual_kv_at_decode"])
        assert acc[k]["kv_entries_at_decode"] < acc["full"]["kv_entries_at_decode"]
    # ... but differ in what enters the LLM and in layer-averaged tokens
    assert acc["random@0.25"]["visual_tokens_entering_llm"] == pytest.approx(acc["random@0.25"]["visual_kv_at_decode"])
    assert acc["fastv@0.25"]["visual_tokens_entering_llm"] == pytest.approx(acc["full"]["mean_n_vis"])
    K = by["glimpse@0.25"]["prune_layers"][0]
    n_vis, kept = acc["full"]["mean_n_vis"], acc["glimpse@0.25"]["visual_kv_at_decode"]
    assert acc["glimpse@0.25"]["equivalent_visual_tokens"] == pytest.approx(
        ((K + 1) * n_vis + (n_layers - K - 1) * kept) / n_layers)
    assert by["glimpse (dynamic, cap 0.2)"]["kept_frac"]["max"] <= 0.2 + 1e-9
    md = (tmp_path / "compare.md").read_text()
    assert "| random | 0." in md and "glimpse (dynamic)" in md
    assert markdown(results) == md
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "compare.png").stat().st_size > 1000


def test_oracle_keeps_exactly_the_box_tokens(model, processor, module, split):
    cmp = Comparison(model, processor, module, split, batch_size=5)
    rows, summary = cmp.run(plan(["oracle"], [0.5])[1])
    (records, _, masks), = cmp.batches
    assert [r["n_kept"] for r in rows] == [int(m.sum()) for m in masks]
    # by hand: world objects sit on whole 28-px cells, one visual token each, so the box tokens are the cells each
    # box covers (a check over boxless records, the loop that stood here, never ran: every world record has boxes)
    assert records and all(rec.bboxs for rec in records)
    for rec, mask in zip(records, masks):
        want = torch.zeros(rec.height // 28, rec.width // 28, dtype=torch.bool)
        for x0, y0, x1, y1 in rec.bboxs:
            want[int(y0) // 28:math.ceil(y1 / 28), int(x0) // 28:math.ceil(x1 / 28)] = True
        assert torch.equal(torch.as_tensor(mask).reshape(want.shape), want), rec.id


def test_k_sweep_rows_and_consistency(model, processor, module, split, tmp_path):
    from glimpseprune.bench.compare import k_sweep

    res = k_sweep(model, processor, module, split, tmp_path, batch_size=5, log=lambda *_: None)
    L = res["n_layers"]
    assert [r["K"] for r in res["rows"]] == list(range(-1, L))
    assert res["rows"][0]["fastv_topk"] is None and all(r["fastv_topk"] is not None for r in res["rows"][1:])
    # GlimpsePrune's own masks dropped at its own K reproduce its dynamic run (the glimpse token is causal and gone
    # after K, so nothing else differs)
    own = next(r for r in res["rows"] if r["K"] == res["module_prune_layer"])
    assert own["glimpse_masks"] == pytest.approx(res["glimpse_dynamic_exact_match"])
    ratios = [r["prefill_ratio_analytic"] for r in res["rows"]]
    assert ratios == sorted(ratios) and all(0 < x <= 1 + 1e-9 for x in ratios)
    assert {"k_sweep.json", "k_sweep.md"} <= {p.name for p in tmp_path.iterdir()}


# mutation audit: rules a one-line change could break unnoticed

def test_plan_budgets_per_method():
    """A budget of 1.0 (keep everything) is a kept fraction; the capped dynamic run's budget is the cap; a method
    with a ``budget_kwargs`` hook (pdrop: three stages) is planned with it, not with keep_ratio = budget."""
    runs = plan(["pdrop", "glimpse"], [0.111, 1.0], cap=0.2)
    assert [r.budget for r in runs if r.method == "pdrop"] == [0.111, 1.0]
    pdrop = next(r for r in runs if r.label == "pdrop@0.111")
    assert pdrop.kwargs == budget_kwargs("pdrop", 0.111) and pdrop.kwargs["keep_ratio"] != 0.111
    cap = next(r for r in runs if r.setting == "dynamic_cap")
    assert cap.budget == 0.2 and cap.label == "glimpse (dynamic, cap 0.2)"
    assert next(r for r in runs if r.label == "glimpse@1").selection == {"fixed_keep_ratio": 1.0}


def test_run_summary_by_hand():
    """``_summary`` on hand-made rows: means over samples, equivalent_frac as the mean of per-sample ratios, each
    family's numbers over its own rows, the method's config as run."""
    from pathlib import Path

    from glimpseprune.bench.compare import RunSpec

    cmp = Comparison.__new__(Comparison)  # no model: _summary reads the split's name and the depth only
    cmp.split, cmp.n_layers = Path("/d/records.jsonl"), 4
    def row(fam, ok, n_vis, n_kept, eq, kv):
        return dict(family=fam, correct=ok, n_vis=n_vis, n_kept=n_kept, kept_frac=n_kept / n_vis, entering=n_vis,
                    equivalent=eq, kv_len=kv)

    rows = [row("count", True, 100, 10, 55.0, 30), row("count", False, 50, 25, 37.5, 45),
            row("lookup", False, 200, 20, 110.0, 40)]
    s = cmp._summary(RunSpec("pdrop@0.1", "pdrop", "fixed", 0.1, kwargs={"keep_ratio": 0.2, "lam": 0.5}), rows,
                     1.234, [1, 3])
    assert s["config"] == {"keep_ratio": 0.2, "lam": 0.5} and s["prune_layers"] == [1, 3] and s["seconds"] == 1.23
    assert s["n"] == 3 and s["exact_match"] == pytest.approx(1 / 3)
    assert s["kept_frac"]["mean"] == pytest.approx(0.7 / 3) and (s["kept_frac"]["min"], s["kept_frac"]["max"]) == (
        0.1, 0.5)
    assert s["accounting"] == pytest.approx({
        "mean_n_vis": 350 / 3, "visual_tokens_entering_llm": 350 / 3, "equivalent_visual_tokens": 202.5 / 3,
        "equivalent_frac": (0.55 + 0.75 + 0.55) / 3, "kv_entries_at_decode": 115 / 3, "visual_kv_at_decode": 55 / 3})
    assert s["per_family"] == {"count": {"n": 2, "exact_match": 0.5, "kept_frac_mean": pytest.approx(0.3)},
                               "lookup": {"n": 1, "exact_match": 0.0, "kept_frac_mean": pytest.approx(0.1)}}
    glimpse = cmp._summary(RunSpec("glimpse@0.1", "glimpse", "fixed", 0.1, selection={"fixed_keep_ratio": 0.1}),
                           rows, 0.0, [2])
    assert glimpse["config"] == {"selection": {"fixed_keep_ratio": 0.1}}


def _result(label, method, setting, budget, score, fam_score=None):
    return {"label": label, "method": method, "setting": setting, "budget": budget, "n": 4, "exact_match": score,
            "kept_frac": {"mean": budget or 0.05}, "per_family": {"count": {"exact_match": fam_score}} if fam_score
            is not None else {},
            "accounting": {"mean_n_vis": 100.0, "visual_tokens_entering_llm": 100.0, "equivalent_visual_tokens": 50.0,
                           "kv_entries_at_decode": 60.0, "visual_kv_at_decode": 10.0}}


def test_markdown_by_hand():
    """The run table's score relative to full (score / full's), and the pivot: budgets ascending as columns, each
    method's score at each budget, '-' where it has no run."""
    results = [_result("full", "full", "full", 1.0, 0.8, 0.75), _result("random@0.5", "random", "fixed", 0.5, 0.6),
               _result("random@0.1", "random", "fixed", 0.1, 0.4, 0.25),
               _result("glimpse@0.5", "glimpse", "fixed", 0.5, 1.0),
               _result("glimpse (dynamic)", "glimpse", "dynamic", None, 0.9)]
    md = markdown(results).splitlines()
    assert "| random@0.1 | 0.400 | 50.0 % | 10.0 | 100.0 | 50.0 | 60.0 | 0.25 |" in md
    assert "| full | 0.800 | 100.0 % | 100.0 | 100.0 | 50.0 | 60.0 | 0.75 |" in md
    assert "| glimpse (dynamic) | 0.900 | 112.5 % | 5.0 | 100.0 | 50.0 | 60.0 | - |" in md
    pivot = md[md.index("| method | 10.0 % | 50.0 % |"):]
    assert pivot[2:4] == ["| random | 0.400 | 0.600 |", "| glimpse | - | 1.000 |"]


def test_run_scores_normalised_answers(model, processor, module, split, monkeypatch):
    """A prediction is right when it equals the answer up to case, surrounding space and a final full stop."""
    from glimpseprune.api import PrunedModel
    from glimpseprune.bench.compare import RunSpec

    cmp = Comparison(model, processor, module, split, batch_size=3)
    generate = PrunedModel.generate

    def scripted(self, inputs, **kw):
        out = generate(self, inputs, **kw)
        chunk = next(c for c, i, _ in cmp.batches if i is inputs)
        out.texts = [" nope" if r is cmp.records[0] else f"  {r.answer.upper()}. " for r in chunk]
        return out

    monkeypatch.setattr(PrunedModel, "generate", scripted)
    rows, summary = cmp.run(RunSpec("full", "full", "full", 1.0))
    assert [r["correct"] for r in rows] == [False, True, True, True, True]
    assert rows[1]["prediction"] == f"{cmp.records[1].answer.upper()}." and summary["exact_match"] == 0.8


def test_k_sweep_costs_and_matched_fastv_budget(split, tmp_path, monkeypatch):
    """k_sweep's analytic prefill cost grows strictly with K (fewer visual tokens kept than seen) and is the full
    cost at the last layer; its text-token count is the prompt minus the image tokens, by hand; FastV at each K runs
    at GlimpsePrune's mean kept fraction. On the embedded model and module, which keep a few % of the tokens (the
    tiny fixture's random module keeps all of them on this split: every K costs the same)."""
    from glimpseprune.assets import resolve_model, resolve_module
    from glimpseprune.bench.compare import k_sweep
    from glimpseprune.checkpoint import load_module

    model, processor = gp.load_base(resolve_model("embedded"))
    module = load_module(resolve_module("embedded"), gp.get_adapter(model).dims(model))

    runs = []
    real = Comparison.run
    monkeypatch.setattr(Comparison, "run", lambda self, spec, *a, **kw: runs.append((spec, real(self, spec, *a, **kw)))
                        or runs[-1][1])
    res = k_sweep(model, processor, module, split, tmp_path, batch_size=5, log=lambda *_: None)
    ratios = [r["prefill_ratio_analytic"] for r in res["rows"]]
    assert all(a < b for a, b in zip(ratios, ratios[1:])) and ratios[-1] == pytest.approx(1.0)
    (_, inputs, _), = Comparison(model, processor, module, split, batch_size=5).batches
    image = inputs["input_ids"] == model.config.image_token_id
    n_text = (inputs["attention_mask"].sum(1) - image.sum(1)).float().mean()
    assert res["mean_n_text"] == round(float(n_text))
    assert res["mean_n_vis"] == pytest.approx(float(image.sum(1).float().mean()))
    fastv = [(spec, s) for spec, (_, s) in runs if spec.method == "fastv"]
    assert len(fastv) == res["n_layers"]
    frac = res["glimpse_kept_frac_mean"]
    for spec, s in fastv:
        assert spec.kwargs["keep_ratio"] == frac and s["kept_frac"]["mean"] == pytest.approx(frac, abs=0.01)


def test_compare_glimpse_without_a_module_is_refused_before_anything_runs(model, processor, split, tmp_path):
    with pytest.raises(ValueError, match="method 'glimpse' needs a glimpse module"):
        compare(model, processor, None, split, tmp_path / "o", ["random", "glimpse"], [0.5], log=lambda *_: None)
    assert not (tmp_path / "o").exists()
