"""``serving.spec``: which methods a server can run before the LLM, the checked ``glimpseprune`` config section, and
``ImagePruner`` picking (and merging) the very tokens our runtime picks for one image; ``serving.folder`` writing an
opt-in vLLM model folder (and refusing bad requests before anything is written)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import IMG_A, make_batch, random_early_module

import glimpseprune as gp
from glimpseprune.checkpoint import WEIGHTS_NAME
from glimpseprune.config import SelectionConfig
from glimpseprune.serving.folder import write_vllm_folder
from glimpseprune.serving.spec import ARCHITECTURE, MODULE_DIR, SECTION, ImagePruner, ServeSpec, servable_methods

KEEP = 0.25
SERVABLE = {"early_glimpse", "cdpruner", "divprune", "visionzip", "random", "downsample", "full"}
NOT_SERVABLE = {"glimpse", "fastv", "pdrop", "vscan", "glimpse_attn", "mask", "oracle"}


@pytest.fixture(scope="module")
def module_dir(model, tmp_path_factory):
    return gp.save_module(random_early_module(model), tmp_path_factory.mktemp("early") / "m")


def test_servable_methods_are_the_before_llm_fixed_count_ones():
    names = servable_methods()
    assert set(names) == SERVABLE and len(names) == len(SERVABLE)
    assert not NOT_SERVABLE & set(names)


def test_a_registered_method_is_servable_only_before_the_llm_with_a_fixed_count(monkeypatch):
    """A method registered by a user goes through the same checks as the built-in ones: a count chosen per input,
    or a schedule that prunes inside the LLM on some depth (here only on LLMs deeper than 30 layers), is refused."""
    from dataclasses import dataclass

    from glimpseprune import registry
    from glimpseprune.methods.random import RandomConfig, RandomMethod

    @dataclass(frozen=True)
    class DeepConfig(RandomConfig):
        deep_layer: int | None = None  # prune after this layer on LLMs deeper than it, else before the LLM

    @dataclass(frozen=True)
    class Deep30Config(DeepConfig):
        deep_layer: int | None = 30

    class ByInput(RandomMethod):
        name = "by_input"

        def budget(self, n_vis):
            return None  # e.g. a threshold

    class Deep(RandomMethod):
        name = "deep"
        config_class = DeepConfig

        def prune_layers(self, n_layers):
            k = self.config.deep_layer
            return (k,) if k is not None and k < n_layers else (-1,)

    class Deep30(Deep):
        name = "deep30"
        config_class = Deep30Config

    @dataclass(frozen=True)
    class PickyConfig(RandomConfig):
        def __post_init__(self):
            if self.keep_ratio > 0.3:
                raise ValueError("keep_ratio must be at most 0.3")

    class Picky(RandomMethod):  # refuses the probe's keep_ratio 0.5: left out of the list, the listing still works
        name = "picky"
        config_class = PickyConfig

    for cls in (ByInput, Deep, Deep30, Picky):
        monkeypatch.setitem(registry.METHODS, cls.name, cls)
    assert {"by_input", "deep", "deep30", "picky"} & set(servable_methods()) == {"deep"}
    _err({"method": "by_input", "keep_ratio": 0.5}, "'by_input' cannot run.*count depends on the input")
    # named with a depth where it does prune inside (it keeps the whole sequence on a 28-layer LLM: not that one)
    _err({"method": "deep30", "keep_ratio": 0.5},
         r"'deep30' cannot run.*prunes inside the LLM \(on a 36-layer LLM, after layer\(s\) 30\)")
    assert ServeSpec.from_section({"method": "deep", "keep_ratio": 0.5}).method_args == {}
    _err({"method": "deep", "keep_ratio": 0.5, "method_args": {"deep_layer": 30}}, "make 'deep' prune inside the LLM")


def _err(section, match, model_dir=None):
    with pytest.raises(ValueError, match=match):
        ServeSpec.from_section(section, model_dir)


@pytest.mark.parametrize("section, match", [
    (["method", "random"], "must be a JSON object, got list"),
    ({"method": "random", "keep_ratio": 0.5, "ratio": 1}, r"unknown field.*'ratio'"),
    ({"keep_ratio": 0.5}, "method must name a method.*None"),
    ({"method": "", "keep_ratio": 0.5}, "method must name a method"),
    ({"method": "tome", "keep_ratio": 0.5}, r"unknown method 'tome'.*early_glimpse.*visionzip"),
    ({"method": "fastv", "keep_ratio": 0.5},
     r"'fastv' cannot run.*inside the LLM \(on a 28-layer LLM .*, after layer\(s\) 1\).*Methods that can: cdpruner"),
    ({"method": "pdrop", "keep_ratio": 0.5},
     r"'pdrop' cannot run.*inside the LLM \(on a 28-layer LLM .*, after layer\(s\) 6, 13, 20\)"),
    ({"method": "glimpse", "keep_ratio": 0.5}, r"'glimpse' cannot run.*use early_glimpse"),
    ({"method": "mask", "keep_ratio": 0.5}, r"'mask' cannot run.*keep masks given per request"),
    ({"method": "random", "keep_ratio": 0}, r"keep_ratio must be a number in \(0, 1\], got 0"),
    ({"method": "random", "keep_ratio": -0.1}, r"keep_ratio must be a number.*-0\.1"),
    ({"method": "random", "keep_ratio": 1.5}, r"keep_ratio must be a number.*1\.5"),
    ({"method": "random", "keep_ratio": True}, r"keep_ratio must be a number.*True"),
    ({"method": "random", "keep_ratio": "0.5"}, r"keep_ratio must be a number.*'0\.5'"),
    ({"method": "divprune"}, r"keep_ratio must be a number.*None"),
    ({"method": "full", "keep_ratio": 0.5}, r"keep_ratio must be 1 for method 'full'"),
    ({"method": "full", "method_args": {"seed": 1}}, r"method 'full' takes none, got \['seed'\]"),
    ({"method": "random", "keep_ratio": 0.5, "method_args": [1]}, "method_args must be a JSON object, got list"),
    ({"method": "random", "keep_ratio": 0.5, "method_args": {"keep_ratio": 0.3}}, "give keep_ratio once"),
    ({"method": "random", "keep_ratio": 0.5, "module": "m"}, "module is given but method 'random' uses no module"),
    ({"method": "early_glimpse", "keep_ratio": 0.5}, "early_glimpse' needs its trained module folder"),
    ({"method": "early_glimpse", "keep_ratio": 0.5, "module": ""}, "early_glimpse' needs its trained module folder"),
])
def test_bad_sections_are_refused(section, match):
    _err(section, match)


def test_module_folder_is_checked_and_resolved(module_dir, tmp_path):
    sec = {"method": "early_glimpse", "keep_ratio": 0.5}
    _err({**sec, "module": "nowhere"}, r"module folder .*nowhere.* does not exist", tmp_path)
    (tmp_path / "empty").mkdir()
    _err({**sec, "module": "empty"}, f"holds no {WEIGHTS_NAME}", tmp_path)
    spec = ServeSpec.from_section({**sec, "module": module_dir.name}, module_dir.parent)
    assert Path(spec.module).is_absolute() and spec.module == str(module_dir.resolve())
    assert spec.needs_module and spec.reads_question and spec.keep_ratio == 0.5
    assert ServeSpec.from_section({**sec, "module": str(module_dir)}).module == str(module_dir.resolve())


def test_relative_model_folder_resolves_the_module_to_an_absolute_path(module_dir, monkeypatch):
    """A server may load the module from another working directory: the spec holds the module's absolute path even
    when the model folder was given relative."""
    monkeypatch.chdir(module_dir.parent.parent)
    spec = ServeSpec.from_section({"method": "early_glimpse", "keep_ratio": 0.5, "module": module_dir.name},
                                  module_dir.parent.name)
    assert Path(spec.module).is_absolute() and spec.module == str(module_dir.resolve())


def test_count_and_reads_question():
    for r in (0.111, 0.25, 0.5, 1.0):
        spec = ServeSpec.from_section({"method": "random", "keep_ratio": r})
        assert [spec.count(n) for n in (0, 1, 5, 36, 64, 100)] == [0] + [max(1, math.floor(r * n))
                                                                          for n in (1, 5, 36, 64, 100)]
    assert ServeSpec.from_section({"method": "full"}).count(64) == 64
    for name in ("divprune", "random", "visionzip", "downsample", "full"):
        sec = {"method": name} if name == "full" else {"method": name, "keep_ratio": 0.5}
        assert not ServeSpec.from_section(sec).reads_question, name
    assert ServeSpec.from_section({"method": "cdpruner", "keep_ratio": 0.5}).reads_question
    args = {"seed": 1}
    spec = ServeSpec.from_section({"method": "random", "keep_ratio": 0.5, "method_args": args})
    assert spec.method_args == {"seed": 1} and spec.module is None and not spec.needs_module
    args["seed"] = 2  # the (frozen) spec keeps its own copy of the section's settings
    assert spec.method_args == {"seed": 1}


# --------------------------------------------------------------------------- ImagePruner == runtime

CASES = [("divprune", {}), ("visionzip", {}), ("downsample", {}), ("random", {"seed": 2}), ("cdpruner", {}),
         ("early_glimpse", {}), ("early_glimpse", {"fill": "diverse"})]


@pytest.fixture(scope="module")
def one_image(processor):
    return make_batch(processor, [IMG_A], ["What colour is the square?"])


def _pruner_inputs(model, pruner, inputs):
    """The runtime's own encoding of the one-image batch, cut the way a server sees one image."""
    with torch.no_grad():
        enc = gp.get_adapter(model).encode(model, dict(inputs), pruner.taps(), pruner.tap_fn())
    vis = enc.vis_mask[0]
    pos = vis.nonzero().squeeze(-1)
    first, last = int(pos[0]), int(pos[-1])
    assert last - first + 1 == pos.numel() == enc.grids[0][0] * enc.grids[0][1]  # one contiguous image
    assert bool(enc.attn_mask[0].all())  # batch of one: no padding
    e = enc.embeds[0]
    return e[vis], tuple(enc.grids[0]), list(enc.vision_feats), e[:first], e[last + 1:]


