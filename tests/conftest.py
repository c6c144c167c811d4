"""Shared fixtures: one tiny random Qwen2.5-VL on disk per session, its processor, a random glimpse module, batches;
and ``family``, which runs a test once per model family (tiny Qwen2.5-VL, tiny LLaVA)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import glimpseprune as gp
from glimpseprune.processing import build_inputs
from glimpseprune.testing import build_tiny_llava, build_tiny_qwen2_5_vl, build_tiny_qwen3_vl, random_image

# where torchvision is installed, load_processor gets transformers' own processors from AutoProcessor; elsewhere it
# builds ours (QwenVLProcessor, Qwen3VLImageProcessorOnly: PIL image path, our video path)
TORCHVISION = importlib.util.find_spec("torchvision") is not None

# (width, height) per image; each sample is a list of images.
IMG_A = [(224, 224)]  # 8x8 = 64 visual tokens
IMG_B = [(112, 168), (224, 112)]  # two images: 4x6 + 8x4 tokens
IMG_C = [(168, 168)]  # 6x6 = 36 tokens
QUESTIONS = ["What colour is the square?", "Which picture has more circles?", "Is there a red star here?"]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    return gp.load_base(tiny_dir)


@pytest.fixture(scope="session")
def model(tiny):
    return tiny[0]


@pytest.fixture(scope="session")
def processor(tiny):
    return tiny[1]


@pytest.fixture(scope="module")
def pm(model, processor):
    """The tiny model under method ``full`` (keeps every token: equal to stock transformers), with its processor."""
    return gp.apply(model, "full", processor=processor)


@pytest.fixture(scope="module")
def one(processor):
    """One question about one 8 x 8-token image, processed."""
    return make_batch(processor, [IMG_A])


@pytest.fixture(scope="session")
def deep(tmp_path_factory):
    """The tiny model with 8 decoder layers instead of 4 (what grows with depth: host reads, kernel launches)."""
    d = build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("deep") / "model", seed=0, text_config={"num_hidden_layers": 8})
    model, processor = gp.load_base(d)
    assert model.config.text_config.num_hidden_layers == 8
    return model, processor


def small_glimpse_config(model, **kw):
    return gp.config_for_model(gp.get_adapter(model).dims(model), vip_width=32, cond_width=32, vip_heads=2,
                               vip_mlp_width=64, **kw)


def random_module(model):
    """A small random glimpse module for ``model`` (seeded)."""
    torch.manual_seed(0)
    mod = gp.GlimpseModule(small_glimpse_config(model)).eval()
    with torch.no_grad():  # spread the random scores so the default threshold keeps some tokens and drops others
        mod.vip.out_proj.weight.mul_(4.0)
    return mod


@pytest.fixture(scope="session")
def module(model):
    return random_module(model)


def random_early_module(model):
    """A small random early module (``kind: early``, method early_glimpse) for ``model`` (seeded)."""
    from glimpseprune.modules.early import EarlyGlimpseModule

    torch.manual_seed(0)
    mod = EarlyGlimpseModule(small_glimpse_config(model, kind="early")).eval()
    with torch.no_grad():  # spread the random scores so the default threshold keeps some tokens and drops others
        mod.out_proj.weight.mul_(4.0)
    return mod


def make_images(spec, seed=0):
    return [random_image(w, h, seed=seed + i) for i, (w, h) in enumerate(spec)]


def make_batch(processor, specs, questions=None, seed=0):
    questions = questions or QUESTIONS[: len(specs)]
    images = [make_images(s, seed=seed + 10 * i) for i, s in enumerate(specs)]
    return build_inputs(processor, images, list(questions))


@pytest.fixture(scope="session")
def mixed_specs():
    return [IMG_A, IMG_B, []]  # one image, two images, text only


@pytest.fixture(scope="module")
def three(processor, mixed_specs):
    """A left-padded batch of three: one image, two images, text only."""
    return make_batch(processor, mixed_specs)


def stock_new_tokens(model, inputs, **kw):
    """Stock ``model.generate``'s new tokens (B, T)."""
    with torch.no_grad():
        return model.generate(**inputs, **kw)[:, inputs["input_ids"].shape[1]:]


# --------------------------------------------------------------------------- model families
# ``family`` runs a test once per supported VLM family; ``model`` / ``processor`` / ``module`` above stay Qwen2.5-VL.

FAMILIES = ["qwen2_5_vl", "llava"]


@pytest.fixture(scope="session")
def q3_dir(tmp_path_factory):
    """A tiny random Qwen3-VL on disk (tests/test_qwen3_vl.py, tests/test_video_qwen3_vl.py)."""
    return build_tiny_qwen3_vl(tmp_path_factory.mktemp("tiny_qwen3_vl") / "model", seed=0)


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("tiny_llava") / "model", seed=0)


@pytest.fixture(scope="session")
def llava(llava_dir):
    return gp.load_base(llava_dir)


@pytest.fixture(scope="session")
def llava_module(llava):
    return random_module(llava[0])


@dataclass
class Family:
    """One tiny model of a family, with what the shared tests need to know about it."""

    name: str
    model_dir: Path
    model: object
    processor: object
    module: object
    early_module: object = None  # a random EarlyGlimpseModule (method early_glimpse)

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    def batch(self, specs, questions=None, seed=0):
        return make_batch(self.processor, specs, questions, seed)

    def grids(self, spec) -> list[tuple[int, int]]:
        """(h, w) token grid of each (width, height) image: Qwen keeps the aspect (28 px per token); LLaVA squares."""
        if self.name == "llava":
            return [gp.get_adapter(self.model).grid(self.model)] * len(spec)
        return [(h // 28, w // 28) for w, h in spec]

    def n_vis(self, spec) -> int:
        return sum(h * w for h, w in self.grids(spec))

    def stock_logits(self, inputs):
        """The stock forward's logits, with the positions its own ``generate`` would use."""
        kw = {}
        if self.name == "llava":  # a bare Llama forward numbers padding too; generate counts valid tokens only
            mask = inputs["attention_mask"].bool()
            kw["position_ids"] = (mask.long().cumsum(1) - 1).masked_fill(~mask, 0)
        return self.model(**inputs, **kw).logits


@pytest.fixture(scope="session", params=FAMILIES)
def family(request) -> Family:
    if request.param == "llava":
        (model, processor), module = request.getfixturevalue("llava"), request.getfixturevalue("llava_module")
        return Family("llava", request.getfixturevalue("llava_dir"), model, processor, module,
                      random_early_module(model))
    model = request.getfixturevalue("model")
    return Family("qwen2_5_vl", request.getfixturevalue("tiny_dir"), model, request.getfixturevalue("processor"),
                  request.getfixturevalue("module"), random_early_module(model))
