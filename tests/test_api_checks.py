"""The public API's argument checks (``validation``, ``make_method``, ``load``): each bad argument is a named error
before the model runs, never ignored and never a traceback from deep inside torch or transformers; and one model
serves two threads at once without either request seeing the other's tensors."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import IMG_A, QUESTIONS, make_batch, make_images, random_module
from PIL import Image
from transformers import GenerationConfig

import glimpseprune as gp
from glimpseprune.adapters.base import capture_outputs
from glimpseprune.processing import to_rgb
from glimpseprune.validation import (
    check_decoding,
    check_generate_args,
    check_inputs,
    check_prompt_length,
    resolve_dtype,
)

# --------------------------------------------------------------------------- concurrency


def test_capture_outputs_records_only_its_own_thread():
    """A hook opened by one request must not record another thread's forward through the same module (it did: two
    requests on one model swapped their vision taps)."""
    block = torch.nn.Identity()
    opened, other_ran = threading.Event(), threading.Event()

    def other():
        opened.wait(10)
        block(torch.full((2,), 7.0))  # another request's forward while this thread's hooks are on
        other_ran.set()

    thread = threading.Thread(target=other)
    thread.start()
    with capture_outputs({0: block}) as out:
        opened.set()
        assert other_ran.wait(10)
        assert out == {}, "the other thread's output was recorded"
        block(torch.ones(2))
    thread.join(10)
    assert torch.equal(out[0], torch.ones(2))


def test_two_threads_on_one_glimpse_model_get_their_own_keep_masks(model, processor):
    pm = gp.apply(model, "glimpse", module=random_module(model), processor=processor)
    images = [make_images([(168 + 28 * (i % 3), 224)], seed=i) for i in range(6)]
    ref = [pm.generate(images=[ims], questions=QUESTIONS[:1], max_new_tokens=2) for ims in images]
    got: dict[tuple[int, int], torch.Tensor] = {}
    errors: list[BaseException] = []

    def run(worker: int, order: list[int]):
        try:
            for i in order:
                out = pm.generate(images=[images[i]], questions=QUESTIONS[:1], max_new_tokens=2)
                got[worker, i] = out.keep_masks[0]
        except BaseException as err:  # noqa: BLE001  (reported below)
            errors.append(err)

    threads = [threading.Thread(target=run, args=(w, order)) for w, order in ((0, [0, 1, 2, 3, 4, 5]),
                                                                              (1, [5, 4, 3, 2, 1, 0]))]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    assert not errors, errors
    for (_, i), mask in got.items():
        assert torch.equal(mask, ref[i].keep_masks[0]), f"image {i}: keep mask differs under two threads"
    assert len(got) == 12


# --------------------------------------------------------------------------- generate()


def test_inputs_with_questions_is_refused(pm, one):
    with pytest.raises(ValueError, match="not both: got inputs and images, questions"):
        pm.generate(one, images=[[]], questions=["What?"], max_new_tokens=1)


@pytest.mark.parametrize("edit, err, match", [
    (lambda d: {**d, "input_ids": d["input_ids"][0]}, ValueError, "2-D"),
    (lambda d: {**d, "input_ids": d["input_ids"].float()}, TypeError, "integer token ids"),
    (lambda d: {**d, "attention_mask": d["attention_mask"][:, 1:]}, ValueError, "attention_mask"),
    (lambda d: {**d, "pixel_values": d["pixel_values"][:-4]}, ValueError, "pixel_values.*image_grid_thw"),
    (lambda d: {k: v.numpy() for k, v in d.items()}, TypeError, "return_tensors='pt'"),
    (lambda d: {k: v for k, v in d.items() if k != "input_ids"}, ValueError, "no 'input_ids'"),
    (lambda d: "hello", TypeError, "processor's output"),
])
def test_malformed_inputs_are_named(pm, one, edit, err, match):
    with pytest.raises(err, match=match):
        pm.generate(edit(dict(one)), max_new_tokens=1)


def test_int32_input_ids_give_the_same_tokens(pm, one):
    ref = pm.generate(one, max_new_tokens=4).sequences
    assert check_inputs(one)["input_ids"].dtype == torch.int64
    assert torch.equal(pm.generate({**one, "input_ids": one["input_ids"].int()}, max_new_tokens=4).sequences, ref)


@pytest.mark.parametrize("kwargs, match", [
    (dict(do_sample=True, top_p=-1.0), "top_p"),
    (dict(do_sample=True, top_k=-1), "top_k"),
    (dict(repetition_penalty=0.0), "penalty"),
    (dict(bad_words_ids=[[10**6]]), "bad_words_ids"),
    (dict(eos_token_id=10**6), "eos_token_id: 1000000 is not a token id"),
    (dict(eos_token_id=-5), "eos_token_id: -5 is not a token id"),
    (dict(seed=2**70), r"seed must be in \[0, 2\*\*64\)"),
])
def test_bad_generation_settings_fail_before_the_prefill(pm, one, kwargs, match, monkeypatch):
    import glimpseprune.runtime.engine as engine

    def no_prefill(*a, **k):
        raise AssertionError("the prefill ran before the settings were checked")

    monkeypatch.setattr(engine, "prefill", no_prefill)
    with pytest.raises(ValueError, match=match):
        pm.generate(one, max_new_tokens=2, **kwargs)


def test_do_sample_must_be_a_bool(pm, one):
    with pytest.raises(TypeError, match="do_sample must be True or False"):
        pm.generate(one, do_sample="False", max_new_tokens=1)
    with pytest.raises(TypeError, match="stop_strings must be a string or a list"):
        pm.generate(one, stop_strings=5, max_new_tokens=1)


def test_stop_strings_without_a_tokenizer(model, one):
    with pytest.raises(ValueError, match="stop_strings need a tokenizer"):
        gp.apply(model, "full").generate(one, stop_strings=["x"], max_new_tokens=2)


def test_streamer_needs_one_sample(pm, processor):
    from transformers import TextStreamer

    two = make_batch(processor, [IMG_A, IMG_A], QUESTIONS[:2])
    with pytest.raises(ValueError, match="streamer takes a batch of one sample, got 2"):
        pm.generate(two, streamer=TextStreamer(processor.tokenizer), max_new_tokens=1)


def test_running_past_the_context_warns(pm, one, caplog):
    """As ``model.generate`` warns: prompt + max_new_tokens over the context (checked on the resolved config, so the
    test decodes nothing)."""
    from glimpseprune.runtime.engine import resolve_generation_config
    from glimpseprune.validation import check_decoding

    limit = pm.model.config.get_text_config().max_position_embeddings
    L = one["input_ids"].shape[1]
    with caplog.at_level("WARNING", logger="glimpseprune.validation"):
        check_decoding(pm.model, resolve_generation_config(max_new_tokens=limit - L - 1), 1, L, limit)
        assert "context" not in caplog.text
        check_decoding(pm.model, resolve_generation_config(max_new_tokens=limit - L), 1, L, limit)
    assert "may run past the model's context" in caplog.text


# --------------------------------------------------------------------------- methods and their arguments


def test_keep_masks_to_a_method_that_takes_none_is_refused(model, processor, one):
    n_vis = 64
    for method in ("full", "fastv"):
        with pytest.raises(ValueError, match="does not take keep_masks"):
            gp.apply(model, method, processor=processor).generate(
                one, keep_masks=[torch.ones(n_vis, dtype=torch.bool)], max_new_tokens=1)


def test_mask_refuses_a_grid_shaped_mask(model, processor, one):
    grid = torch.zeros(8, 8, dtype=torch.bool)
    grid[0, :3] = True
    with pytest.raises(ValueError, match=r"keep_masks\[0\] has shape \(8, 8\)"):
        gp.apply(model, "mask", prune_layer=1).generate(one, keep_masks=[grid.T.contiguous()], max_new_tokens=1)
    flat = gp.apply(model, "mask", prune_layer=1).generate(one, keep_masks=[grid.flatten()], max_new_tokens=1)
    oracle = gp.apply(model, "oracle", prune_layer=1).generate(one, keep_masks=[grid], max_new_tokens=1)
    assert torch.equal(flat.keep_masks[0], oracle.keep_masks[0])


@pytest.mark.parametrize("value", [1.5, True, "x"])
def test_mask_prune_layer_is_checked(model, value):
    with pytest.raises(ValueError, match="prune_layer must be an integer"):
        gp.apply(model, "mask", prune_layer=value)


def test_numpy_scalars_are_numbers(model):
    assert gp.apply(model, "fastv", keep_ratio=np.float32(0.5)).method.config.keep_ratio == 0.5
    assert gp.apply(model, "random", keep_ratio=0.5, prune_layer=np.int64(1)).method.config.prune_layer == 1
    with pytest.raises(ValueError, match="keep_ratio must be a number in"):
        gp.apply(model, "fastv", keep_ratio=torch.tensor(0.5))


def test_arguments_a_method_would_ignore_are_refused(model, processor):
    module = random_module(model)
    with pytest.raises(ValueError, match="'fastv' takes no module"):
        gp.apply(model, "fastv", module=module)
    with pytest.raises(ValueError, match="selection settings apply to"):
        gp.apply(model, "fastv", selection=gp.SelectionConfig(max_keep_ratio=0.01))
    gp.apply(model, "fastv", selection=gp.SelectionConfig())  # the defaults change nothing: accepted


@pytest.mark.parametrize("call, err, match", [
    (lambda m, mod: gp.apply(m, 5), TypeError, "method must be a method name"),
    (lambda m, mod: gp.apply(m, "glimpse", module="some/dir"), TypeError, "gp.load_module"),
    (lambda m, mod: gp.apply(m, "glimpse", module=mod, selection={"threshold": 0.9}), TypeError, "SelectionConfig"),
    (lambda m, mod: gp.PrunedModel(m, "fastv"), TypeError, "PruningMethod"),
    (lambda m, mod: gp.apply(torch.nn.Linear(2, 2), "full"), TypeError, "vision-language model"),
])
def test_apply_checks_its_arguments(model, call, err, match):
    with pytest.raises(err, match=match):
        call(model, random_module(model))


def test_a_non_finite_module_is_refused(model, tmp_path):
    bad = random_module(model)
    with torch.no_grad():
        next(bad.parameters()).fill_(float("nan"))
    with pytest.raises(ValueError, match="holds NaN or Inf"):
        gp.apply(model, "glimpse", module=bad)
    with pytest.raises(ValueError, match="holds NaN or Inf"):
        gp.save_module(bad, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_save_module_checks_its_arguments(model, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="it is a file, not a folder"):
        gp.save_module(random_module(model), tmp_path / "file")
    with pytest.raises(TypeError, match="takes a glimpse or early module"):
        gp.save_module("x", tmp_path / "out")


def test_select_tokens_inputs():
    with pytest.raises(TypeError, match="1-D torch tensor"):
        gp.select_tokens([0.9, 0.1])
    nan = float("nan")
    assert gp.select_tokens(torch.tensor([0.9, nan, 0.6, 0.1]), fixed_keep_ratio=0.25).tolist() == [True, False,
                                                                                                      False, False]
    assert gp.select_tokens(torch.tensor([0.9, nan, 0.6, 0.7]), max_keep_ratio=0.5).tolist() == [True, False,
                                                                                                  False, True]


# --------------------------------------------------------------------------- load / load_module


def test_load_checks_before_loading(tiny_dir, tmp_path, monkeypatch):
    import glimpseprune.api as api

    def no_load(*a, **k):
        raise AssertionError("the base model loaded before the arguments were checked")

    monkeypatch.setattr(api, "load_base", no_load)
    with pytest.raises(TypeError, match=r"unknown argument\(s\) \['modul'\]"):
        gp.load(tiny_dir, modul="x")
    with pytest.raises(TypeError, match=r"unknown argument\(s\) \['keep'\].*keep_ratio"):
        gp.load(tiny_dir, method="fastv", keep=0.5)
    with pytest.raises(KeyError, match="unknown pruning method 'fastvv'"):
        gp.load(tiny_dir, method="fastvv")
    with pytest.raises(ValueError, match="CUDA is not available|only .* CUDA device"):
        gp.load(tiny_dir, device="cuda:99")
    with pytest.raises(ValueError, match="is not a torch device"):
        gp.load(tiny_dir, device="xyz")
    with pytest.raises(ValueError, match="meta"):
        gp.load(tiny_dir, device="meta")


def test_corrupt_model_weights_are_named(tiny_dir, tmp_path):
    import shutil

    bad = tmp_path / "model"
    shutil.copytree(tiny_dir, bad)
    (weights,) = bad.glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[:len(weights.read_bytes()) // 2])
    with pytest.raises(ValueError, match=f"cannot read the weights in {bad}"):
        gp.load(bad)


def test_load_refuses_a_module_the_method_would_ignore(tiny_dir, model, tmp_path):
    gp.save_module(random_module(model), tmp_path / "mod")
    with pytest.raises(ValueError, match="'fastv' does not use the module"):
        gp.load(tiny_dir, module=tmp_path / "mod", method="fastv")


@pytest.mark.parametrize("dtype", [torch.int8, "int8", "float8_e4m3fn", "complex64"])
def test_dtypes_a_model_cannot_run_in_are_refused(dtype):
    with pytest.raises(ValueError, match="dtype must be 'auto' or one of"):
        resolve_dtype(dtype)


def test_load_module_takes_dtype_names(model, tmp_path):
    gp.save_module(random_module(model), tmp_path / "mod")
    assert next(gp.load_module(tmp_path / "mod", dtype="bf16").parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be"):
        gp.load_module(tmp_path / "mod", dtype=torch.int8)
    with pytest.raises(ValueError, match="meta"):
        gp.load_module(tmp_path / "mod", device="meta")


# --------------------------------------------------------------------------- images


def test_zero_size_image_is_named(pm):
    with pytest.raises(ValueError, match=r"images\[0\] holds a 0x0 image"):
        pm.generate(images=[[Image.new("RGB", (0, 0))]], questions=["What?"], max_new_tokens=1)


def test_qwen_aspect_limit_is_named(pm):
    with pytest.raises(ValueError, match=r"images\[1\] is 1x2000, 2000 times longer than wide"):
        pm.generate(images=[[Image.new("RGB", (64, 64))], [Image.new("RGB", (1, 2000))]],
                    questions=["What?", "What?"], max_new_tokens=1)


def test_qwen_aspect_limit_is_inclusive(processor):
    from glimpseprune.processing import build_inputs

    assert build_inputs(processor, [[Image.new("RGB", (1, 200))]], ["What?"])["image_grid_thw"].shape == (1, 3)
    with pytest.raises(ValueError, match=r"images\[0\] is 201x1, 201 times longer than wide"):
        build_inputs(processor, [[Image.new("RGB", (201, 1))]], ["What?"])


def test_wide_greyscale_edge_values():
    # mode I holding 8-bit 255 is white (not 16-bit 0x00FF, black); mode I 0/1 (a mask) is 8-bit 0/1, not 0..1
    white = Image.fromarray(np.array([[0, 128, 255]], np.int32))
    assert np.asarray(to_rgb(white))[0, :, 0].tolist() == [0, 128, 255]
    binary = Image.fromarray(np.array([[0, 1]], np.int32))
    assert np.asarray(to_rgb(binary))[0, :, 0].tolist() == [0, 1]
    unit = Image.fromarray(np.array([[0.0, 1.0]], np.float32))  # mode F in 0..1 is scaled
    assert np.asarray(to_rgb(unit))[0, :, 0].tolist() == [0, 255]


def test_wide_greyscale_modes_keep_their_values():
    ramp = np.arange(200, dtype=np.uint8).reshape(10, 20)
    want = np.asarray(to_rgb(Image.fromarray(ramp)))
    for mode in ("I", "F"):  # 8-bit values in a 32-bit container: the same picture, not black
        assert np.array_equal(np.asarray(to_rgb(Image.fromarray(ramp).convert(mode))), want), mode
    sixteen = (ramp.astype(np.int32) * 257)  # a 16-bit image read as mode I (older Pillow decoders)
    assert np.array_equal(np.asarray(to_rgb(Image.fromarray(sixteen))), want)
    unit = Image.fromarray((ramp / 255.0).astype(np.float32))  # mode F in 0..1
    assert np.array_equal(np.asarray(to_rgb(unit)), want)
    for bad in (np.full((3, 3), 70000, np.int32), np.full((3, 3), -1.0, np.float32),
                np.full((3, 3), np.nan, np.float32)):
        with pytest.raises(ValueError, match="convert it to 8-bit yourself"):
            to_rgb(Image.fromarray(bad))


def test_an_over_long_video_prompt_points_at_the_frames():
    from glimpseprune.processing import _check_prompt_lengths

    with pytest.raises(ValueError, match="fewer video frames"):
        _check_prompt_lengths({"input_ids": [[1] * 10], "pixel_values_videos": [[0.0]]}, 8)
    with pytest.raises(ValueError, match="smaller images$"):
        _check_prompt_lengths({"input_ids": [[1] * 10]}, 8)


# mutation audit: rules a one-line change could break unnoticed

def test_prompt_length_counts_the_glimpse_token():
    check_prompt_length({"input_ids": torch.zeros(1, 7, dtype=torch.long)}, limit=8)
    with pytest.raises(ValueError, match="context is 8"):
        check_prompt_length({"input_ids": torch.zeros(1, 8, dtype=torch.long)}, limit=8)


def test_seed_range_is_uint64():
    check_generate_args(4, True, 1.0, 2**64 - 1, None)
    with pytest.raises(ValueError, match="seed"):
        check_generate_args(4, True, 1.0, 2**64, None)


def test_greedy_accepts_temperature_zero_and_sampling_does_not():
    check_generate_args(4, False, 0.0, None, None)
    with pytest.raises(ValueError, match="temperature"):
        check_generate_args(4, True, 0.0, None, None)


def test_eos_id_equal_to_the_vocabulary_size_is_refused():
    model = SimpleNamespace(config=SimpleNamespace(get_text_config=lambda: SimpleNamespace(vocab_size=100)))
    check_decoding(model, GenerationConfig(eos_token_id=99, max_new_tokens=4), 1, 5, None)
    with pytest.raises(ValueError, match="not a token id"):
        check_decoding(model, GenerationConfig(eos_token_id=100, max_new_tokens=4), 1, 5, None)


def test_both_prompt_paths_refuse_a_prompt_that_fills_the_context(pm, one, monkeypatch):
    """The glimpse token needs one more position: a prompt of exactly the context's length is refused before the
    model runs, on the questions= path (prepare) and the inputs= path alike; one position more is accepted."""
    import glimpseprune.api as api

    n = int(one["input_ids"].shape[1])
    image = make_images(IMG_A, seed=0)[0]
    assert int(pm.prepare([[image]], [QUESTIONS[0]])["input_ids"].shape[1]) == n  # the same prompt either way
    monkeypatch.setattr(api, "context_length", lambda model: n)
    with pytest.raises(ValueError, match=f"longer than max_length={n - 1}"):
        pm.prepare([[image]], [QUESTIONS[0]])
    with pytest.raises(ValueError, match=f"the prompt is {n} tokens \\(\\+ 1 glimpse token\\) but the model's "
                                         f"context is {n}"):
        pm.generate(one, max_new_tokens=1)
    monkeypatch.setattr(api, "context_length", lambda model: n + 1)
    assert int(pm.prepare([[image]], [QUESTIONS[0]])["input_ids"].shape[1]) == n
    assert pm.generate(one, max_new_tokens=1).sequences.shape == (1, 1)


def test_a_failed_check_ends_the_streamer(pm, one):
    """A consumer iterating a TextIteratorStreamer in another thread would wait for ever on a generate that failed
    its checks: the streamer is ended first."""
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(pm.processor.tokenizer, timeout=5)
    with pytest.raises(ValueError, match="temperature"):
        pm.generate(one, streamer=streamer, do_sample=True, temperature=-1.0, max_new_tokens=2)
    assert "".join(streamer) == ""  # ended: the iteration stops at once (a timeout would raise queue.Empty)