@pytest.mark.parametrize("name, args", CASES, ids=[c[0] + "".join(f"-{v}" for v in c[1].values()) for c in CASES])
def test_image_pruner_equals_the_runtime(model, processor, one_image, module_dir, name, args):
    if name == "early_glimpse":
        mod = gp.load_module(module_dir)
        pm = gp.apply(model, name, module=mod, selection=SelectionConfig(fixed_keep_ratio=KEEP), processor=processor,
                      **args)
        spec = ServeSpec.from_section({"method": name, "keep_ratio": KEEP, "module": str(module_dir),
                                       "method_args": args})
    else:
        pm = gp.apply(model, name, processor=processor, keep_ratio=KEEP, **args)
        spec = ServeSpec.from_section({"method": name, "keep_ratio": KEEP, "method_args": args})
    with torch.no_grad():
        out = pm.generate(dict(one_image), max_new_tokens=1)
    want = out.keep_masks[0].nonzero().squeeze(-1).cpu()
    pruner = ImagePruner(spec, gp.get_adapter(model).dims(model), torch.device("cpu"))
    embeds, grid, feats, before, after = _pruner_inputs(model, pruner, one_image)
    given = embeds.clone()
    idx, rows = pruner.prune(embeds, grid, feats, before, after)
    assert torch.equal(embeds, given)  # the caller's embeddings are not rewritten in place (merged rows are copies)
    n = embeds.shape[0]
    assert idx.numel() == spec.count(n) == out.n_kept[0] and 0 < idx.numel() < n
    assert idx.dtype == torch.long and torch.equal(idx.cpu(), want)
    merged = out.prefill.scratch.get("merged_embeds")
    replaced = torch.zeros(n, dtype=torch.bool)
    if name in ("visionzip", "downsample"):
        m_idx, m_rows = merged[0]
        assert m_idx.numel() > 0  # the test must see merged rows
        replaced[m_idx.cpu()] = True
        at = torch.searchsorted(idx.cpu(), m_idx.cpu())  # idx ascending: the rank of each merged token
        assert torch.equal(idx.cpu()[at], m_idx.cpu())
        torch.testing.assert_close(rows[at].float(), m_rows.float().to(rows.device), atol=1e-6, rtol=1e-6)
    else:
        assert not merged
    plain = ~replaced[idx.cpu()]
    assert torch.equal(rows[plain], embeds[idx][plain])


