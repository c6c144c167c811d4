"""GlimpsePrune+ stage 2 end to end on the embedded model: config errors before any training step, gradients reach only
the LoRA, a few GRPO steps raise the probability of the rewarded answers, Visual-CoT rows are accepted, and a short
run writes a folder that gp.load picks up as a whole (and resumes)."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import pytest
import torch

import glimpseprune as gp
from glimpseprune.assets import resolve_model, resolve_module
from glimpseprune.checkpoint import load_module
from glimpseprune.lora import LoraSettings, add_lora, lora_parameters
from glimpseprune.registry import get_adapter
from glimpseprune.rewards import make_reward
from glimpseprune.training.stage1 import WorldDataset
from glimpseprune.training.stage2 import GRPOStep, Stage2Config, load_config, train_stage2


def _cfg(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "run"), train_samples=16, eval_samples=4, prompts_per_step=2,
                num_generations=2, max_new_tokens=4, max_steps=2, eval_steps=2, save_steps=1, logging_steps=1)
    return Stage2Config(**{**base, **kw})


@pytest.mark.parametrize("kw, match", [
    (dict(num_generations=1), "num_generations must be >= 2"), (dict(rewards=["nope"]), "unknown reward 'nope'"),
    (dict(rewards=["exact", "exact"]), r"rewards names \['exact'\] more than once"),
    (dict(rewards=["judge"]), "needs judge_url and judge_model"), (dict(mask_source="oracle"), "mask_source"),
    (dict(cap=1.5), "cap must be in"), (dict(learning_rate="fast"), "learning_rate must be a number"),
    (dict(scale_rewards="batch"), "scale_rewards must be one of"), (dict(sft_weight=-0.5), "sft_weight must be"),
    (dict(lora_layers="first"), "lora_layers must be 'all', 'after_k' or decoder layer indices"),
    (dict(point_families=["count"]), "mask_source vip uses none"),
    (dict(point_families=["count"], mask_source="boxes", point_at="middle"), "point_at must be one of")])
def test_config_errors(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        _cfg(tmp_path, **kw)


def test_yaml_stage_dispatch(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("stage: 2\nlearning_rate: 1e-3\nnum_generations: 3\n")
    cfg = load_config(p)
    assert isinstance(cfg, Stage2Config) and cfg.learning_rate == 1e-3 and cfg.num_generations == 3
    p.write_text("stage: 3\n")
    with pytest.raises(ValueError, match="stage must be 1"):
        load_config(p)


def test_judge_that_refuses_connections_fails_before_training(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _cfg(tmp_path, rewards=["judge"], judge_url=f"http://127.0.0.1:{port}/v1", judge_model="m")
    with pytest.raises(ValueError, match="refused"):
        train_stage2(cfg)
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_a_judge_failing_after_its_check_stops_training(tmp_path, monkeypatch):
    """The judge answers the check before training, then returns HTTP 500: the step fails naming it, instead of
    scoring every rollout 0 (a right answer whose request failed would be pushed down against its group)."""
    from test_rewards import JudgeServer

    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    server = JudgeServer(lambda body, n: (200, "score: 1", 0.0) if n == 1 else (500, "overloaded", 0.0))
    try:
        cfg = _cfg(tmp_path, rewards=["judge"], judge_url=server.url, judge_model="m", max_steps=1)
        with pytest.raises(ValueError, match="HTTP 500"):
            train_stage2(cfg)
    finally:
        server.close()
    assert len(server.requests) > 1 and not (tmp_path / "run" / "module").exists()


def test_a_module_for_another_base_is_refused(tmp_path, tiny_dir):
    cfg = _cfg(tmp_path, model=str(tiny_dir))  # the embedded module belongs to the embedded model
    with pytest.raises(ValueError, match="another base model"):
        train_stage2(cfg)


@pytest.fixture(scope="module")
def policy():
    model, processor = gp.load_base(resolve_model("embedded"))
    module = load_module(resolve_module("embedded"), get_adapter(model).dims(model))
    for p in module.parameters():
        p.requires_grad_(False)
    add_lora(model, LoraSettings(dropout=0.0))
    return model, processor, module


def _answer_logprob(model, processor, module, items, eos: int) -> float:
    """Mean log p(reference answer + the end token) under the pruned schedule, teacher-forced: what the exact-match
    reward's expectation grows with."""
    from glimpseprune.methods.glimpse import GlimpseMethod
    from glimpseprune.processing import build_inputs
    from glimpseprune.runtime.engine import prefill
    from glimpseprune.runtime.rollout import completion_logprobs

    tok = processor.tokenizer
    total = 0.0
    with torch.no_grad():
        for it in items:
            inputs = dict(build_inputs(processor, [[it["image"]]], [it["question"]]))
            pre = prefill(model, get_adapter(model), GlimpseMethod(module=module), inputs)
            ids = torch.tensor([tok(it["answer"], add_special_tokens=False)["input_ids"] + [eos]])
            total += float(completion_logprobs(model, get_adapter(model), pre, ids).sum())
    return total / len(items)


def test_grpo_steps_reach_only_the_lora_and_raise_the_rewarded_answers(policy, tmp_path):
    model, processor, module = policy
    cfg = _cfg(tmp_path, num_generations=8, prompts_per_step=4, learning_rate=1e-3, beta=0.0, max_new_tokens=6)
    items = [WorldDataset(64)[i] for i in range(0, 64, 4)][:8]
    step = GRPOStep(model, processor, module, cfg, [make_reward("exact")])
    params = lora_parameters(model)
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate)
    frozen = [p for p in list(model.parameters()) + list(module.parameters()) if not any(p is q for q in params)]
    seen = {"grad": False}

    def optimizer_step():
        assert all(p.grad is None for p in frozen)  # nothing but the LoRA gets a gradient
        seen["grad"] |= any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step.optimizer_step = optimizer_step
    before = _answer_logprob(model, processor, module, items, step.eos[0])
    for s in range(6):
        step(items[(s % 2) * 4:(s % 2) * 4 + 4], seeds=list(range(s * 100, s * 100 + 32)))
    after = _answer_logprob(model, processor, module, items, step.eos[0])
    assert seen["grad"] and after > before + 0.01, (before, after)


