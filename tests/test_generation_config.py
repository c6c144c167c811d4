"""Generation that fits transformers: ``PrunedModel.generate`` with a ``GenerationConfig`` / its keywords, stop
strings, extra EOS ids and streamers equals stock ``model.generate`` (``full`` keeps every token); ``gp.load`` with
``dtype="auto"``, ``device_map`` (accelerate offload to cpu / disk) and the packaged ``"embedded"`` names;
``PruneOutput.to_dict``."""

from __future__ import annotations

import json
import shutil
import threading

import pytest
import torch
from conftest import IMG_A, IMG_C, make_batch, stock_new_tokens
from transformers import GenerationConfig, TextIteratorStreamer
from transformers.generation.streamers import BaseStreamer

import glimpseprune as gp
from glimpseprune.api import execution_device, resolve_dtype
from glimpseprune.runtime.engine import generate

N_NEW = 16


# --------------------------------------------------------------------------- equal to stock generate


def _stop_string(processor, tokens: list[int]) -> tuple[str, int]:
    """A stop string that the greedy output reaches mid-way: the text of a letters-only token first met at >= 3."""
    tok = processor.tokenizer
    for i, t in enumerate(tokens):
        text = tok.decode([t])
        if i >= 3 and text.strip().isalpha() and text.strip() not in tok.decode(tokens[:i]):
            return text.strip(), i
    pytest.skip("no usable stop string in this model's output")


def test_greedy_processors_and_stop_string_equal_stock(model, processor, pm, one):
    kw = dict(max_new_tokens=N_NEW, top_k=5, repetition_penalty=1.3)
    plain = stock_new_tokens(model, one, **kw)
    stop, at = _stop_string(processor, plain[0].tolist())
    ref = stock_new_tokens(model, one, stop_strings=[stop], tokenizer=processor.tokenizer, **kw)
    assert ref.shape[1] < N_NEW and torch.equal(ref[0], plain[0, :ref.shape[1]])  # the stop string did stop it
    out = pm.generate(one, stop_strings=[stop], **kw)
    assert torch.equal(out.sequences, ref)
    assert out.texts[0].rstrip().endswith(stop)
    assert torch.equal(pm.generate(one, **kw).sequences, plain)  # the penalty changes greedy tokens as in stock


def test_repetition_penalty_on_left_padded_batch_equals_stock(model, pm, three):
    kw = dict(max_new_tokens=N_NEW, repetition_penalty=1.5, no_repeat_ngram_size=2)
    assert torch.equal(pm.generate(three, **kw).sequences, stock_new_tokens(model, three, **kw))


@pytest.mark.parametrize("batch", ["one", "three"])
def test_seeded_sampling_equals_stock(model, pm, batch, request):
    inputs = request.getfixturevalue(batch)
    kw = dict(max_new_tokens=N_NEW, do_sample=True, temperature=0.7, top_p=0.9, top_k=20)
    torch.manual_seed(11)
    ref = stock_new_tokens(model, inputs, **kw)
    torch.manual_seed(11)
    out = pm.generate(inputs, **kw)
    assert torch.equal(out.sequences, ref)


def test_generation_config_equals_keywords(model, pm, one):
    kw = dict(max_new_tokens=N_NEW, do_sample=True, temperature=0.8, top_p=0.95, top_k=30, repetition_penalty=1.2)
    results = []
    for call in (lambda: pm.generate(one, generation_config=GenerationConfig(**kw)),
                 lambda: pm.generate(one, **kw),
                 lambda: stock_new_tokens(model, one, generation_config=GenerationConfig(**kw))):
        torch.manual_seed(5)
        results.append(call())
    a, b, ref = results
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.sequences, ref)
    short = pm.generate(one, generation_config=GenerationConfig(**kw), max_new_tokens=3)  # keywords win
    assert short.sequences.shape[1] <= 3


def test_seed_keeps_a_private_generator(pm, one):
    kw = dict(max_new_tokens=N_NEW, do_sample=True, temperature=1.5)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    a = pm.generate(one, seed=7, **kw)
    assert torch.equal(torch.rand(3), expected)  # the global RNG was not consumed
    assert torch.equal(pm.generate(one, seed=7, **kw).sequences, a.sequences)