def test_full_keeps_everything_unchanged(model, one_image):
    pruner = ImagePruner(ServeSpec.from_section({"method": "full"}))
    assert pruner.taps() == () and pruner.tap_fn() is None
    embeds, grid, feats, before, after = _pruner_inputs(model, pruner, one_image)
    idx, rows = pruner.prune(embeds, grid, feats, before, after)
    assert torch.equal(idx, torch.arange(embeds.shape[0])) and torch.equal(rows, embeds)


def test_image_pruner_checks_the_grid():
    pruner = ImagePruner(ServeSpec.from_section({"method": "random", "keep_ratio": 0.5}))
    with pytest.raises(ValueError, match=r"grid \(2, 3\) holds 6 tokens but 8"):
        pruner.prune(torch.zeros(8, 4), (2, 3))
    embeds = torch.arange(32.0).reshape(8, 4)
    for grid in ((2, 4), (4, 2), (1, 8)):  # not square: h * w = 8 tokens, of which max(1, floor(0.5 * 8)) = 4 kept
        idx, rows = pruner.prune(embeds, grid)
        assert idx.numel() == 4 and bool((idx[1:] > idx[:-1]).all()) and torch.equal(rows, embeds[idx])
    with pytest.raises(ValueError, match="method_args for 'random'.*colour"):  # a spec made without from_section
        ImagePruner(ServeSpec("random", 0.5, method_args={"colour": 1}))
    with pytest.raises(ValueError, match="method_args for 'random'.*colour"):  # with the section, not at serve time
        ServeSpec.from_section({"method": "random", "keep_ratio": 0.5, "method_args": {"colour": 1}})
    with pytest.raises(ValueError, match="method_args for 'visionzip'.*dominant_frac"):
        ServeSpec.from_section({"method": "visionzip", "keep_ratio": 0.5, "method_args": {"dominant_frac": 2}})
    with pytest.raises(ValueError, match="make 'random' prune inside the LLM"):
        ServeSpec.from_section({"method": "random", "keep_ratio": 0.5, "method_args": {"prune_layer": 1}})
    with pytest.raises(ValueError, match="drop_layer 0 makes it prune inside the LLM"):
        ServeSpec.from_section({"method": "early_glimpse", "keep_ratio": 0.5, "module": "m",
                                "method_args": {"drop_layer": 0}})


