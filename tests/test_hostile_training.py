"""Stage-1 training against hostile folders and configs: a run folder holds one run of one config (refused without
--resume / --overwrite, --overwrite removes only our files, --resume needs a checkpoint and the same config),
unwritable output paths fail before the base model loads, Stage1Config validates every field, and the run's files
are written atomically."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

import glimpseprune as gp
from glimpseprune.data import world
from glimpseprune.data.records import write_split
from glimpseprune.training import trainer as T
from glimpseprune.training.stage1 import Stage1Config, Stage1Model

SMALL = world.WorldConfig(min_cells=4, max_cells=5, min_objects=2, max_objects=3)  # small canvases: fast on a CPU
TINY_MODULE = dict(vip_width=32, cond_width=32, vip_heads=4, vip_mlp_width=64)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("records")
    return (write_split(root, n=4, seed=11, cfg=SMALL, name="train.jsonl"),
            write_split(root, n=2, seed=12, cfg=SMALL, name="eval.jsonl"))


@pytest.fixture(scope="module")
def make_cfg(tiny_dir, data):
    def make(out, **kw) -> Stage1Config:
        fields = dict(model=str(tiny_dir), output_dir=str(out), train_data=str(data[0]), eval_data=str(data[1]),
                      eval_samples=2, batch_size=2, max_steps=2, save_steps=1, eval_steps=100, logging_steps=1,
                      threads=1, module=TINY_MODULE)
        return Stage1Config(**{**fields, **kw})

    return make


@pytest.fixture
def no_load(monkeypatch):
    """The folder checks must fail before the base model loads."""

    def refuse(*a, **kw):
        raise AssertionError("the base model loaded before the output folder was checked")

    monkeypatch.setattr(T, "load_base", refuse)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, make_cfg):
    """One real 2-step run (checkpoint-1, checkpoint-2, module/, summary); tests copy it before changing it."""
    out = tmp_path_factory.mktemp("run") / "out"
    seen = []
    forward = Stage1Model.forward

    def spy(self, *a, **kw):
        seen.append((out / T.RUN_CONFIG).is_file())
        return forward(self, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Stage1Model, "forward", spy)
        T.train(make_cfg(out))
    assert seen and all(seen), "run_config.json must exist before the first training step"
    return out


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------- a finished run


def test_run_writes_config_and_nothing_temporary(finished_run, make_cfg):
    assert names(finished_run) == ["checkpoint-1", "checkpoint-2", "module", "run_config.json", "train_summary.json"]
    record = json.loads((finished_run / "run_config.json").read_text())
    assert record["format"] == 1 and record["config"] == json.loads(json.dumps(make_cfg(finished_run).__dict__))
    summary = json.loads((finished_run / "train_summary.json").read_text())
    assert summary["resumed"] is False and summary["resumed_from"] is None and summary["global_step"] == 2


# --------------------------------------------------------------------------- a folder that already holds a run


@pytest.mark.parametrize("existing", ["run_config.json", "train_summary.json", "module", "checkpoint-3"])
def test_new_run_into_a_run_folder_is_refused(tmp_path, make_cfg, no_load, existing):
    out = tmp_path / "out"
    out.mkdir()
    (out / existing).mkdir() if "." not in existing else (out / existing).write_text("{}")
    with pytest.raises(ValueError, match="already holds a training run") as e:
        T.train(make_cfg(out))
    assert str(out) in str(e.value) and "--resume" in str(e.value) and "--overwrite" in str(e.value)
    assert names(out) == [existing]


def fake_run(out: Path, *extra: str) -> Path:
    """The files of an older version's run (no run_config.json), without training one."""
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (out / "module").mkdir()
    (out / "train_summary.json").write_text("{}")
    for name in extra:
        (out / name).write_text("x")
    return out


def test_resume_and_overwrite_exclude_each_other(tmp_path, make_cfg, no_load):
    out = fake_run(tmp_path / "out", "run_config.json")
    with pytest.raises(ValueError, match="exclude each other"):
        T.train(make_cfg(out), resume=True, overwrite=True)
    assert names(out) == ["checkpoint-2", "module", "run_config.json", "train_summary.json"]