def test_extra_eos_id_stops_like_stock(model, processor, pm, three):
    plain = pm.generate(three, max_new_tokens=N_NEW)
    row, model_eos = plain.sequences[0].tolist(), list(model.generation_config.eos_token_id)
    extra = row[4]
    assert extra not in model_eos and plain.sequences.shape[1] == N_NEW
    at = row.index(extra)  # its first occurrence
    eos = model_eos + [extra]
    out = pm.generate(three, max_new_tokens=N_NEW, eos_token_id=eos)
    assert out.sequences[0, at].item() == extra and out.sequences.shape[1] > at + 1
    pad = model.generation_config.pad_token_id
    assert (out.sequences[0, at + 1:] == pad).all()  # stopped; padded while the other rows go on
    assert torch.equal(out.sequences, stock_new_tokens(model, three, max_new_tokens=N_NEW, eos_token_id=eos))


def test_a_model_without_pad_pads_finished_rows_like_stock(model, processor, three, monkeypatch):
    """No pad_token_id in the model's generation config: stock pads finished rows with the first EOS id; we padded
    with the tokenizer's pad (with a processor) or token 0 (without), so the sequences differed from stock."""
    plain = gp.apply(model, "full").generate(three, max_new_tokens=N_NEW)
    extra = plain.sequences[0, 4].item()
    monkeypatch.setattr(model.generation_config, "pad_token_id", None)
    want = stock_new_tokens(model, three, max_new_tokens=N_NEW, eos_token_id=[extra])
    for p in (None, processor):
        got = gp.apply(model, "full", processor=p).generate(three, max_new_tokens=N_NEW, eos_token_id=[extra])
        assert torch.equal(got.sequences, want)
    assert (want[0, plain.sequences[0].tolist().index(extra):] == extra).all()  # padded with that EOS id


def test_stop_string_without_eos_leaves_finished_rows_unpadded_like_stock(model, processor, pm, three, monkeypatch):
    """No EOS ids, only a stop string: stock pads finished rows only when an EOS criterion is set, so a row that met
    the stop string keeps its own tokens while the other rows go on (padding there changed row 0 from stock)."""
    tok, pad = processor.tokenizer, model.generation_config.pad_token_id
    monkeypatch.setattr(model.generation_config, "eos_token_id", None)  # stock fills unset fields from it
    gc = GenerationConfig(max_new_tokens=N_NEW, do_sample=False, pad_token_id=pad)
    plain = stock_new_tokens(model, three, generation_config=gc)
    stop = tok.decode(plain[0, 2:3])  # row 0 meets it at step 2, row 1 later
    stop_gc = GenerationConfig(max_new_tokens=N_NEW, do_sample=False, pad_token_id=pad, stop_strings=[stop])
    ref = stock_new_tokens(model, three, generation_config=stop_gc, tokenizer=tok)
    assert stop not in tok.decode(plain[0, :2]) and ref.shape[1] > 4  # the batch runs on after row 0 stopped
    assert torch.equal(ref[0], plain[0, :ref.shape[1]]) and (ref[0, 3:] != pad).all()  # row 0 is not padded
    out, _, _ = generate(model, pm.adapter, pm.method, three, generation_config=stop_gc, tokenizer=tok)
    assert torch.equal(out, ref)


# --------------------------------------------------------------------------- streamers


class Recorder(BaseStreamer):
    def __init__(self):
        self.calls = []

    def put(self, value):
        self.calls.append(("put", value.tolist()))

    def end(self):
        self.calls.append(("end", None))


def test_streamer_calls_equal_stock(model, pm, one):
    kw = dict(max_new_tokens=8, repetition_penalty=1.3)
    ours, ref = Recorder(), Recorder()
    pm.generate(one, streamer=ours, **kw)
    stock_new_tokens(model, one, streamer=ref, **kw)
    assert ours.calls == ref.calls
    assert ours.calls[0] == ("put", one["input_ids"].tolist()) and ours.calls[-1] == ("end", None)


def test_text_iterator_streamer_in_a_thread(processor, pm, one):
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=60)
    result = {}

    def run():
        result["out"] = pm.generate(one, max_new_tokens=N_NEW, streamer=streamer, do_sample=True, seed=3)

    thread = threading.Thread(target=run)
    thread.start()
    streamed = "".join(streamer)
    thread.join(timeout=60)
    assert streamed == result["out"].texts[0]