def test_image_pruner_refuses_a_count_other_than_the_placeholders():
    """The prompt was given ``spec.count(n)`` placeholders: a method keeping another number is an error, not a
    silently misaligned prompt."""
    pruner = ImagePruner(ServeSpec.from_section({"method": "random", "keep_ratio": 0.5}))
    pruner.method.select = lambda state: [torch.tensor([True, True, True, False, False, False, False, False])]
    with pytest.raises(RuntimeError, match=r"'random' kept 3 of 8 tokens but the prompt was given 4 placeholders"):
        pruner.prune(torch.zeros(8, 4), (2, 4))


# --------------------------------------------------------------------------- write_vllm_folder


def test_write_vllm_folder(tiny_dir, module_dir, tmp_path):
    src = Path(tiny_dir)
    out = write_vllm_folder(src, tmp_path / "served", "early_glimpse", 0.111, module=module_dir)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == [ARCHITECTURE]
    assert cfg[SECTION] == {"method": "early_glimpse", "keep_ratio": 0.111, "module": MODULE_DIR}
    base = json.loads((src / "config.json").read_text())
    assert {k: v for k, v in cfg.items() if k not in ("architectures", SECTION)} == \
        {k: v for k, v in base.items() if k != "architectures"}
    others = [f for f in src.iterdir() if f.name != "config.json" and not f.name.startswith(".")]
    assert others
    for f in others:
        assert (out / f.name).is_symlink() and (out / f.name).resolve() == f.resolve()
    copied = out / MODULE_DIR
    assert copied.is_dir() and not copied.is_symlink() and (copied / WEIGHTS_NAME).is_file()
    assert (copied / WEIGHTS_NAME).read_bytes() == (module_dir / WEIGHTS_NAME).read_bytes()
    spec = ServeSpec.from_section(cfg[SECTION], out)
    assert spec.module == str(copied.resolve())
    plain = write_vllm_folder(src, tmp_path / "rand", "random", 0.5, method_args={"seed": 1})
    sec = json.loads((plain / "config.json").read_text())[SECTION]
    assert sec == {"method": "random", "keep_ratio": 0.5, "method_args": {"seed": 1}}
    assert not (plain / MODULE_DIR).exists()
    full = write_vllm_folder(src, tmp_path / "full", "full", method_args={})  # no ratio: full keeps every token
    assert json.loads((full / "config.json").read_text())[SECTION] == {"method": "full"}