def test_overwrite_replaces_exactly_the_old_run(tmp_path, make_cfg):
    out = tmp_path / "out"
    (out / "checkpoint-7").mkdir(parents=True)  # an older version's run: no run_config.json
    (out / "checkpoint-7" / "trainer_state.json").write_text("{}")
    (out / "module").mkdir()
    (out / "module" / "stale.bin").write_text("old")
    (out / "train_summary.json").write_text('{"global_step": 7}')
    (out / f"{T.TMP_PREFIX}module-dead").mkdir()  # a crashed write's leftover
    T.train(make_cfg(out, max_steps=1), overwrite=True)
    assert names(out) == ["checkpoint-1", "module", "run_config.json", "train_summary.json"]
    assert not (out / "module" / "stale.bin").exists()
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["global_step"] == 1 and summary["resumed"] is False


def test_overwrite_never_deletes_other_files(tmp_path, make_cfg, no_load):
    out = fake_run(tmp_path / "out", "notes.txt")
    with pytest.raises(ValueError, match="'notes.txt'.*did not write"):
        T.train(make_cfg(out), overwrite=True)
    assert names(out) == ["checkpoint-2", "module", "notes.txt", "train_summary.json"]


def test_folder_with_only_other_files_is_trained_into(tmp_path, make_cfg):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("my experiments")
    assert T.check_output_dir(make_cfg(out)) is None
    assert T.check_output_dir(make_cfg(out), overwrite=True) is None
    assert names(out) == ["README.md"]


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize("held", [None, "empty", "run_config.json"])
def test_resume_without_a_checkpoint_is_refused(tmp_path, make_cfg, no_load, held):
    out = tmp_path / "out"
    if held:
        out.mkdir()
    if held == "run_config.json":  # a run that stopped before its first checkpoint
        (out / held).write_text(json.dumps({"format": 1, "config": make_cfg(out).__dict__}))
    with pytest.raises(ValueError, match="nothing to resume in") as e:
        T.train(make_cfg(out), resume=True)
    assert str(out) in str(e.value)
    if held == "run_config.json":
        assert "--overwrite" in str(e.value)


def test_resume_of_a_folder_without_run_config_is_refused(tmp_path, make_cfg, no_load):
    out = fake_run(tmp_path / "out")
    with pytest.raises(ValueError, match="no run_config.json.*older glimpseprune.*--overwrite"):
        T.train(make_cfg(out), resume=True)


@pytest.mark.parametrize("text", ['{"format": 1}', '{"config": "boxes"}', "[1, 2]", "{not json"])
def test_resume_with_a_damaged_run_config_is_refused_by_name(tmp_path, make_cfg, no_load, text):
    out = tmp_path / "out"
    (out / "checkpoint-1").mkdir(parents=True)
    (out / "checkpoint-1" / "trainer_state.json").write_text("{}")
    (out / T.RUN_CONFIG).write_text(text)
    with pytest.raises(ValueError, match=f"cannot resume {out}: {out / T.RUN_CONFIG} .*pass --overwrite"):
        T.check_output_dir(make_cfg(out), resume=True)


def test_logged_parts_are_the_mean_over_the_steps_since_the_last_log(monkeypatch):
    from transformers import Trainer

    seen = []
    monkeypatch.setattr(Trainer, "log", lambda self, logs, *a, **kw: seen.append(logs))
    cls = T._trainer_class()
    tr = cls.__new__(cls)  # no model needed: log only reads and resets the sums
    tr._sums, tr._counts = {"train": {"loc_loss": 3.0}, "eval": {"iou": 1.0}}, {"train": 2, "eval": 4}
    tr.log({"loss": 1.0})
    tr.log({"eval_loss": 2.0})
    tr.log({"loss": 0.5})  # nothing summed since: no parts, no division by zero
    assert seen == [{"loss": 1.0, "loc_loss": 1.5}, {"eval_loss": 2.0, "eval_iou": 0.25}, {"loss": 0.5}]