def test_visual_cot_rows_are_rl_data(policy, tmp_path):
    from glimpseprune.testing import random_image
    from glimpseprune.training.stage1 import RecordDataset

    model, processor, module = policy
    random_image(224, 224, seed=1).save(tmp_path / "a.jpg")
    rows = [{"question_id": "viscot-1", "dataset": "gqa", "image": "a.jpg", "question": "What colour is the cup?",
             "answer": "red", "width": 224, "height": 224, "bboxs": [[10, 10, 80, 90]]}]
    (tmp_path / "viscot.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = [RecordDataset(tmp_path / "viscot.jsonl")[0]] * 2
    for kw in (dict(prompt_suffix="Answer the question using a single word or phrase."), dict(mask_source="boxes")):
        cfg = _cfg(tmp_path, **kw)
        step = GRPOStep(model, processor, module, cfg, [make_reward("exact")])
        step.optimizer_step = lambda: None
        stats = step(items, seeds=list(range(4)))
        assert 0.0 <= stats["reward"] <= 1.0 and 0.0 < stats["kept_frac"] <= 1.0


def test_short_run_writes_one_folder_that_loads_and_resumes(tmp_path):
    cfg = _cfg(tmp_path)
    plus = train_stage2(cfg)
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["global_step"] == 2 and len(summary["history"]) == 2 and summary["evals"]
    assert (plus / "adapter_model.safetensors").is_file() and (plus / "glimpse_config.json").is_file()
    pm = gp.load(resolve_model("embedded"), module=plus)
    out = pm.generate(images=[[WorldDataset(1)[0]["image"]]], questions=["What colour is the square?"],
                      max_new_tokens=3)
    assert out.n_kept[0] < out.n_vis[0]
    with pytest.raises(ValueError, match="LoRA adapter|adapter"):
        load_module(plus)  # the module alone is the wrong function
    # resume: a longer run continues from the newest checkpoint with the same settings
    longer = _cfg(tmp_path, max_steps=3)
    train_stage2(longer, resume=True)
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["global_step"] == 3 and summary["resumed_from"].endswith("checkpoint-2")  # no step repeated
    with pytest.raises(ValueError, match="differs"):
        train_stage2(_cfg(tmp_path, max_steps=4, beta=0.1), resume=True)


def test_resume_accepts_a_run_that_predates_a_field_left_at_its_default(tmp_path):
    from glimpseprune.training.trainer import config_differences

    cfg = _cfg(tmp_path)
    stored = {k: v for k, v in json.loads(json.dumps(cfg.__dict__, default=str)).items()
              if k not in ("lora_layers", "drop_layer")}  # a run made before these fields existed
    assert config_differences(stored, cfg) == []
    assert config_differences(stored, _cfg(tmp_path, lora_layers="after_k")) == [
        "lora_layers: run 'all', now 'after_k'"]


def test_lora_layer_ids():
    from glimpseprune.training.stage2 import lora_layer_ids

    assert lora_layer_ids("all", 2, 4) is None and lora_layer_ids(" 3, 1,3 ", 2, 4) == (1, 3)
    assert lora_layer_ids("after_k", 0, 4) == (1, 2, 3) and lora_layer_ids("after_k", -1, 4) == (0, 1, 2, 3)
    with pytest.raises(ValueError, match="no decoder layer runs after it"):
        lora_layer_ids("after_k", 3, 4)
    with pytest.raises(ValueError, match="decoder layers 0..3"):
        lora_layer_ids("4", 2, 4)


def test_lora_layers_after_k_adapts_only_the_layers_after_the_prune_layer(tmp_path):
    from glimpseprune.training.trainer import RUN_CONFIG

    with pytest.raises(ValueError, match="decoder layers 0..3"):  # the embedded LLM has 4 layers
        train_stage2(_cfg(tmp_path, lora_layers="2,4"))
    assert not (tmp_path / "run" / RUN_CONFIG).exists()  # refused before the run wrote anything
    plus = train_stage2(_cfg(tmp_path, lora_layers="after_k", max_steps=1, eval_steps=1))
    K = load_module(resolve_module("embedded")).cfg.prune_layer
    targets = json.loads((plus / "adapter_config.json").read_text())["target_modules"]
    assert targets and {int(t.split(".layers.")[1].split(".")[0]) for t in targets} == set(range(K + 1, 4))
    pm = gp.load(resolve_model("embedded"), module=plus)
    out = pm.generate(images=[[WorldDataset(1)[0]["image"]]], questions=["What colour is the square?"],
                      max_new_tokens=3)
    assert out.n_kept[0] < out.n_vis[0]


def test_early_module_with_a_drop_layer(tmp_path):
    """GlimpsePrune+ on an early module's picks dropped after layer 0: the folder records the schedule, so gp.load
    runs it; drop_layer on a glimpse module is refused before the run writes anything."""
    from glimpseprune.training.trainer import RUN_CONFIG

    with pytest.raises(ValueError, match="drop_layer applies to an early module"):
        train_stage2(_cfg(tmp_path, drop_layer=0))  # the embedded module is a glimpse module (K = 2)
    assert not (tmp_path / "run" / RUN_CONFIG).exists()
    with pytest.raises(ValueError, match="drop_layer must be -1"):
        _cfg(tmp_path, drop_layer=-2)
    early = str(Path(__file__).resolve().parents[1] / "results" / "early_glimpse" / "module")
    with pytest.raises(ValueError, match=r"after an LLM layer in \[0, 3\]"):
        train_stage2(_cfg(tmp_path, module=early, drop_layer=4))
    plus = train_stage2(_cfg(tmp_path, module=early, drop_layer=0, lora_layers="after_k", max_steps=1,
                             eval_steps=1))
    saved = json.loads((plus / "glimpse_config.json").read_text())["glimpse"]
    assert saved["kind"] == "early" and saved["prune_layer"] == 0
    targets = json.loads((plus / "adapter_config.json").read_text())["target_modules"]
    assert {int(t.split(".layers.")[1].split(".")[0]) for t in targets} == {1, 2, 3}
    pm = gp.load(resolve_model("embedded"), module=plus)
    assert pm.method.name == "early_glimpse"
    out = pm.generate(images=[[WorldDataset(1)[0]["image"]]], questions=["What colour is the square?"],
                      max_new_tokens=3)
    assert out.prune_layer == 0 and 0 < out.n_kept[0] < out.n_vis[0]


def test_step_b_retrains_the_module_on_the_adapted_model(tmp_path):
    from glimpseprune.training.stage1 import Stage1Config
    from glimpseprune.training.trainer import train

    plus = train_stage2(_cfg(tmp_path, max_steps=1))
    cfg = Stage1Config(adapter=str(plus), output_dir=str(tmp_path / "b"), train_samples=4, eval_samples=2,
                       max_steps=1, batch_size=2, eval_steps=1, save_steps=1, logging_steps=1,
                       module=dict(vip_width=32, cond_width=32, vip_heads=2, vip_mlp_width=64))
    out = train(cfg)
    assert (out / "adapter_model.safetensors").read_bytes() == (plus / "adapter_model.safetensors").read_bytes()
    pm = gp.load(resolve_model("embedded"), module=out)  # the new module and the adapter, as a whole
    assert pm.method.module.cfg.vip_width == 32
    bad = Stage1Config(adapter=str(resolve_module("embedded")), output_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="holds no LoRA adapter"):
        train(bad)
    # step B into the stage-2 run's own folder with --overwrite would delete its adapter (OUT/module) and fail at the
    # end: refused before anything is removed
    into = Stage1Config(**{**cfg.__dict__, "output_dir": str(plus.parent)})
    with pytest.raises(ValueError, match="--overwrite refused: adapter .* lies in"):
        train(into, overwrite=True)
    assert (plus / "adapter_model.safetensors").is_file()


def _records(tmp_path, n=4, boxes=True):
    from glimpseprune.data.records import write_split

    split = write_split(tmp_path / "data", n=n, seed=2, overwrite=True)
    rows = [json.loads(line) for line in split.read_text().splitlines()]
    if not boxes:
        for r in rows:
            r.pop("bboxs")
    bare = tmp_path / "data" / ("boxed.jsonl" if boxes else "bare.jsonl")
    bare.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return bare


@pytest.mark.parametrize("kw, match", [(dict(mask_source="boxes"), "mask_source boxes needs"),
                                       (dict(mask_source="vip_cotrain"), "mask_source vip_cotrain needs"),
                                       (dict(rewards=["exact", "box_iou"]), "the box_iou reward needs")])
def test_records_without_boxes_are_refused_where_boxes_are_needed(tmp_path, kw, match):
    """Without boxes the box masks were empty (the policy learned to answer from no visual token) or box_iou failed
    at the first step: refused before the model loads, and nothing is written."""
    cfg = _cfg(tmp_path, train_data=str(_records(tmp_path, boxes=False)), **kw)
    with pytest.raises(ValueError, match="4 of 4 records have no bboxs .*" + match):
        train_stage2(cfg)
    assert not (tmp_path / "run" / "run_config.json").exists()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="eval_data .*empty.jsonl holds no records"):
        train_stage2(_cfg(tmp_path, train_data=str(_records(tmp_path)), eval_data=str(empty)))