def test_write_vllm_folder_from_a_relative_path_skips_hidden_entries(tiny_dir, tmp_path, monkeypatch):
    """A model folder given relative to the working directory: the links point at its files wherever the served
    folder is read from; its hidden entries (a .git, a lock file) are not linked."""
    base = tmp_path / "base"
    base.mkdir()
    names = sorted(f.name for f in Path(tiny_dir).iterdir() if not f.name.startswith("."))
    for name in names:
        (base / name).symlink_to(Path(tiny_dir) / name)
    (base / ".git").mkdir()
    (base / ".lock").write_text("x")
    monkeypatch.chdir(tmp_path)
    out = write_vllm_folder(Path("base"), Path("served"), "random", 0.5)
    assert sorted(f.name for f in out.iterdir()) == names
    for name in names:
        if name != "config.json":
            assert (tmp_path / "served" / name).resolve() == (Path(tiny_dir) / name).resolve()
            assert (tmp_path / "served" / name).exists()


def test_write_vllm_folder_from_an_opted_in_folder(tiny_dir, module_dir, tmp_path, monkeypatch):
    """A served folder as the base of another: its own module is replaced by the new one (the copy collided with the
    linked one and left a half-made folder that refused every retry); an output inside the model folder (it linked
    itself) is refused; a failure while writing leaves nothing behind."""
    import shutil

    first = write_vllm_folder(tiny_dir, tmp_path / "v1", "early_glimpse", 0.25, module=module_dir)
    other = tmp_path / "other_module"
    shutil.copytree(module_dir, other)
    second = write_vllm_folder(first, tmp_path / "v2", "early_glimpse", 0.5, module=other)
    (tmp_path / "plain_dir").mkdir()  # the folder has the usual permissions (a server may run as another user)
    assert second.stat().st_mode & 0o777 == (tmp_path / "plain_dir").stat().st_mode & 0o777
    (tmp_path / "plain_dir").rmdir()
    copied = second / MODULE_DIR
    assert copied.is_dir() and not copied.is_symlink() and (copied / WEIGHTS_NAME).is_file()
    assert json.loads((second / "config.json").read_text())[SECTION] == \
        {"method": "early_glimpse", "keep_ratio": 0.5, "module": MODULE_DIR}
    plain = write_vllm_folder(first, tmp_path / "v3", "random", 0.5)  # no module: the old one is not carried over
    assert not (plain / MODULE_DIR).exists()
    with pytest.raises(ValueError, match="inside the model folder"):
        write_vllm_folder(tiny_dir, Path(tiny_dir) / "served", "random", 0.5)
    assert not (Path(tiny_dir) / "served").exists()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(shutil, "copytree", broken)
    with pytest.raises(OSError, match="disk full"):
        write_vllm_folder(tiny_dir, tmp_path / "v4", "early_glimpse", 0.25, module=module_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other_module", "v1", "v2", "v3"]

    def interrupted(*args, **kwargs):  # Ctrl+C while copying: no half-made folder either
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "copytree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_vllm_folder(tiny_dir, tmp_path / "v5", "early_glimpse", 0.25, module=module_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other_module", "v1", "v2", "v3"]
    monkeypatch.chdir(tiny_dir)  # an output inside the model folder, given relative to it
    with pytest.raises(ValueError, match="inside the model folder"):
        write_vllm_folder(tiny_dir, "served", "random", 0.5)
    assert not (Path(tiny_dir) / "served").exists()


