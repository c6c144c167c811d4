"""Shared fixtures: one tiny random Qwen2.5-VL on disk per session, its processor, a random glimpse module, batches."""

from __future__ import annotations

import pytest
import torch

import glimpseprune as gp
from glimpseprune.processing import build_inputs
from glimpseprune.testing import build_tiny_qwen2_5_vl, random_image

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


def small_glimpse_config(model, **kw):
    return gp.config_for_model(gp.get_adapter(model).dims(model), vip_width=32, cond_width=32, vip_heads=2,
                               vip_mlp_width=64, **kw)


@pytest.fixture(scope="session")
def module(model):
    torch.manual_seed(0)
    mod = gp.GlimpseModule(small_glimpse_config(model)).eval()
    with torch.no_grad():  # spread the random scores so the default threshold keeps some tokens and drops others
        mod.vip.out_proj.weight.mul_(4.0)
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
