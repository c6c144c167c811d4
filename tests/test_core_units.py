"""Unit checks of the registry (names, listings, config-field help), contracts (groups, prompt positions), outputs
(writable paths, atomic writes, run folders, encoding) and the api's small helpers. Most came from a mutation audit:
each fails on a one-line change of the source that the rest of the suite let through."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import random_module
from transformers import GenerationConfig

from glimpseprune.api import (
    PruneOutput,
    _check_method_args,
    _offloaded,
    _split_visuals,
    _token_ids,
    apply,
    base_generation_config,
    execution_device,
    make_method,
    module_dtype,
    module_method_name,
)
from glimpseprune.config import SelectionConfig
from glimpseprune.contracts import Encoded, PrefillState, grid_groups
from glimpseprune.outputs import (
    RUN_MARKER,
    atomic_replace,
    atomic_write_json,
    atomic_write_text,
    atomic_write_text_lines,
    check_new_folder,
    check_writable_file,
    claim_run_dir,
    ensure_writable_dir,
    holds_run,
    read_json,
)
from glimpseprune.registry import (
    ADAPTERS,
    METHODS,
    _fields,
    _layer_expr,
    _summary,
    _where,
    get_adapter,
    get_method,
    list_adapters,
    list_methods,
    register_adapter,
    register_method,
    type_name,
)

# ------------------------------------------------------------------------------------------------------- registry


def test_register_method_refuses_a_name_that_is_not_an_identifier():
    cls = type("Spaced", (), {"name": "two words"})
    try:
        with pytest.raises(ValueError, match="Spaced needs a `name` that is an identifier, got 'two words'"):
            register_method(cls)
        assert "two words" not in METHODS
    finally:
        METHODS.pop("two words", None)


def test_register_method_refuses_a_taken_name_and_keeps_the_first():
    full = get_method("full")
    assert register_method(full) is full  # the same class again (a re-import) is fine
    try:
        with pytest.raises(ValueError, match="method name 'full' is already registered by FullMethod"):
            register_method(type("OtherFull", (), {"name": "full"}))
        assert get_method("full") is full
    finally:
        METHODS["full"] = full


def test_register_adapter_refuses_a_taken_model_type_and_keeps_the_first():
    qwen = get_adapter("qwen2_5_vl")
    assert register_adapter(qwen) is qwen
    try:
        with pytest.raises(ValueError, match="model_type 'qwen2_5_vl' already has adapter " + type(qwen).__name__):
            register_adapter(type("OtherAdapter", (), {"model_types": ("qwen2_5_vl",)})())
        assert get_adapter("qwen2_5_vl") is qwen
    finally:
        ADAPTERS["qwen2_5_vl"] = qwen


def test_layer_expr_names_constant_fractional_and_other_schedules():
    # _SAMPLE_DEPTHS = 24, 28, 32, 36, 40, 48
    assert _layer_expr([1] * 6) == "1"
    assert _layer_expr([5, 6, 7, 8, 9, 11]) == "L/4-1"
    assert _layer_expr([17, 20, 23, 26, 29, 35]) == "3L/4-1"
    assert _layer_expr([8, 9, 10, 12, 13, 16]) == "10 of 32"  # L // 3: no single fraction of L


def test_where_of_a_schedule_whose_length_follows_the_depth():
    class Varying:
        def prune_layers(self, n_layers):
            return tuple(range(n_layers // 8))  # 3 stages at 24 layers, 6 at 48

    assert _where(Varying) == "after layers that depend on the LLM's depth"


def test_summary_strips_the_lead_and_roles_and_ends_the_sentence():
    doc = "``x``: see :func:`glimpseprune.load` and ``gp.apply``. Then more.\n\nSecond paragraph."
    assert _summary(doc) == "See glimpseprune.load and gp.apply."
    assert _summary("keeps every token\n\nMore.") == "Keeps every token."
    assert _summary("") == ""


def test_listings_are_in_name_order():
    names = list_methods()
    assert names == sorted(names) and names.index("early_glimpse") < names.index("glimpse")
    assert list_adapters() == sorted(list_adapters())


def test_fields_read_a_default_factory():
    @dataclasses.dataclass
    class Cfg:
        layers: tuple[int, ...] = dataclasses.field(default_factory=lambda: (3, 5))
        ratio: float | None = None

    assert _fields(Cfg, None) == [{"name": "layers", "type": tuple[int, ...], "default": (3, 5), "group": None},
                                  {"name": "ratio", "type": float | None, "default": None, "group": None}]


def test_type_name_in_words():
    assert type_name(float) == "float"
    assert type_name(int | None) == "int or none"
    assert type_name(tuple[int, ...] | None) == "ints (a,b,...) or none"


# ------------------------------------------------------------------------------------------------------ contracts


def test_grid_groups_keep_images_apart_and_join_each_videos_frame_groups():
    assert grid_groups([-1, -1, 0, 0, -1], 5) == [0, 1, 2, 2, 3]
    assert grid_groups([0, 0], 2) == [0, 0]
    assert grid_groups([0, 1, 1], 3) == [0, 1, 1]
    assert grid_groups([], 3) == [0, 1, 2]
    with pytest.raises(ValueError, match="grid_video has 2 entries for 3 grids"):
        grid_groups([-1, 0], 3)


def test_last_prompt_at_is_before_the_extra_tokens():
    state = PrefillState(model=None, adapter=None, enc=None, cache=None, request={}, n_layers=4, prune_layer=1,
                         key_mask=torch.ones(2, 10, dtype=torch.bool))
    assert state.last_prompt_at == 9
    state.n_extra, state.extra_at = 1, 7
    assert state.last_prompt_at == 6


def test_n_vis_counts_per_sample():
    vis = torch.tensor([[0, 1, 1, 0, 1], [0, 0, 0, 1, 1]], dtype=torch.bool)
    enc = Encoded(embeds=torch.zeros(2, 5, 4), attn_mask=torch.ones(2, 5, dtype=torch.bool),
                  positions=torch.zeros(1, 2, 5, dtype=torch.long), vis_mask=vis, grids=[(1, 3), (1, 2)],
                  image_owner=[0, 1], next_pos=torch.tensor([5, 5]), grid_video=[-1, -1])
    assert enc.n_vis == [3, 2] and enc.grid_groups == [0, 1]


# -------------------------------------------------------------------------------------------------------- outputs


def test_ensure_writable_dir_names_the_file_in_the_way_and_leaves_no_probe(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match=f"cannot write output to {tmp_path / 'f'}: it is a file"):
        ensure_writable_dir(tmp_path / "f")
    with pytest.raises(ValueError, match=f"it has a file in its path \\({tmp_path / 'f'}\\)"):
        ensure_writable_dir(tmp_path / "f" / "sub")
    assert ensure_writable_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert os.listdir(tmp_path / "a" / "b") == []


def test_check_new_folder_lists_at_most_four_files(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="--out .* is a file, not a folder"):
        check_new_folder(tmp_path / "f")
    out = tmp_path / "out"
    out.mkdir()
    for name in "abcd":
        (out / name).write_text("x")
    with pytest.raises(ValueError, match=r"already holds files \(a, b, c, d\); choose"):
        check_new_folder(out)
    (out / "e").write_text("x")
    with pytest.raises(ValueError, match=r"already holds files \(a, b, c, d, ...\); choose"):
        check_new_folder(out)
    assert check_new_folder(out, overwrite=True) == out
    assert sorted(os.listdir(out)) == ["a", "b", "c", "d", "e"]


def test_check_writable_file_refuses_a_folder_and_a_file_for_a_folder(tmp_path):
    with pytest.raises(ValueError, match="it is a folder"):
        check_writable_file(tmp_path)
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="it is a file"):
        check_writable_file(tmp_path / "f" / "out.png")


def test_read_json_names_the_file_and_keeps_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_json(tmp_path / "missing.json")
    (tmp_path / "latin1.json").write_bytes(b'{"a": "\xe9"}')
    with pytest.raises(ValueError, match="shape file .*latin1.json: not JSON"):
        read_json(tmp_path / "latin1.json", "shape file")
    with pytest.raises(ValueError, match="cannot be read"):
        read_json(tmp_path)
    (tmp_path / "ok.json").write_text('{"a": [1, "\u00e9"]}', encoding="utf-8")
    assert read_json(tmp_path / "ok.json") == {"a": [1, "\u00e9"]}


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_atomic_replace_keeps_the_earlier_file_when_the_write_fails(tmp_path, error):
    path = tmp_path / "result.json"
    path.write_text("old")

    def write(tmp):
        assert tmp != path and tmp.parent == tmp_path and path.read_text() == "old"
        tmp.write_text("half")
        raise error

    with pytest.raises(error):
        atomic_replace(path, write)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["result.json"]


def test_atomic_write_text_syncs_before_the_rename(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    atomic_write_text(tmp_path / "a.txt", "text")
    assert (tmp_path / "a.txt").read_text() == "text" and len(synced) == 1


def test_atomic_json_writers_write_lines_and_stringify(tmp_path):
    atomic_write_text_lines(tmp_path / "rows.jsonl", [{"a": 1}, {"b": [2]}])
    assert (tmp_path / "rows.jsonl").read_text() == '{"a": 1}\n{"b": [2]}\n'
    atomic_write_json(tmp_path / "s.json", {"path": Path("x") / "y"})
    text = (tmp_path / "s.json").read_text()
    assert json.loads(text) == {"path": str(Path("x") / "y")} and text.endswith("}\n")


def test_claim_run_dir_records_refuses_and_resumes(tmp_path):
    out = tmp_path / "run"
    assert claim_run_dir(out, "eval", {"n": 1}, ["*.jsonl"]) is None
    assert json.loads((out / RUN_MARKER).read_text()) == {"command": "eval", "settings": {"n": 1}}
    with pytest.raises(ValueError, match=f"already holds results of an earlier run \\({RUN_MARKER}\\); pass --resume"):
        claim_run_dir(out, "eval", {"n": 1}, ["*.jsonl"])  # the record alone marks the folder as a run's
    with pytest.raises(ValueError, match="pass --overwrite to replace them"):
        claim_run_dir(out, "eval", {"n": 1}, ["*.jsonl"], resume_flag="")
    with pytest.raises(ValueError, match="pass one of them"):
        claim_run_dir(out, "eval", {"n": 1}, ["*.jsonl"], resume=True, overwrite=True)
    with pytest.raises(ValueError, match=r"its settings differ \(m: None -> 3; n: 1 -> 2\)"):
        claim_run_dir(out, "eval", {"n": 2, "m": 3}, ["*.jsonl"], resume=True)
    with pytest.raises(ValueError, match="holds a run of `eval`, not of `compare`; cannot resume it"):
        claim_run_dir(out, "compare", {"n": 1}, ["*.jsonl"], resume=True)
    assert claim_run_dir(out, "eval", {"n": 1}, ["*.jsonl"], resume=True) == {"command": "eval", "settings": {"n": 1}}
    (out / RUN_MARKER).write_text('{"command": "eval", "settings": [1]}')
    with pytest.raises(ValueError, match="not a run record"):
        claim_run_dir(out, "eval", {"n": 1}, ["*.jsonl"], resume=True)


def test_claim_run_dir_overwrite_removes_only_owned_files_and_not_a_linked_folder(tmp_path):
    out, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    claim_run_dir(out, "eval", {"n": 1}, ["*.jsonl", "cache"])
    (out / "samples.jsonl").write_text("{}\n")
    (out / "notes.txt").write_text("mine")
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep")
    (out / "cache").symlink_to(elsewhere, target_is_directory=True)
    claim_run_dir(out, "eval", {"n": 2}, ["*.jsonl", "cache"], overwrite=True)
    assert sorted(os.listdir(out)) == [RUN_MARKER, "notes.txt"]
    assert (elsewhere / "keep.txt").read_text() == "keep"
    assert json.loads((out / RUN_MARKER).read_text())["settings"] == {"n": 2}


def test_holds_run_needs_the_result_the_command_and_the_settings_as_json(tmp_path):
    settings = {"sizes": (1, 2), "path": Path("p")}
    claim_run_dir(tmp_path, "make-world", settings, ["records.jsonl"])
    assert not holds_run(tmp_path, "records.jsonl", "make-world", settings)  # no result yet
    (tmp_path / "records.jsonl").write_text("{}\n")
    assert holds_run(tmp_path, "records.jsonl", "make-world", settings)  # tuples and paths as JSON gives them back
    assert not holds_run(tmp_path, "records.jsonl", "eval", settings)
    assert not holds_run(tmp_path, "records.jsonl", "make-world", {**settings, "sizes": (1, 3)})
    (tmp_path / RUN_MARKER).write_text("{not json")
    assert not holds_run(tmp_path, "records.jsonl", "make-world", settings)


# ------------------------------------------------------------------------------------------------------------ api


def test_split_visuals_cuts_images_and_video_frame_groups_per_sample():
    keep = [torch.tensor([1, 0, 0, 1, 1, 1, 0, 1], dtype=torch.bool), torch.tensor([0, 1, 1], dtype=torch.bool)]
    pre = SimpleNamespace(grids=[(2, 2), (1, 2), (1, 2), (1, 3)], image_owner=[0, 0, 0, 1], grid_video=[-1, 0, 0, -1],
                          keep_masks=keep)
    images, videos = _split_visuals(pre)
    assert [m.tolist() for m in images] == [[[True, False], [False, True]], [[False, True, True]]]
    assert [m.tolist() for m in videos] == [[[[True, True]], [[False, True]]]]
    pre.grid_video = []  # a family without video: every entry is an image
    pre.grids, pre.image_owner = [(2, 2), (2, 2), (1, 3)], [0, 0, 1]
    images, videos = _split_visuals(pre)
    assert [m.flatten().tolist() for m in images] == [[True, False, False, True], [True, True, False, True],
                                                      [False, True, True]]
    assert videos == []


def test_prune_output_kept_frac_and_prune_layers():
    out = PruneOutput(sequences=torch.zeros(2, 1, dtype=torch.long), keep_masks=[torch.ones(4, dtype=torch.bool)] * 2,
                      image_keep_masks=[], n_vis=[4, 0], n_kept=[1, 0], kv_len=[5, 3], prune_layer=1,
                      prefill=SimpleNamespace(prune_layers=(1, 3)))
    assert out.kept_frac == [0.25, 1.0]
    d = out.to_dict()
    assert (d["kept_frac"], d["prune_layer"], d["prune_layers"]) == ([0.25, 1.0], 1, [1, 3])


def _fake_model(gen_eos=None, gen_pad=None, text_eos=None):
    text = SimpleNamespace(eos_token_id=text_eos)
    return SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=gen_eos, pad_token_id=gen_pad),
                           config=SimpleNamespace(get_text_config=lambda: text))


def test_token_ids_fall_back_like_model_generate():
    tok = SimpleNamespace(tokenizer=SimpleNamespace(pad_token_id=7))
    no_pad = SimpleNamespace(tokenizer=SimpleNamespace(pad_token_id=None))
    assert _token_ids(_fake_model(gen_eos=[5, 6], text_eos=2), tok) == ([5, 6], None)  # no pad: transformers pads
    assert _token_ids(_fake_model(text_eos=2, gen_pad=3), tok) == (2, 3)  # with EOS ids
    assert _token_ids(_fake_model(), tok) == (None, 7)  # no EOS at all: the tokenizer's pad, then 0
    assert _token_ids(_fake_model(), no_pad) == (None, 0)


def test_module_dtype_and_method_name():
    assert module_dtype(SimpleNamespace(dtype=torch.bfloat16)) == torch.bfloat16
    assert module_dtype(SimpleNamespace(dtype=torch.float16)) == torch.float32
    assert module_dtype(SimpleNamespace(dtype=torch.float32)) == torch.float32
    assert module_method_name(SimpleNamespace(cfg=SimpleNamespace(kind="early"))) == "early_glimpse"
    assert module_method_name(SimpleNamespace(cfg=SimpleNamespace(kind="glimpse"))) == "glimpse"
    assert module_method_name(object()) == "glimpse"


class _TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.lin = torch.nn.Embedding(3, 2), torch.nn.Linear(2, 2)

    def get_input_embeddings(self):
        return self.emb


def test_execution_device_follows_an_accelerate_hook_and_skips_meta_weights():
    model = _TwoLayers()
    assert execution_device(model) == torch.device("cpu") and not _offloaded(model)
    model.emb._hf_hook = SimpleNamespace(hooks=[SimpleNamespace(execution_device="cuda:1", offload=True)])
    assert execution_device(model) == torch.device("cuda:1") and _offloaded(model)
    plain = _TwoLayers()
    plain.emb.to("meta")
    assert execution_device(plain) == torch.device("cpu")


def test_make_method_with_settings_keeps_the_selection(model):
    method = make_method("glimpse", module=random_module(model), selection=SelectionConfig(threshold=0.3),
                         video="per_frame")
    assert method.config.selection == SelectionConfig(threshold=0.3) and method.config.video == "per_frame"


def test_load_arguments_checked_against_the_methods_that_would_run():
    _check_method_args(None, "module-dir", None, {"fill": "score", "video": "per_frame"})  # glimpse / early_glimpse
    with pytest.raises(TypeError, match=r"unknown argument\(s\) \['bogus'\].*method fastv \(its settings: "
                                        r"\['keep_ratio', 'prune_layer'\]\)"):
        _check_method_args("fastv", None, None, {"bogus": 1})


def test_a_given_generation_config_keeps_its_special_tokens(model, processor):
    assert model.generation_config.eos_token_id not in (9, [9]) and model.generation_config.pad_token_id != 8
    gc = base_generation_config(model, processor, GenerationConfig(eos_token_id=9, pad_token_id=8))
    assert (gc.eos_token_id, gc.pad_token_id) == (9, 8)
    assert gc.bos_token_id == model.generation_config.bos_token_id  # unset: filled from the model's
    assert base_generation_config(model, processor).bos_token_id == model.generation_config.bos_token_id is not None


def test_apply_refuses_settings_beside_a_ready_method(model):
    full = make_method("full")
    for extra in (dict(keep_ratio=0.5), dict(selection=SelectionConfig()), dict(module=object())):
        with pytest.raises(ValueError, match="apply\\(\\) got a ready FullMethod and also module= / selection="):
            apply(model, full, **extra)
    assert apply(model, full).method is full


def test_step_logits_only_when_asked(pm, one):
    assert pm.generate(inputs=one, max_new_tokens=2).step_logits is None
    logits = pm.generate(inputs=one, max_new_tokens=2, return_logits=True).step_logits
    assert len(logits) == 2 and logits[0].dtype == torch.float32


def test_text_outputs_are_utf8_whatever_the_locale(tmp_path):
    """Markdown tables carry non-ASCII (an en dash for a missing figure, ≤, ×): written in the locale's encoding they
    failed under an ASCII (or cp1252) locale, and read_json reads UTF-8. A subprocess under the C locale with
    Python's UTF-8 coercion off writes them as UTF-8."""
    import subprocess
    import sys

    code = ("import locale, sys; from glimpseprune.outputs import atomic_write_text; "
            "assert locale.getpreferredencoding(False).lower() in ('ansi_x3.4-1968', 'ascii', 'us-ascii'), "
            "locale.getpreferredencoding(False); atomic_write_text(sys.argv[1], 'ratio \\u2264 1.03 \\u2013 2\\u00d7')")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "t.md")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "t.md").read_bytes() == "ratio ≤ 1.03 – 2×".encode()