def test_write_vllm_folder_refuses(tiny_dir, llava_dir, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists and is not an empty folder"):
        write_vllm_folder(tiny_dir, busy, "random", 0.5)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"] and (busy / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="already exists and is not an empty folder"):  # a file, not a folder
        write_vllm_folder(tiny_dir, busy / "keep.txt", "random", 0.5)
    assert (busy / "keep.txt").read_text() == "mine"
    (tmp_path / "bare").mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        write_vllm_folder(tmp_path / "bare", tmp_path / "o1", "random", 0.5)
    with pytest.raises(ValueError, match="'llava'.*Qwen2.5-VL"):
        write_vllm_folder(llava_dir, tmp_path / "o2", "random", 0.5)
    bad = [("fastv", 0.5, {}), ("random", 1.5, {}), ("random", None, {}), ("tome", 0.5, {}),
           ("early_glimpse", 0.5, {}), ("full", 0.5, {}), ("random", 0.5, {"keep_ratio": 0.2}),
           ("random", 0.5, {"colour": 1})]
    for i, (method, ratio, args) in enumerate(bad):
        dest = tmp_path / f"never{i}"
        with pytest.raises(ValueError):
            write_vllm_folder(tiny_dir, dest, method, ratio, method_args=args)
        assert not dest.exists(), method
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    # a config.json that is no JSON object, or no JSON, and an output whose parent is a file: named, no traceback
    for text, match in (("[]", "expected a JSON object, got list"), ("{oops", r"config\.json: not JSON")):
        (tmp_path / "odd").mkdir(exist_ok=True)
        (tmp_path / "odd" / "config.json").write_text(text)
        with pytest.raises(ValueError, match=match):
            write_vllm_folder(tmp_path / "odd", tmp_path / "o3", "random", 0.5)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="afile"):
        write_vllm_folder(tiny_dir, tmp_path / "afile" / "o4", "random", 0.5)


def test_write_vllm_folder_refuses_a_module_that_does_not_fit(tiny_dir, llava_dir, model, tmp_path):
    from conftest import small_glimpse_config

    llava, _ = gp.load_base(llava_dir)
    foreign = gp.save_module(random_early_module(llava), tmp_path / "llava_early")
    glimpse = gp.save_module(gp.GlimpseModule(small_glimpse_config(model)), tmp_path / "glimpse")
    inside = random_early_module(model)
    inside.drop_after(0)  # decides before the LLM, drops after layer 0
    inside = gp.save_module(inside, tmp_path / "inside")
    headless = tmp_path / "headless"
    headless.mkdir()
    (headless / WEIGHTS_NAME).write_bytes((glimpse / WEIGHTS_NAME).read_bytes())
    for i, (mod, match) in enumerate([(foreign, "trained for another base model.*llava"),
                                      (glimpse, "kind 'glimpse'.*needs kind 'early'"),
                                      (inside, "drops its tokens after LLM layer 0.*only prune before the LLM"),
                                      (headless, "headless")]):
        dest = tmp_path / f"never{i}"
        with pytest.raises(ValueError, match=match):
            write_vllm_folder(tiny_dir, dest, "early_glimpse", 0.25, module=mod)
        assert not dest.exists()


def test_image_pruner_refuses_an_early_module_that_drops_inside_the_llm(model, tmp_path):
    """A hand-written section (or --hf-overrides) naming an early module saved to drop after LLM layer 0 reached the
    server, which pruned it before the LLM, another schedule than it was trained on; ``write_vllm_folder`` refused it,
    the section did not."""
    inside = random_early_module(model)
    inside.drop_after(0)
    gp.save_module(inside, tmp_path / "m")
    spec = ServeSpec.from_section({"method": "early_glimpse", "keep_ratio": 0.25, "module": "m"}, tmp_path)
    with pytest.raises(ValueError, match="drops its tokens after LLM layer 0"):
        ImagePruner(spec)
    override = ServeSpec.from_section({"method": "early_glimpse", "keep_ratio": 0.25, "module": "m",
                                       "method_args": {"drop_layer": -1}}, tmp_path)
    assert ImagePruner(override).method.prune_layers(4) == (-1,)