def test_resume_refuses_inputs_whose_content_changed(tmp_path):
    """The same path, another file: resuming would mix two runs (steps rolled out on the old module, then the new)."""
    data = _records(tmp_path, n=6)
    train_stage2(_cfg(tmp_path, train_data=str(data)))  # checkpoint-1 and the final step
    lines = data.read_text().splitlines()
    data.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ValueError, match="train_data: its content changed since the run"):
        train_stage2(_cfg(tmp_path, train_data=str(data), max_steps=3), resume=True)


def test_overwrite_keeps_the_judge_cache_of_its_run(tmp_path):
    from glimpseprune.training.trainer import check_output_dir

    cfg = _cfg(tmp_path)
    out = tmp_path / "run"
    (out / "checkpoint-1").mkdir(parents=True)
    (out / "judge_cache").mkdir()
    check_output_dir(cfg, overwrite=True)  # the cache glimpseprune wrote is not someone else's file
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="'notes.txt'"):
        check_output_dir(cfg, overwrite=True)


def test_co_trained_vip_moves_the_module_with_its_stage1_loss(tmp_path):
    cfg = _cfg(tmp_path, mask_source="vip_cotrain", max_steps=2, save_steps=1)
    before = load_module(resolve_module("embedded")).state_dict()
    plus = train_stage2(cfg)
    after = load_module(plus, allow_without_adapter=True).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the VIP learned alongside the adapter
    hist = json.loads((tmp_path / "run" / "train_summary.json").read_text())["history"]
    assert all("vip_loc_loss" in h for h in hist)
    train_stage2(_cfg(tmp_path, mask_source="vip_cotrain", max_steps=3, save_steps=1), resume=True)


def test_dynamic_sampling_updates_on_mixed_groups_only(policy, tmp_path):
    model, processor, module = policy
    cfg = _cfg(tmp_path, num_generations=8, prompts_per_step=2, dynamic_sampling=3, beta=0.0, max_new_tokens=4)
    step = GRPOStep(model, processor, module, cfg, [make_reward("exact")])
    seen = []
    step.update = lambda batch: seen.append(batch) or {"policy_loss": 0.0, "kl": 0.0}
    pool = iter([WorldDataset(64)[i] for i in range(64)])
    stats = step.mixed_step(lambda: [next(pool), next(pool)], lambda k: list(range(k * 16, k * 16 + 16)))
    assert len(seen) == 1 and 1 <= stats["rollout_batches"] <= 4  # fixed seeds: mixed groups are found
    b = seen[0]
    groups = b.rewards.view(-1, 8)
    assert stats["update_prompts"] == groups.shape[0] <= 2
    assert bool((groups.max(1).values > groups.min(1).values).all())  # every kept group has mixed rewards
    assert b.tokens.shape == b.mask.shape and b.tokens.shape[0] == groups.shape[0] * 8
    assert b.inputs["input_ids"].shape[0] == groups.shape[0] and len(b.keep_masks) == groups.shape[0]


