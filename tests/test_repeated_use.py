"""Repeated and concurrent use (found by a hunt): a failed LoRA load leaves requires_grad and weights as they
were (also when the merge fails part-way), a streamer is ended when generate fails in its own checks, and two threads
on an offloaded model (accelerate hooks) get what they get alone."""

from __future__ import annotations

import json
import queue
import threading

import pytest
import torch
from conftest import IMG_A, make_batch, make_images

import glimpseprune as gp
from glimpseprune import lora


def _adapter(tiny_dir, tmp_path, fill=None, rank_in_config=None):
    src = lora.add_lora(gp.load_base(tiny_dir)[0], lora.LoraSettings(r=2, targets=("q_proj",)))
    with torch.no_grad():
        for n, p in src.named_parameters():
            if ".lora_" in n and fill is not None:
                p.fill_(fill(n))
    folder = lora.save_adapter(src, tmp_path / "a")
    if rank_in_config is not None:
        cfg = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**cfg, "r": rank_in_config}))
    return folder


def test_failed_load_adapter_leaves_requires_grad(tiny_dir, tmp_path):
    folder = _adapter(tiny_dir, tmp_path, rank_in_config=8)  # config rank 8, weights rank 2: fails after injection
    model = gp.load_base(tiny_dir)[0]
    with pytest.raises(ValueError):
        lora.load_adapter(model, folder)
    assert not lora.has_lora(model) and all(p.requires_grad for p in model.parameters())


def test_merge_failing_part_way_leaves_the_model_as_it_was(tiny_dir, tmp_path):
    big = lambda n: 300.0 if "layers.3." in n else 0.01  # noqa: E731  (overflows fp16 in layer 3 only)
    folder = _adapter(tiny_dir, tmp_path, fill=big)
    model = gp.load_base(tiny_dir, dtype=torch.float16)[0]
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match="non-finite"):
        lora.load_adapter(model, folder, merge=True)
    assert not lora.has_lora(model) and not hasattr(model, "peft_config")
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())


@pytest.mark.parametrize("bad", [dict(images=[["/nonexistent.png"]], questions=["q?"]), dict(foo=1),
                                 dict(eos_token_id=10**7)])
def test_streamer_is_ended_when_generate_fails_its_checks(pm, processor, bad):
    from transformers import TextIteratorStreamer

    kw = {"images": [make_images(IMG_A)], "questions": ["What is it?"], **bad}
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, timeout=20)
    errors = []

    def run():
        try:
            pm.generate(streamer=streamer, max_new_tokens=2, **kw)
        except (ValueError, TypeError, OSError) as err:  # the check's own error, named
            errors.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        "".join(streamer)
    except queue.Empty:
        pytest.fail("the streamer was never ended: its consumer blocks")
    thread.join(20)
    assert len(errors) == 1


def test_threads_on_an_offloaded_model(tiny_dir, processor, tmp_path):
    accelerate = pytest.importorskip("accelerate")
    model, _ = gp.load_base(tiny_dir)
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    pm = gp.apply(model, "full")
    batches = [make_batch(processor, [IMG_A], seed=s) for s in range(4)]
    ref = [pm.generate(b, max_new_tokens=4).sequences for b in batches]
    got, errors = {}, []

    def run(i):
        try:
            for _ in range(3):
                got[i] = pm.generate(batches[i], max_new_tokens=4).sequences
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    assert not errors, errors
    assert all(torch.equal(got[i], ref[i]) for i in range(4))


def test_vllm_fallback_processor_is_one_per_set_of_kwargs(monkeypatch, caplog):
    """The image-only processor (vLLM without torchvision) wrote one request's processor kwargs onto the one processor
    it cached, so they stayed for every later request; min_pixels / max_pixels were dropped silently. vLLM itself is
    stubbed: only the class the plugin patches."""
    import sys
    import types
    from types import SimpleNamespace

    from glimpseprune.assets import resolve_model
    from glimpseprune.serving import vllm_plugin

    class Info:
        def __init__(self, ctx):
            self.ctx = ctx

        def get_hf_processor(self, **kwargs):
            raise ImportError("the stock processor needs torchvision")

        def get_supported_mm_limits(self):
            return {"image": None, "video": None}

    mod = types.ModuleType("vllm.model_executor.models.qwen2_5_vl")
    mod.Qwen2_5_VLProcessingInfo = Info
    for name in ("vllm", "vllm.model_executor", "vllm.model_executor.models"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setattr(vllm_plugin, "_torchvision_works", lambda: False)
    assert vllm_plugin.image_only_processor_fallback()
    info = Info(SimpleNamespace(model_config=SimpleNamespace(model=str(resolve_model("embedded")))))
    plain = info.get_hf_processor()
    default = dict(plain.image_processor.size)
    small = info.get_hf_processor(max_pixels=28 * 28 * 16)
    assert small is not plain and small.image_processor.size["longest_edge"] == 28 * 28 * 16
    assert info.get_hf_processor() is plain and dict(plain.image_processor.size) == default  # not carried over
    assert info.get_hf_processor(max_pixels=28 * 28 * 16) is small
    assert info.get_supported_mm_limits() == {"image": None}
    with caplog.at_level("WARNING"):
        info.get_hf_processor(colour="red")
    assert "ignores colour='red'" in caplog.text