def test_the_vllm_plugin_warns_on_a_vllm_release_its_tests_did_not_run_on(caplog):
    from glimpseprune.serving.vllm_plugin import TESTED_VLLM, check_vllm_version

    assert TESTED_VLLM == ((0, 32), (0, 33))  # the `vllm` extra's bounds: >=0.32,<0.34
    with caplog.at_level("WARNING", logger="glimpseprune.serving.vllm_plugin"):
        assert check_vllm_version("0.32.0") and check_vllm_version("0.33.1+cpu") and check_vllm_version("0.32.0rc1")
        assert not caplog.records
        assert not check_vllm_version("0.34.0")
        assert not check_vllm_version("0.31.9")
        assert not check_vllm_version("1.32.0")
        assert not check_vllm_version("not-a-version")
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 4 and "supports vLLM 0.32 and 0.33 only; this is vLLM 0.34.0, untested" in said[0]
    assert "vLLM not-a-version" in said[3]


def test_the_fallback_processor_cache_is_bounded_and_least_recently_used_first():
    from glimpseprune.serving.vllm_plugin import ProcessorCache

    built = []

    def build(key):
        return lambda: built.append(key) or f"proc-{key}"

    cache = ProcessorCache(maxsize=3)
    assert [cache.get(k, build(k)) for k in "abc"] == ["proc-a", "proc-b", "proc-c"] and built == list("abc")
    assert cache.get("a", build("a")) == "proc-a" and built == list("abc")  # cached: not built again
    cache.get("d", build("d"))  # over the bound: b (least recently used; a was just used) goes
    assert len(cache) == 3 and built == list("abcd")
    cache.get("a", build("a")), cache.get("c", build("c"))
    assert built == list("abcd")
    cache.get("b", build("b"))
    assert built == list("abcdb")
    for i in range(100):  # a stream of ever new request kwargs holds at most maxsize processors
        cache.get(i, build(i))
    assert len(cache) == 3 and len(ProcessorCache()._items) == 0 and ProcessorCache().maxsize == 16
    with pytest.raises(ValueError, match="maxsize"):
        ProcessorCache(maxsize=0)


def test_the_fallback_processor_cache_builds_a_processor_once_when_threads_ask_at_once():
    import threading
    import time

    from glimpseprune.serving.vllm_plugin import ProcessorCache

    cache, built, start = ProcessorCache(maxsize=4), [], threading.Barrier(4)

    def build():
        built.append(1)
        time.sleep(0.05)  # a processor takes a while to load: the other threads arrive meanwhile
        return "proc"

    def worker():
        start.wait()
        assert cache.get("kwargs", build) == "proc"

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(built) == 1 and len(cache) == 1


def test_processor_kwargs_reach_the_image_only_processor(caplog):
    """min_pixels / max_pixels go into the image processor's ``size`` (shortest / longest edge, as integers),
    attributes it has are set, and an unset (None) kwarg is neither set nor reported."""
    from types import SimpleNamespace

    from glimpseprune.serving.vllm_plugin import configure_image_processor

    ip = SimpleNamespace(size={"shortest_edge": 3136, "longest_edge": 12845056}, do_resize=True)
    with caplog.at_level("WARNING", logger="glimpseprune.serving.vllm_plugin"):
        configure_image_processor(ip, {"min_pixels": 784.0, "max_pixels": 200704, "do_resize": False,
                                       "fps": None})
    assert ip.size == {"shortest_edge": 784, "longest_edge": 200704} and type(ip.size["shortest_edge"]) is int
    assert ip.do_resize is False and not hasattr(ip, "fps") and not caplog.records
    no_size = SimpleNamespace(size=None)  # a processor without a size dict: the bound is reported as ignored
    with caplog.at_level("WARNING", logger="glimpseprune.serving.vllm_plugin"):
        configure_image_processor(no_size, {"min_pixels": 784})
    assert no_size.size is None and "ignores min_pixels=784" in caplog.text