def test_resume_with_another_config_lists_the_differences(finished_run, tmp_path, make_cfg, no_load):
    out = copy_run(finished_run, tmp_path / "out")
    with pytest.raises(ValueError, match="config differs") as e:
        T.train(make_cfg(out, learning_rate=5e-3, seed=7, mode="kl", max_steps=9), resume=True)
    msg = str(e.value)
    assert "learning_rate: run 0.001, now 0.005" in msg and "seed: run 42, now 7" in msg and "mode:" in msg
    assert "max_steps:" not in msg  # extending a run is allowed
    (out / "run_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot be read"):
        T.train(make_cfg(out), resume=True)


@pytest.mark.parametrize("cut", [False, True])
def test_resume_reports_its_checkpoint(finished_run, tmp_path, make_cfg, caplog, cut):
    out = copy_run(finished_run, tmp_path / "out")
    if cut:  # checkpoint-2 was cut short while saving: resume from checkpoint-1
        (out / "checkpoint-2" / "trainer_state.json").unlink()
    want = out / ("checkpoint-1" if cut else "checkpoint-2")
    caplog.set_level(logging.INFO, logger=T.__name__)
    T.train(make_cfg(out, max_steps=3, save_steps=100, logging_steps=5), resume=True)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["resumed"] is True and summary["resumed_from"] == str(want)
    assert summary["global_step"] == 3 and summary["config"]["max_steps"] == 3
    assert any(f"from {want}" in r.getMessage() for r in caplog.records)
    assert json.loads((out / "run_config.json").read_text())["config"]["max_steps"] == 3
    assert not [n for n in names(out) if n.startswith(T.TMP_PREFIX)]


# --------------------------------------------------------------------------- unwritable output paths


def test_unwritable_output_dir_fails_before_loading(tmp_path, make_cfg, no_load):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for out in (blocker / "run", blocker):
        with pytest.raises(ValueError, match="^output_dir") as e:  # the setting named (tmp_path holds the word too)
            T.train(make_cfg(out))
        assert str(out) in str(e.value)
    assert blocker.read_text() == "x"


def test_resume_into_a_file_is_named_as_one(tmp_path, make_cfg, no_load):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        T.check_output_dir(make_cfg(blocker), resume=True)
    assert blocker.read_text() == "x"


def test_checkpoints_are_ordered_by_step_not_by_name(tmp_path):
    for n in (2, 9, 10):
        (tmp_path / f"checkpoint-{n}").mkdir()
    assert [p.name for p in T._checkpoints(tmp_path)] == ["checkpoint-10", "checkpoint-9", "checkpoint-2"]


@pytest.mark.parametrize("inside", ["module/train.jsonl", "checkpoint-1/sub/train.jsonl"])
def test_overwrite_refuses_a_run_whose_input_lies_in_its_files(tmp_path, make_cfg, no_load, inside):
    out = tmp_path / "out"
    data = out / inside
    data.parent.mkdir(parents=True)
    data.write_text("{}\n")
    with pytest.raises(ValueError, match="--overwrite refused: train_data .* lies in"):
        T.check_output_dir(make_cfg(out, train_data=str(data)), overwrite=True)
    assert data.read_text() == "{}\n"