def test_visual_cot_image_root(tmp_path):
    """Visual-CoT's metadata names images relative to its cot_image_data/ folder, not to the JSONL: ``image_root``
    says where they start; without it the first missing image is named with the hint."""
    from glimpseprune.testing import random_image
    from glimpseprune.training.stage1 import RecordDataset, Stage1Config

    (tmp_path / "cot_image_data" / "gqa").mkdir(parents=True)
    random_image(64, 48, seed=2).save(tmp_path / "cot_image_data" / "gqa" / "1.jpg")
    (tmp_path / "metadata").mkdir()
    row = {"question_id": "viscot-1", "image": "gqa/1.jpg", "question": "What is it?", "answer": "a cup",
           "width": 64, "height": 48, "bboxs": [[1, 1, 20, 20]]}
    (tmp_path / "metadata" / "train.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(FileNotFoundError, match="image_root"):
        RecordDataset(tmp_path / "metadata" / "train.jsonl")
    item = RecordDataset(tmp_path / "metadata" / "train.jsonl", image_root=tmp_path / "cot_image_data")[0]
    assert item["image"].size == (64, 48) and item["boxes"] == [[1, 1, 20, 20]]
    with pytest.raises(FileNotFoundError, match="not a folder"):
        RecordDataset(tmp_path / "metadata" / "train.jsonl", image_root=tmp_path / "nope")
    # upstream's layout: "image" is a file name under <image_root>/<dataset>/
    random_image(32, 32, seed=3).save(tmp_path / "cot_image_data" / "gqa" / "2.jpg")
    row2 = {**row, "question_id": "viscot-2", "image": "2.jpg", "dataset": "gqa", "width": 32, "height": 32}
    (tmp_path / "metadata" / "up.jsonl").write_text(json.dumps(row2) + "\n")
    assert RecordDataset(tmp_path / "metadata" / "up.jsonl", image_root=tmp_path / "cot_image_data")[0][
        "image"].size == (32, 32)
    assert Stage1Config(image_root=str(tmp_path)).image_root == str(tmp_path)
    assert _cfg(tmp_path, image_root=str(tmp_path / "cot_image_data")).image_root.endswith("cot_image_data")


def test_guidance_gives_a_group_that_always_fails_the_reference_as_one_rollout(policy, tmp_path):
    model, processor, module = policy
    items = [{**WorldDataset(8)[i], "answer": "zebra"} for i in (0, 1)]  # an answer the policy never samples
    seen = []
    for guidance in ("none", "on_failure"):
        cfg = _cfg(tmp_path, num_generations=4, prompts_per_step=2, guidance=guidance, max_new_tokens=4)
        step = GRPOStep(model, processor, module, cfg, [make_reward("exact")])
        step.update = lambda batch: seen.append(batch) or {"policy_loss": 0.0, "kl": 0.0}
        stats = step(items, seeds=list(range(8)))
        if guidance == "none":
            assert stats["skipped"] == 1.0 and not seen  # all-zero groups: plain GRPO learns nothing
    assert stats["guided_groups"] == 1.0 and len(seen) == 1, stats
    b = seen[0]
    tok = processor.tokenizer
    for g in range(2):
        rows = b.rewards[g * 4:(g + 1) * 4]
        assert rows.tolist() == [0.0, 0.0, 0.0, 1.0]  # the reference, scored by the same reward
        assert b.texts[g * 4 + 3] == "zebra"
        ids = b.tokens[g * 4 + 3][b.mask[g * 4 + 3]].tolist()
        assert ids == tok("zebra", add_special_tokens=False)["input_ids"] + [step.eos[0]]
        assert bool((b.advantages[g * 4:(g + 1) * 4] != 0).all())
    with pytest.raises(ValueError, match="guidance must be one of"):
        _cfg(tmp_path, guidance="always")


def test_sft_weight_trains_toward_the_reference_even_when_every_rollout_fails(policy, tmp_path):
    """sft_weight > 0 adds the reference answer's cross-entropy on the rollouts' pruned prefill: a batch whose groups
    all score 0 (plain GRPO skips it) still updates, the term equals the per-token mean of -log p(reference + EOS)
    computed independently (one sample at a time, the module's own masks), and a few steps raise that log-prob."""
    from glimpseprune.lora import lora_named_parameters

    model, processor, module = policy
    items = [{**WorldDataset(8)[i], "answer": "zebra"} for i in (0, 1)]  # an answer the policy never samples
    saved = {k: v.detach().clone() for k, v in lora_named_parameters(model).items()}
    try:
        cfg = _cfg(tmp_path, num_generations=4, prompts_per_step=2, max_new_tokens=4, sft_weight=1.0, beta=0.0)
        step = GRPOStep(model, processor, module, cfg, [make_reward("exact")])
        params = lora_parameters(model)
        opt = torch.optim.AdamW(params, lr=1e-3)

        def optimizer_step():
            opt.step()
            opt.zero_grad(set_to_none=True)

        step.optimizer_step = optimizer_step
        n_tok = len(processor.tokenizer("zebra", add_special_tokens=False)["input_ids"]) + 1
        before = _answer_logprob(model, processor, module, items, step.eos[0])
        stats = step(items, seeds=list(range(8)))
        assert stats["reward"] == 0.0 and "skipped" not in stats, stats
        assert stats["sft_loss"] == pytest.approx(-before / n_tok, abs=1e-4)
        for s in range(3):
            step(items, seeds=list(range(8 * (s + 1), 8 * (s + 2))))
        after = _answer_logprob(model, processor, module, items, step.eos[0])
        assert after > before + 0.5, (before, after)
    finally:
        named = dict(model.named_parameters())
        for k, v in saved.items():
            named[k].data.copy_(v)


def test_ceiling_benchmark_agrees_with_the_eval_runner(tmp_path):
    """benchmarks/stage2_ceiling.py's own loop == the library's eval runner (bench.accuracy.run) on the same split
    for the module's masks and for every token (exact match and kept fraction); the sampling groups cover every
    record; a non-empty --out is refused."""
    import subprocess
    import sys
    from pathlib import Path

    from glimpseprune.bench import accuracy
    from glimpseprune.data.records import write_split

    root = Path(__file__).resolve().parents[1]
    split = write_split(tmp_path / "split", n=10, seed=3)
    out = tmp_path / "ceiling"
    cmd = [sys.executable, str(root / "benchmarks/stage2_ceiling.py"), "--split", str(split), "--modules", "embedded",
           "--samples", "2", "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((out / "ceiling.json").read_text())["modules"]["embedded"]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["modules"]["embedded"] == res
    model, processor = gp.load_base(resolve_model("embedded"))
    module = load_module(resolve_module("embedded"), get_adapter(model).dims(model))
    for run, pm in (("module", gp.apply(model, "glimpse", module=module, processor=processor)),
                    ("full", gp.apply(model, "full", processor=processor))):
        _, summary = accuracy.run(pm, split)
        assert res[run]["exact_match"] == pytest.approx(summary["exact_match"]), run
        assert res[run]["kept_frac"] == pytest.approx(summary["kept_frac"]["mean"]), run
    rows = [json.loads(line) for line in split.read_text().splitlines()]
    assert set(res["module"]["per_family"]) == {r["family"] for r in rows}
    s = res["sampling"]
    assert s["G"] == 2 and sum(g["n"] for g in s["groups"].values()) == 10 and 0 <= s["mean_p_right"] <= 1
    masks = res["module"]["masks"]
    assert set(masks) == set(res["module"]["per_family"]) and sum(m["n"] for m in masks.values()) == 10
    assert all(0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1 and m["exact_wrong"] <= m["exact"] <= m["n"]
               for m in masks.values())
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode != 0 and "is not empty" in again.stderr


def test_ceiling_mask_agreement_by_hand():
    """stage2_ceiling's per-family mask figures on hand-made masks: precision / recall per question averaged, a
    kept set equal to the box set counted as exact (and as exact-but-wrong when the answer was wrong)."""
    import importlib.util
    from pathlib import Path
    from types import SimpleNamespace

    path = Path(__file__).resolve().parents[1] / "benchmarks/stage2_ceiling.py"
    spec = importlib.util.spec_from_file_location("stage2_ceiling", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = [{"id": "a", "family": "count", "correct": False}, {"id": "b", "family": "count", "correct": True},
            {"id": "c", "family": "exist", "correct": True}]
    keep = [torch.tensor([1, 1, 0, 0]), torch.tensor([1, 1, 1, 0]), torch.tensor([0, 1, 0, 0])]
    box = [torch.tensor([[1, 1], [0, 0]]), torch.tensor([[1, 0], [0, 1]]), torch.tensor([[0, 0], [0, 0]])]
    cmp = SimpleNamespace(last_keep_masks=[keep[:2], keep[2:]], batches=[(None, None, box[:2]), (None, None, box[2:])])
    got = mod._mask_agreement(rows, cmp)
    # a: exact (2 of 2), wrong; b: 1 of 3 kept are boxes (precision 1/3), 1 of 2 boxes kept (recall 1/2)
    assert got["count"] == {"n": 2, "precision": pytest.approx((1 + 1 / 3) / 2), "recall": pytest.approx(0.75),
                            "exact": 1, "exact_wrong": 1}
    # c: no box token: nothing to miss (recall 1), and the one kept token is not a box token (precision 0)
    assert got["exist"] == {"n": 1, "precision": 0.0, "recall": 1.0, "exact": 0, "exact_wrong": 0}
    with pytest.raises(RuntimeError, match="3 rows but 2 keep masks"):
        mod._mask_agreement(rows, SimpleNamespace(last_keep_masks=[keep[:2]], batches=cmp.batches))


def test_a_merged_base_is_not_trained_on(tmp_path):
    """A stage-1 / stage-2 run on a --merge output wrote a module that loaded silently on the stock base without the
    merged adapter: refused before the model loads, pointing to step B on the stock base."""
    from glimpseprune.lora import merge_and_save
    from glimpseprune.training.stage1 import Stage1Config
    from glimpseprune.training.trainer import train

    plus = train_stage2(_cfg(tmp_path, max_steps=1))
    merged = merge_and_save(resolve_model("embedded"), plus, tmp_path / "merged")
    with pytest.raises(ValueError, match="holds a merged GlimpsePrune\\+ adapter .*`adapter:`"):
        train_stage2(_cfg(tmp_path, model=str(merged), output_dir=str(tmp_path / "again")))
    with pytest.raises(ValueError, match="holds a merged GlimpsePrune\\+ adapter"):
        train(Stage1Config(model=str(merged), output_dir=str(tmp_path / "s1"), max_steps=1))
    assert not (tmp_path / "again").exists() or not any((tmp_path / "again").iterdir())


# mutation audit (stage 2's step): rules a one-line change could break unnoticed

def _fixed_rewards(values):
    """A reward that scores the i-th completion ``values[i]`` (whatever it says): advantages by hand."""
    return lambda samples: [float(values[i]) for i in range(len(samples))]


def test_rollout_advantages_follow_scale_rewards_and_the_stats_are_by_hand(policy, tmp_path):
    model, processor, module = policy
    items = [WorldDataset(8)[i] for i in (0, 1)]
    std = math.sqrt(3) / 4  # population std of (1, 0, 0, 0)
    for scale, first in (("none", [0.75, -0.25, -0.25, -0.25]),
                         ("group", [0.75 / (std + 1e-4), -0.25 / (std + 1e-4), -0.25 / (std + 1e-4),
                                    -0.25 / (std + 1e-4)])):
        cfg = _cfg(tmp_path, num_generations=4, scale_rewards=scale)
        step = GRPOStep(model, processor, module, cfg, [_fixed_rewards([1, 0, 0, 0, 1, 1, 1, 1])])
        batch = step.rollout(items, seeds=list(range(8)))
        assert torch.allclose(batch.advantages, torch.tensor(first + [0.0] * 4), atol=1e-5), (scale, batch.advantages)
        assert batch.stats["reward"] == pytest.approx(5 / 8)
        assert batch.stats["reward_std"] == pytest.approx(std / 2, rel=1e-5)  # groups' population stds, averaged
        assert batch.stats["mixed_groups"] == 0.5  # the second group's rewards are all equal


def test_the_prompt_suffix_reaches_the_rollout_prompt(policy, tmp_path):
    model, processor, module = policy
    items = [WorldDataset(8)[0]]
    suffix = "Answer with one word."
    decode = lambda step: processor.tokenizer.decode(step.inputs(items)["input_ids"][0])  # noqa: E731
    plain = decode(GRPOStep(model, processor, module, _cfg(tmp_path), [make_reward("exact")]))
    suffixed = decode(GRPOStep(model, processor, module, _cfg(tmp_path, prompt_suffix=suffix), [make_reward("exact")]))
    assert f"{items[0]['question']}\n{suffix}" in suffixed and suffix not in plain


def test_mask_source_boxes_rolls_out_on_the_box_tokens_points_for_point_families(policy, tmp_path):
    """mask_source boxes: the rollouts see exactly the box tokens (world objects sit on whole 28-px cells), and a
    family in point_families one token per object (its ``mask_boxes``, not its answer boxes). The model's training
    mode is what it was before the rollout (it samples in eval mode)."""
    model, processor, module = policy
    items = [WorldDataset(8, point_families=["count"])[i] for i in (0, 2)]  # lookup: 1 one-cell box; count: 2 of 2x2
    assert items[1]["family"] == "count" and len(items[1]["boxes"]) == 2
    cfg = _cfg(tmp_path, mask_source="boxes", point_families=["count"], num_generations=2)
    step = GRPOStep(model, processor, module, cfg, [make_reward("exact")])
    was = model.training
    try:
        model.train()
        batch = step.rollout(items, seeds=list(range(4)))
        assert model.training
    finally:
        model.train(was)
    lookup = torch.zeros(items[0]["height"] // 28, items[0]["width"] // 28, dtype=torch.bool)
    lookup[1, 2] = True  # box [56, 28, 84, 56]: column 2, row 1
    assert torch.equal(batch.keep_masks[0].reshape(lookup.shape), lookup)
    count = torch.zeros(items[1]["height"] // 28, items[1]["width"] // 28, dtype=torch.bool)
    for x0, y0, x1, y1 in items[1]["boxes"]:  # one token per object: the cell of its centre
        count[int((y0 + y1) / 2) // 28, int((x0 + x1) / 2) // 28] = True
    assert int(count.sum()) == 2 and torch.equal(batch.keep_masks[1].reshape(count.shape), count)
    assert batch.stats["kept_frac"] == pytest.approx((1 / lookup.numel() + 2 / count.numel()) / 2)


def test_logprobs_score_rollouts_at_the_sampling_temperature_and_the_reference_at_1(policy, tmp_path):
    """The policy's log-probs of its rollouts are taken at the temperature they were sampled at; the reference
    answer's (the supervised term) at temperature 1: the first token's by hand from the fixed-mask prefill."""
    model, processor, module = policy
    step = GRPOStep(model, processor, module, _cfg(tmp_path, temperature=0.5), [make_reward("exact")])
    items = [WorldDataset(8)[0]]
    batch = step.rollout(items, seeds=[0, 1])
    gold, _ = step.reference([items[0]["answer"]])
    with torch.no_grad():
        logp, gold_logp = step.logprobs(batch, gold)
        logits = step.fixed_prefill(batch.inputs, batch.keep_masks).logits.float()[0]  # the first answer token's
    assert torch.allclose(logp[:, 0], torch.log_softmax(logits / 0.5, -1)[batch.tokens[:, 0]], atol=1e-5)
    assert float(gold_logp[0, 0]) == pytest.approx(float(torch.log_softmax(logits, -1)[gold[0, 0]]), abs=1e-5)


def _perturbed_lora(model, seed=0, scale=0.5):
    """Give the LoRA's B matrices (0 at creation) random values, so the policy differs from the base; returns the
    saved parameters to restore."""
    from glimpseprune.lora import lora_named_parameters

    saved = {k: v.detach().clone() for k, v in lora_named_parameters(model).items()}
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, p in lora_named_parameters(model).items():
            if "lora_B" in k:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return saved


def _restore(model, saved):
    named = dict(model.named_parameters())
    for k, v in saved.items():
        named[k].data.copy_(v)


def test_the_kl_is_to_the_adapter_disabled_model(policy, tmp_path):
    """beta > 0: the KL term is k3 of the policy against the same model with its adapter disabled (the base), per
    row the masked token mean, then the mean over rows; with an adapter that moved the policy it is > 0."""
    from glimpseprune.lora import disabled_adapter
    from glimpseprune.training.rl.grpo import k3_kl, masked_mean

    model, processor, module = policy
    saved = _perturbed_lora(model)
    try:
        step = GRPOStep(model, processor, module, _cfg(tmp_path, beta=0.1), [_fixed_rewards([1, 0, 0, 1])])
        step.optimizer_step = lambda: model.zero_grad(set_to_none=True)  # nothing moves
        batch = step.rollout([WorldDataset(8)[i] for i in (0, 1)], seeds=list(range(4)))
        parts = step.update(batch)
        with torch.no_grad():
            pol, _ = step.logprobs(batch)
            with disabled_adapter(model):
                base, _ = step.logprobs(batch)
        want = float(masked_mean(k3_kl(pol, base), batch.mask).mean())
        assert want > 1e-4 and parts["kl"] == pytest.approx(want, rel=1e-4)
    finally:
        _restore(model, saved)


def test_several_updates_per_batch_keep_the_rollout_policy_as_old_and_clip(policy, tmp_path, monkeypatch):
    """updates_per_batch > 1 (PPO-style): every update's ratio is against the log-probs of the policy that made the
    rollouts (the first update's, before any step), clipped at clip_eps; a single update is the unclipped form."""
    import glimpseprune.training.rl.grpo as grpo_mod

    model, processor, module = policy
    calls = []
    real = grpo_mod.grpo_loss

    def spy(logp, old, ref, adv, mask, beta, clip_eps):
        calls.append((logp.detach().clone(), old.detach().clone(), clip_eps))
        return real(logp, old, ref, adv, mask, beta, clip_eps)

    monkeypatch.setattr(grpo_mod, "grpo_loss", spy)
    saved = _perturbed_lora(model)
    try:
        for n in (2, 1):
            calls.clear()
            cfg = _cfg(tmp_path, updates_per_batch=n, clip_eps=0.3, beta=0.0)
            step = GRPOStep(model, processor, module, cfg, [_fixed_rewards([1, 0, 0, 1])])
            opt = torch.optim.SGD(lora_parameters(model), lr=1.0)

            def optimizer_step(opt=opt):
                opt.step()
                opt.zero_grad(set_to_none=True)

            step.optimizer_step = optimizer_step
            step.update(step.rollout([WorldDataset(8)[i] for i in (0, 1)], seeds=list(range(4))))
            assert len(calls) == n
            if n == 2:
                (logp0, old0, clip0), (logp1, old1, clip1) = calls
                assert torch.equal(old0, logp0) and torch.equal(old1, logp0)  # the rollout policy's, both times
                assert not torch.allclose(logp1, logp0)  # the first update moved the policy
                assert clip0 == clip1 == 0.3
            else:
                assert calls[0][2] is None
    finally:
        _restore(model, saved)


def test_sft_weight_scales_the_supervised_gradient(policy, tmp_path):
    """With every advantage 0 and beta 0 the gradient is sft_weight times the reference's cross-entropy gradient."""
    model, processor, module = policy
    items = [{**WorldDataset(8)[i], "answer": "zebra"} for i in (0, 1)]
    grads = {}
    batch = None
    for w in (1.0, 0.25):
        step = GRPOStep(model, processor, module, _cfg(tmp_path, sft_weight=w, beta=0.0), [_fixed_rewards([0] * 4)])

        def optimizer_step(w=w):
            grads[w] = [p.grad.clone() for p in lora_parameters(model)]
            model.zero_grad(set_to_none=True)

        step.optimizer_step = optimizer_step
        batch = batch or step.rollout(items, seeds=list(range(4)))
        assert not batch.advantages.any()
        step.update(batch)
    assert any(bool(g.abs().sum() > 0) for g in grads[1.0])
    for g1, gq in zip(grads[1.0], grads[0.25], strict=True):
        assert torch.allclose(gq, 0.25 * g1, atol=1e-7, rtol=1e-5)


def test_dynamic_sampling_stops_at_prompts_per_step_and_merges_the_kept_groups(policy, tmp_path):
    """mixed_step on scripted rollouts (rewards by hand): batch 0 has one mixed group (prompt 1), batch 1 two; with
    prompts_per_step 2 the update gets prompt 1 of batch 0 and prompt 0 of batch 1 (not a third), each with its own
    rows, tokens (right-padded), rewards and keep mask; the statistics are means over both batches."""
    from glimpseprune.training.rl.grpo import group_advantages
    from glimpseprune.training.rl.step import Rollouts

    model, processor, module = policy
    cfg = _cfg(tmp_path, num_generations=2, prompts_per_step=2, dynamic_sampling=3)
    step = GRPOStep(model, processor, module, cfg, [make_reward("exact")])
    script = [[0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 1.0, 0.0]]
    made, seen = [], []

    def rollout(items, seeds):
        k, T = len(made), 2 + len(made)  # batch k's completions are 2 + k tokens long
        r = torch.tensor(script[k])
        toks = 100 * (k + 1) + torch.arange(4 * T).view(4, T)
        keep = [torch.tensor([k, b]) for b in range(2)]  # markers: (batch, prompt)
        made.append(Rollouts({}, keep, toks, torch.ones(4, T, dtype=torch.bool), [f"{k}.{i}" for i in range(4)], r,
                             group_advantages(r, 2), {"reward": float(r.mean())}, [it["answer"] for it in items]))
        return made[-1]

    step.rollout = rollout
    step.update = lambda batch: seen.append(batch) or {"policy_loss": 0.0, "kl": 0.0}
    pool = iter([WorldDataset(8)[i] for i in range(8)])
    stats = step.mixed_step(lambda: [next(pool), next(pool)], lambda k: [k * 4 + r for r in range(4)])
    assert stats["rollout_batches"] == 2.0 and stats["update_prompts"] == 2.0 and len(seen) == 1
    assert stats["reward"] == pytest.approx((0.25 + 0.5) / 2)  # over every rollout made
    b = seen[0]
    assert [m.tolist() for m in b.keep_masks] == [[0, 1], [1, 0]]
    assert b.rewards.tolist() == [1.0, 0.0, 1.0, 0.0] and b.texts == ["0.2", "0.3", "1.0", "1.1"]
    assert b.tokens.shape == (4, 3) and b.tokens[:2, :2].tolist() == [[104, 105], [106, 107]]
    assert b.tokens[:2, 2].tolist() == [step.pad] * 2 and not b.mask[:2, 2].any() and b.mask[:2, :2].all()
    assert b.tokens[2:].tolist() == [[200, 201, 202], [203, 204, 205]] and b.mask[2:].all()
    assert b.inputs["input_ids"].shape[0] == 2 and b.answers == [WorldDataset(8)[i]["answer"] for i in (1, 2)]


# mutation audit (stage 2's loop)

def test_a_resumed_run_equals_the_uninterrupted_one(tmp_path):
    """Stopped after step 1 and resumed to step 2, a run ends where the same run without the stop ends: the same
    adapter weights, the same history (what resume restores: step, LoRA, optimizer, RNG). sft_weight > 0 makes every
    step update (a step whose groups all score the same would otherwise leave nothing to restore)."""
    def final(name, steps):
        out = tmp_path / name
        for n, resume in steps:
            train_stage2(_cfg(tmp_path, output_dir=str(out), max_steps=n, eval_samples=2, sft_weight=1.0),
                         resume=resume)
        state = torch.load(out / "checkpoint-2" / "trainer_state.pt", weights_only=True)
        return state, json.loads((out / "train_summary.json").read_text())

    whole, whole_summary = final("whole", [(2, False)])
    split, split_summary = final("split", [(1, False), (2, True)])
    assert split_summary["resumed_from"].endswith("checkpoint-1") and split_summary["global_step"] == 2
    assert [h["step"] for h in split_summary["history"]] == [1, 2]
    assert not any("skipped" in h for h in whole_summary["history"])  # both steps moved the adapter
    assert split_summary["history"] == whole_summary["history"]
    assert whole["lora"].keys() == split["lora"].keys()
    for k, v in whole["lora"].items():
        assert torch.equal(v, split["lora"][k]), k
    assert any(bool(v.abs().sum() > 0) for k, v in whole["lora"].items() if "lora_B" in k)  # the adapter moved


_STATS = {"reward": 0.0, "reward_std": 0.0, "kl": 0.0, "kept_frac": 0.5, "answer_len": 1.0, "mixed_groups": 0.0}


@pytest.fixture
def indexed_world(monkeypatch):
    """World items carry their dataset index ``i`` (to see which prompts a step drew)."""
    get = WorldDataset.__getitem__
    monkeypatch.setattr(WorldDataset, "__getitem__", lambda self, i: {**get(self, i), "i": i})


def test_each_step_takes_the_next_prompts_with_distinct_seeds_and_the_last_step_evals_and_saves(
        tmp_path, monkeypatch, indexed_world):
    """Steps walk one shuffled pass over the prompts, prompts_per_step at a time, wrapping around; every rollout of
    the run samples with its own seed; the last step evaluates and saves a checkpoint even when it is not a multiple
    of eval_steps / save_steps (a longer run resumes from it)."""
    calls = []

    def step_call(self, items, seeds):
        calls.append(([it["i"] for it in items], list(seeds)))
        return dict(_STATS)

    monkeypatch.setattr(GRPOStep, "__call__", step_call)
    kw = dict(train_samples=5, eval_samples=2, prompts_per_step=2, num_generations=2, max_steps=3, eval_steps=2)
    train_stage2(_cfg(tmp_path, save_steps=2, seed=7, output_dir=str(tmp_path / "seed7"), **kw))
    other = [i for i, _ in calls]
    calls.clear()
    train_stage2(_cfg(tmp_path, save_steps=2, **kw))
    drawn = [i for i, _ in calls]
    assert drawn != other  # the order is shuffled by the run's seed
    assert len(drawn) == 3 and sorted(drawn[0] + drawn[1] + drawn[2][:1]) == [0, 1, 2, 3, 4]  # one pass: all 5
    assert drawn[2][1] == drawn[0][0]  # then the pass starts again
    seeds = [s for _, ss in calls for s in ss]
    assert len(seeds) == 12 and len(set(seeds)) == 12  # 3 steps x 2 prompts x G = 2 rollouts, each its own seed
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert [e["step"] for e in summary["evals"]] == [0, 2, 3]
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]


def test_dynamic_sampling_draws_continue_across_steps_batches_and_a_resume(tmp_path, monkeypatch, indexed_world):
    """With dynamic_sampling each draw takes the next prompts_per_step prompts where the last one stopped (within a
    step, across steps, and after a resume), and every rollout batch of a step has its own seeds."""
    def mixed_step(self, draw, seeds):
        calls.append(([[it["i"] for it in draw()] for _ in range(2)], [seeds(0), seeds(1)]))
        return dict(_STATS)

    monkeypatch.setattr(GRPOStep, "mixed_step", mixed_step)
    runs = {}
    for name, steps in (("whole", [(2, False)]), ("split", [(1, False), (2, True)])):
        calls = []
        for n, resume in steps:
            train_stage2(_cfg(tmp_path, output_dir=str(tmp_path / name), train_samples=8, eval_samples=2,
                              prompts_per_step=2, num_generations=2, dynamic_sampling=1, max_steps=n), resume=resume)
        runs[name] = calls
    draws = [d for batches, _ in runs["whole"] for d in batches]
    assert sorted(i for d in draws for i in d) == list(range(8))  # 4 draws of 2: one pass over the 8 prompts
    assert runs["split"] == runs["whole"]
    for _, (s0, s1) in runs["whole"]:
        assert len(set(s0) | set(s1)) == 8  # 2 batches x 2 prompts x G = 2, each rollout its own seed


def test_the_optimizer_step_clips_the_gradient_and_follows_the_lr_schedule(tmp_path, monkeypatch):
    """lr per step (0-based s, warmup W = int(warmup_ratio * max_steps)): base (s + 1) / W while s < W, then
    base / 2 (1 + cos(pi (s - W) / (max_steps - W))); here W = 2 of 4 steps: 0.5, 1, 1, 0.5 x base. Each
    checkpoint-N's optimizer holds the lr of step N's update. The LoRA gradient is clipped to max_grad_norm before
    the step: AdamW's first moment after one step is (1 - beta1) g, so its norm is 0.1 x max_grad_norm."""
    def step_call(self, items, seeds):
        for p in lora_parameters(self.model):
            p.grad = torch.ones_like(p)  # norm sqrt(#LoRA weights) >> max_grad_norm
        self.optimizer_step()  # every step updates (no rollout needed to see the schedule)
        return dict(_STATS)

    monkeypatch.setattr(GRPOStep, "__call__", step_call)
    train_stage2(_cfg(tmp_path, learning_rate=1e-3, warmup_ratio=0.5, max_steps=4, save_steps=1, eval_steps=4,
                      eval_samples=2, max_grad_norm=0.5))
    states = [torch.load(tmp_path / "run" / f"checkpoint-{n}" / "trainer_state.pt", weights_only=True)["optimizer"]
              for n in range(1, 5)]
    assert [s["param_groups"][0]["lr"] for s in states] == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4], rel=1e-9)
    m = torch.cat([v["exp_avg"].flatten() for v in states[0]["state"].values()])
    assert float(m.norm()) == pytest.approx(0.1 * 0.5, rel=1e-3)


def test_the_periodic_eval_applies_the_cap_and_the_prompt_suffix(policy, monkeypatch):
    """evaluate_exact scores the inference path: the module's masks under ``cap`` (no sample keeps more) and the
    questions with the prompt suffix appended, as in training."""
    from glimpseprune.api import PrunedModel
    from glimpseprune.training.stage2 import evaluate_exact

    model, processor, module = policy
    items = [WorldDataset(4)[i] for i in range(4)]
    free = evaluate_exact(model, processor, module, items, None, None)
    asked = []
    generate = PrunedModel.generate

    def spy(self, *a, **kw):
        out = generate(self, *a, **kw)
        asked.extend(kw["questions"])
        assert all(k / v <= 0.02 + 1e-9 for k, v in zip(out.n_kept, out.n_vis))  # each sample within the cap
        return out

    monkeypatch.setattr(PrunedModel, "generate", spy)
    capped = evaluate_exact(model, processor, module, items, 0.02, "One word.")
    assert free["kept_frac"] > 0.02 >= capped["kept_frac"] and capped["n"] == free["n"] == 4
    assert asked == [f"{it['question']}\nOne word." for it in items]


def test_cap_1_is_accepted_and_image_root_reaches_the_train_and_eval_data(tmp_path):
    """cap is a kept fraction in (0, 1]: 1 (no cap in effect) is a valid value; ``image_root`` is where the train and
    eval records' relative image paths start (Visual-CoT's cot_image_data/)."""
    from glimpseprune.testing import random_image
    from glimpseprune.training.stage2 import _datasets

    assert _cfg(tmp_path, cap=1.0).cap == 1.0
    with pytest.raises(ValueError, match="cap must be in"):
        _cfg(tmp_path, cap=0.0)
    (tmp_path / "images" / "gqa").mkdir(parents=True)
    random_image(64, 48, seed=2).save(tmp_path / "images" / "gqa" / "1.jpg")
    row = {"question_id": "viscot-1", "image": "gqa/1.jpg", "question": "What is it?", "answer": "a cup",
           "width": 64, "height": 48, "bboxs": [[1, 1, 20, 20]]}
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "train.jsonl").write_text(json.dumps(row) + "\n")
    data = str(tmp_path / "meta" / "train.jsonl")
    train, evals = _datasets(_cfg(tmp_path, train_data=data, eval_data=data, image_root=str(tmp_path / "images")))
    assert train[0]["image"].size == (64, 48) and evals[0]["image"].size == (64, 48)


def test_co_trained_vip_moves_with_dynamic_sampling_too(tmp_path):
    """mask_source vip_cotrain with dynamic_sampling > 0: the module still takes its stage-1 step every step (the
    dynamic-sampling path used to skip it, so the module saved was the frozen one, silently)."""
    before = load_module(resolve_module("embedded")).state_dict()
    plus = train_stage2(_cfg(tmp_path, mask_source="vip_cotrain", dynamic_sampling=1, max_steps=1, eval_samples=2))
    after = load_module(plus, allow_without_adapter=True).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    hist = json.loads((tmp_path / "run" / "train_summary.json").read_text())["history"]
    assert len(hist) == 1 and hist[0]["vip_loc_loss"] > 0 and hist[0]["rollout_batches"] >= 1