# --------------------------------------------------------------------------- refused knobs


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(num_beams=2), ValueError, "num_beams"), (dict(num_return_sequences=2), ValueError, "num_return_sequences"),
    (dict(guidance_scale=2.0), ValueError, "guidance_scale"), (dict(not_a_knob=1), TypeError, "not_a_knob"),
    (dict(generation_config={"max_new_tokens": 3}), TypeError, "GenerationConfig")])
def test_unsupported_generation_knobs_are_named(pm, one, kwargs, err, match):
    with pytest.raises(err, match=match):
        pm.generate(one, **kwargs)


def test_defaults_ignore_the_checkpoints_sampling_knobs(model, pm, one):
    """Without generation_config the call is greedy with glimpseprune's defaults even when the checkpoint's
    generation_config asks for sampling; passing it applies it (as model.generate does)."""
    saved = model.generation_config
    model.generation_config = GenerationConfig(**{**saved.to_dict(), "do_sample": True, "temperature": 3.0})
    try:
        greedy = pm.generate(one, max_new_tokens=N_NEW)
        torch.manual_seed(2)
        sampled = pm.generate(one, generation_config=model.generation_config, max_new_tokens=N_NEW)
        torch.manual_seed(2)
        ref = stock_new_tokens(model, one, max_new_tokens=N_NEW)
    finally:
        model.generation_config = saved
    assert torch.equal(greedy.sequences, stock_new_tokens(model, one, max_new_tokens=N_NEW, do_sample=False))
    assert torch.equal(sampled.sequences, ref)


# --------------------------------------------------------------------------- PruneOutput.to_dict


def test_prune_output_to_dict_round_trips(model, processor, module):
    inputs = make_batch(processor, [IMG_A, IMG_C, []])
    out = gp.apply(model, "glimpse", module=module, processor=processor).generate(inputs, max_new_tokens=4)
    back = json.loads(json.dumps(out.to_dict()))
    assert back["texts"] == out.texts and back["sequences"] == out.sequences.tolist()
    assert back["n_vis"] == out.n_vis and back["n_kept"] == out.n_kept and back["kv_len"] == out.kv_len
    assert back["prune_layer"] == out.prune_layer
    assert back["kept_frac"] == pytest.approx([k / n if n else 1.0 for k, n in zip(out.n_kept, out.n_vis)])
    for idx, mask in zip(back["kept_idx"], out.keep_masks):
        assert len(idx) == int(mask.sum()) and torch.equal(torch.zeros_like(mask).index_fill(0, torch.tensor(
            idx, dtype=torch.long), True), mask)
    assert [len(i) for i in back["image_kept_idx"]] == [int(m.sum()) for m in out.image_keep_masks]
    assert back["image_grids"] == [list(m.shape) for m in out.image_keep_masks]
    assert back["timing"] == pytest.approx(out.timing) and back["timing"]["decode_steps"] == out.timing["decode_steps"]


# --------------------------------------------------------------------------- load: dtype, device_map, names


def test_resolve_dtype():
    assert resolve_dtype("auto") == "auto" and resolve_dtype(None) == "auto"
    assert resolve_dtype(torch.bfloat16) is torch.bfloat16
    assert resolve_dtype("bfloat16") is torch.bfloat16 and resolve_dtype("torch.float16") is torch.float16
    assert resolve_dtype("bf16") is torch.bfloat16
    for bad in ("int8", "bogus", 3):
        with pytest.raises(ValueError, match="dtype"):
            resolve_dtype(bad)


def test_auto_dtype_follows_the_checkpoint(tiny_dir, tmp_path):
    bf16_dir = tmp_path / "bf16"
    shutil.copytree(tiny_dir, bf16_dir)
    cfg = bf16_dir / "config.json"
    cfg.write_text(cfg.read_text().replace('"float32"', '"bfloat16"'))
    assert gp.load_base(bf16_dir)[0].dtype == torch.bfloat16  # "auto": the config's dtype
    assert gp.load_base(bf16_dir, dtype="float32")[0].dtype == torch.float32
    assert gp.load_base(tiny_dir, dtype=torch.bfloat16)[0].dtype == torch.bfloat16
    assert gp.load_base(tiny_dir)[0].dtype == torch.float32
    with pytest.raises(ValueError, match="not both"):
        gp.load_base(tiny_dir, device="cpu", device_map="auto")