def test_overwrite_unlinks_a_linked_run_folder_and_keeps_its_target(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("x")
    out = tmp_path / "out"
    out.mkdir()
    (out / "module").symlink_to(mine, target_is_directory=True)
    assert [p.name for p in T.remove_run_files(out)] == ["module"]
    assert names(out) == [] and (mine / "keep.txt").read_text() == "x"


def test_run_config_records_the_digest_of_each_input(finished_run, data):
    import hashlib

    inputs = json.loads((finished_run / T.RUN_CONFIG).read_text())["inputs"]
    for name, path in (("train_data", data[0]), ("eval_data", data[1])):  # sha256 of the file's name, NUL, bytes
        assert inputs[name] == hashlib.sha256(path.name.encode() + b"\0" + path.read_bytes()).hexdigest()
    assert sorted(inputs) == ["eval_data", "train_data"]  # module: a dict of overrides; no adapter, no file


# --------------------------------------------------------------------------- Stage1Config


def write_yaml(tmp_path, text: str) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_yaml_numeric_strings_become_numbers(tmp_path):
    # YAML 1.1 (PyYAML) reads 1e-3 as a string
    cfg = Stage1Config.from_yaml(write_yaml(tmp_path, 'learning_rate: 1e-3\nbatch_size: "4"\nepochs: 2\n'
                                            "max_steps: -1\nthreads: 2.0\nwarmup_ratio: 5e-2\n"))
    assert cfg.learning_rate == 1e-3 and isinstance(cfg.learning_rate, float)
    assert cfg.batch_size == 4 and isinstance(cfg.batch_size, int)
    assert cfg.epochs == 2.0 and isinstance(cfg.epochs, float) and cfg.max_steps == -1
    assert cfg.threads == 2 and isinstance(cfg.threads, int) and cfg.warmup_ratio == 0.05


@pytest.mark.parametrize("field, value", [
    ("learning_rate", "abc"), ("learning_rate", 0), ("learning_rate", -1e-3), ("learning_rate", float("nan")),
    ("batch_size", 0), ("batch_size", -2), ("batch_size", 2.5), ("batch_size", True), ("batch_size", "many"),
    ("grad_accum", 0), ("grad_accum", -1), ("max_steps", 0), ("max_steps", -2), ("epochs", 0),
    ("eval_samples", 0), ("threads", 0), ("warmup_ratio", 1.5), ("dice_weight", -1), ("seed", -1),
    ("model", ""), ("model", 3), ("train_data", ""), ("module", [1, 2]), ("module", {"vip_widht": 8}),
    ("module", {"base_num_layers": 9}), ("mode", "boxez"), ("warmup_ratio", 1.0), ("seed", 2**32),
    ("dice_weight", float("inf")), ("epochs", "inf"), ("point_families", "counting"),
])
def test_bad_field_is_named(field, value):
    with pytest.raises(ValueError, match=field):
        Stage1Config(**{field: value})


def test_bad_yaml_values_name_file_and_field(tmp_path):
    p = write_yaml(tmp_path, "learning_rate: abc\n")
    with pytest.raises(ValueError, match="learning_rate must be a number") as e:
        Stage1Config.from_yaml(p)
    assert str(p) in str(e.value)


@pytest.mark.parametrize("text, match", [
    ("batch_size: 8\nleraning_rate: 0.1\nfoo: 1\n", r"unknown fields \['foo', 'leraning_rate'\]"),
    ("- 1\n- 2\n", "is a mapping of field: value, got a list"),
    ("just a string\n", "got a str"),
    ("batch_size: [8\n", "is not valid YAML"),
    ("a: b: c\n", "is not valid YAML"),
])
def test_bad_yaml_file_is_named(tmp_path, text, match):
    p = write_yaml(tmp_path, text)
    with pytest.raises(ValueError, match=match) as e:
        Stage1Config.from_yaml(p)
    assert str(p) in str(e.value)


def test_empty_yaml_file_gives_the_defaults(tmp_path):
    assert Stage1Config.from_yaml(write_yaml(tmp_path, "# nothing set\n")) == Stage1Config()


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        Stage1Config.from_yaml(tmp_path / "nope.yaml")


def test_yaml_overrides_are_checked(tmp_path):
    p = write_yaml(tmp_path, "batch_size: 2\n")
    assert Stage1Config.from_yaml(p, output_dir=str(tmp_path / "o"), threads=None).output_dir == str(tmp_path / "o")
    with pytest.raises(ValueError, match="unknown fields \\['bogus'\\]"):
        Stage1Config.from_yaml(p, bogus=1)


# --------------------------------------------------------------------------- atomic writes


def test_summary_write_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "train_summary.json"
    target.write_text('{"old": true}')

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        T.write_json_atomic(target, {"new": list(range(1000))})
    assert target.read_text() == '{"old": true}' and names(tmp_path) == ["train_summary.json"]
    monkeypatch.undo()
    T.write_json_atomic(target, {"new": 1})
    assert json.loads(target.read_text()) == {"new": 1} and names(tmp_path) == ["train_summary.json"]


def test_module_write_is_atomic(finished_run, tmp_path, monkeypatch):
    out = copy_run(finished_run / "module", tmp_path / "module")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    module = gp.load_module(out)
    with torch.no_grad():
        module.vip.out_proj.bias.add_(1.0)

    def killed(mod, folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "glimpse_config.json").write_text("{")  # cut short
        raise OSError("killed mid-write")

    with monkeypatch.context() as mp:
        mp.setattr(T, "save_module", killed)
        with pytest.raises(OSError, match="killed"):
            T.save_module_atomic(module, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and names(tmp_path) == ["module"]
    assert T.save_module_atomic(module, out) == out  # replaces the existing module
    assert names(tmp_path) == ["module"]
    assert torch.equal(gp.load_module(out).vip.out_proj.bias, module.vip.out_proj.bias)


@pytest.mark.parametrize("quiet", [True, False])
def test_training_logs_stay_off_stdout(tmp_path, tiny_dir, data, capsys, quiet):
    """stdout holds results only: the Trainer's per-step log dicts ({'loss': ...}) went there, with -q too; now the
    bar's lines go to stderr, and -q silences them."""
    import yaml

    from glimpseprune.cli import main

    config = tmp_path / "stage1.yaml"
    config.write_text(yaml.safe_dump(dict(model=str(tiny_dir), train_data=str(data[0]), eval_data=str(data[1]),
                                          eval_samples=2, batch_size=2, max_steps=2, save_steps=100, eval_steps=100,
                                          logging_steps=1, threads=1, module=TINY_MODULE)))
    assert main([*(["-q"] if quiet else []), "train", "--config", str(config), "--output-dir",
                 str(tmp_path / "run")]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"wrote {tmp_path / 'run' / 'module'}"], out
    assert ("'loss'" in err) is not quiet, err


def test_empty_or_boxless_records_fail_before_the_model_loads(tmp_path, make_cfg, data, no_load):
    """An empty train_data failed inside torch's sampler after run_config.json was written (so the fixed rerun was
    refused); records without boxes in mode boxes trained the VIP toward empty masks. Both are named before the
    model loads, and nothing is written."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=r"train_data .*empty\.jsonl holds no records"):
        T.train(make_cfg(tmp_path / "a", train_data=str(empty)))
    with pytest.raises(ValueError, match=r"eval_data .*empty\.jsonl holds no records"):
        T.train(make_cfg(tmp_path / "b", eval_data=str(empty)))
    rows = [json.loads(line) for line in data[0].read_text().splitlines()]
    rows[1]["bboxs"] = []
    bare = data[0].parent / "bare.jsonl"
    bare.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"1 of 4 records have no bboxs .*mode boxes needs.*mode: kl"):
        T.train(make_cfg(tmp_path / "c", train_data=str(bare)))
    # a record whose image is gone stopped the run when the Trainer reached it (80 % through, unnamed)
    rows = [json.loads(line) for line in data[0].read_text().splitlines()]
    rows[3]["image"] = "images/gone.png"
    late = data[0].parent / "late.jsonl"
    late.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(FileNotFoundError, match=rf"1 of 4 records name an image that does not exist .*{rows[3]['id']}"):
        T.train(make_cfg(tmp_path / "d", train_data=str(late)))
    assert not any((tmp_path / d).exists() and any((tmp_path / d).iterdir()) for d in "abcd")


def test_merge_into_the_runs_own_folder_is_refused_before_training(tmp_path, capsys):
    import yaml

    from glimpseprune.cli import main

    config = tmp_path / "s2.yaml"
    parent = tmp_path / "p"
    parent.mkdir()
    config.write_text(yaml.safe_dump({"stage": 2, "max_steps": 1, "output_dir": str(parent / "run")}))
    for merge in (parent / "run", parent / "run" / "merged", parent):  # the same, inside it, around it
        assert main(["train", "--config", str(config), "--merge", str(merge)]) == 2
        assert "needs a folder apart from the run's output_dir" in capsys.readouterr().err
    assert not (parent / "run").exists()