def offload_map(n_layers: int) -> dict:
    """Qwen2.5-VL modules -> "cpu" / "disk": every other LLM layer and the LM head on disk."""
    lm = "model.language_model"
    dm = {"model.visual": "cpu", f"{lm}.embed_tokens": "cpu", f"{lm}.norm": "disk", f"{lm}.rotary_emb": "cpu",
          "lm_head": "disk"}
    dm.update({f"{lm}.layers.{i}": "disk" if i % 2 else "cpu" for i in range(n_layers)})
    return dm


def _generate_both(pm_a, pm_b, inputs):
    a = pm_a.generate(inputs, max_new_tokens=8)
    b = pm_b.generate(inputs, max_new_tokens=8)
    assert torch.equal(a.sequences, b.sequences)
    assert a.n_kept == b.n_kept and all(torch.equal(x, y) for x, y in zip(a.keep_masks, b.keep_masks))
    return a


def test_device_map_offload_equals_plain(tiny_dir, model, processor, module, tmp_path, mixed_specs):
    n_layers = len(gp.get_adapter(model).layers(model))
    spread = gp.load(tiny_dir, device_map=offload_map(n_layers), offload_folder=tmp_path / "offload")
    assert spread.model.hf_device_map and any(v == "disk" for v in spread.model.hf_device_map.values())
    inputs = make_batch(processor, mixed_specs)
    _generate_both(gp.apply(model, "full"), spread, inputs)
    glimpse = _generate_both(gp.apply(model, "glimpse", module=module),
                             gp.apply(spread.model, "glimpse", module=module), inputs)
    assert sum(glimpse.n_kept) < sum(glimpse.n_vis)  # something was pruned


def test_cpu_offload_equals_plain(tiny_dir, model, processor, module):
    accelerate = pytest.importorskip("accelerate")
    offloaded, _ = gp.load_base(tiny_dir)
    accelerate.cpu_offload(offloaded, execution_device=torch.device("cpu"))
    assert offloaded.get_input_embeddings().weight.device.type == "meta"
    assert execution_device(offloaded) == torch.device("cpu")
    inputs = make_batch(processor, [IMG_A, IMG_C])
    _generate_both(gp.apply(model, "full"), gp.apply(offloaded, "full"), inputs)
    _generate_both(gp.apply(model, "glimpse", module=module), gp.apply(offloaded, "glimpse", module=module), inputs)


def test_embedded_names_load_and_spread(tmp_path):
    plain = gp.load("embedded", module="embedded")
    assert plain.method.name == "glimpse" and plain.processor is not None
    n_layers = len(plain.adapter.layers(plain.model))
    spread = gp.load("embedded", module="embedded", device_map=offload_map(n_layers),
                     offload_folder=tmp_path / "offload")
    inputs = make_batch(plain.processor, [IMG_A])
    out = _generate_both(plain, spread, inputs)
    assert out.n_kept[0] < out.n_vis[0]


def test_step_logits_are_float32_like_stock_in_bf16(tiny_dir, processor):
    """return_logits in a bf16 model gave bf16 step logits; stock generate(output_logits=True) gives float32."""
    model, _ = gp.load_base(tiny_dir, dtype=torch.bfloat16)
    inputs = make_batch(processor, [IMG_A])
    ours = gp.apply(model, "full").generate(inputs, max_new_tokens=3, return_logits=True)
    with torch.no_grad():
        want = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                              return_dict_in_generate=True).logits
    assert len(ours.step_logits) == len(want) and all(x.dtype == torch.float32 for x in ours.step_logits)
    assert all(torch.equal(a, b) for a, b in zip(ours.step_logits, want))


def test_load_base_never_asks_transformers_for_hub_kernels(tiny_dir, monkeypatch):
    """transformers >= 5.25 kernelizes a model in from_pretrained by default, with kernels fetched from the Hub (and
    refuses to load at all without the `kernels` package): load_base stays offline and on the stock layers."""
    from transformers import AutoModelForImageTextToText

    real, seen = AutoModelForImageTextToText.from_pretrained, []

    def spy(*args, **kwargs):
        seen.append(dict(kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", spy)
    model, _ = gp.load_base(tiny_dir)
    assert len(seen) == 1 and seen[0]["use_kernels"] is False and seen[0]["local_files_only"] is True
    assert not getattr(model, "use_kernels", False)
