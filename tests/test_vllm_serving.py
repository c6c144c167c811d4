"""vLLM serving: the plugin's model, run by vLLM itself, equals our runtime (stock transformers underneath).

vLLM lives in its own environment (it pins another transformers): ``scripts/setup_vllm_env.sh`` makes ``.venv-vllm``
(``.ci/run`` calls it). Without it these tests skip, unless ``GLIMPSEPRUNE_REQUIRE_VLLM=1`` (CI), where they fail.
``GLIMPSEPRUNE_VLLM_PYTHON`` points at another environment's Python.

One vLLM process (tests/vllm_side.py) serves the stock model and four opt-in folders of one tiny random Qwen2.5-VL
(head_dim 64, the smallest vLLM's CPU attention takes): ``full``, ``random`` (a fixed mask: seeded), ``early_glimpse``
(a random early module, fixed count) and ``visionzip`` (merges rows), the four ``REQUESTS`` each, greedy, fp32; then
three hand-broken folders, which vLLM must refuse at load. Here our runtime runs the same prompts: keep-everything and
stock vLLM give the same tokens as our ``full``; vLLM's random mask, fed to our ``mask`` method at K = -1, gives vLLM's
tokens (so positions of kept tokens and of the text after them are right, after one pruned image or two); the early
glimpse and VisionZip pick the same tokens in both and generate the same, the early glimpse again for an image it
has pruned before but with another question; the ``random`` folder prefilled in chunks that end inside the images
generates as in one chunk; a pruned request holds fewer KV blocks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import glimpseprune as gp
from glimpseprune.config import SelectionConfig
from glimpseprune.modules.early import EarlyGlimpseModule
from glimpseprune.processing import build_messages
from glimpseprune.serving.folder import write_vllm_folder
from glimpseprune.serving.spec import ARCHITECTURE
from glimpseprune.testing import build_tiny_qwen2_5_vl_serving, random_image

REPO = Path(__file__).resolve().parents[1]
KEEP = 0.25
NEW_TOKENS = 8
QUESTIONS = ["What is in the picture?", "Is there a red square left of the circle?"]
# (width, height, seed): 256, 140, 144 and 160 visual tokens; the second and fourth taller than wide
IMAGES = [(448, 448, 1), (280, 392, 2), (336, 336, 3), (280, 448, 4)]
# (images, question) per request: one image each; the first image again with the other question (a method reading the
# question must prune it again, not reuse the first request's pruning: vLLM caches encoded items by their hash); two
# new images in one prompt (budgets per image; positions of the text between and after two pruned images)
REQUESTS = [((0,), 0), ((1,), 1), ((0,), 1), ((2, 3), 0)]
SINGLE = [i for i, (imgs, _) in enumerate(REQUESTS) if len(imgs) == 1]  # where our per-sample budget is vLLM's
CHUNK = 48  # prefill chunk (tokens) of the "chunked" run: 2 or 3 chunks per pruned prompt


def vllm_python() -> str:
    py = os.environ.get("GLIMPSEPRUNE_VLLM_PYTHON") or str(REPO / ".venv-vllm" / "bin" / "python")
    probe = None
    if Path(py).exists():
        probe = subprocess.run([py, "-c", "import vllm, glimpseprune.serving.vllm_plugin"], capture_output=True,
                               text=True, timeout=300)
    if probe is None or probe.returncode:
        why = f"no vLLM environment at {py}" if probe is None else f"vLLM does not import there: {probe.stderr[-500:]}"
        if os.environ.get("GLIMPSEPRUNE_REQUIRE_VLLM") == "1":
            pytest.fail(f"{why} (GLIMPSEPRUNE_REQUIRE_VLLM=1; run scripts/setup_vllm_env.sh)")
        pytest.skip(f"{why}; run scripts/setup_vllm_env.sh")
    return py


def random_early(model) -> EarlyGlimpseModule:
    dims = gp.get_adapter(model).dims(model)
    torch.manual_seed(0)
    mod = EarlyGlimpseModule(gp.config_for_model(dims, kind="early", vip_width=32, cond_width=32, vip_heads=2,
                                                 vip_mlp_width=64)).eval()
    with torch.no_grad():
        mod.out_proj.weight.mul_(8.0)  # spread the scores: no near-ties at the top-k boundary
    return mod


def bad_folders(root: Path, model_dir: Path) -> dict[str, Path]:
    """Opt-in folders edited by hand into what ``write_vllm_folder`` would refuse."""
    out = {}
    for name, edit in BAD.items():
        d = write_vllm_folder(model_dir, root / f"bad_{name}", "divprune", KEEP)
        cfg = json.loads((d / "config.json").read_text())
        edit(cfg["glimpseprune"])
        (d / "config.json").write_text(json.dumps(cfg))
        out[name] = d
    return out


BAD = {  # name -> edit of the glimpseprune section; the error must say what is wrong
    "module_weights_missing": lambda s: s.update(method="early_glimpse", module="glimpse_module"),
    "needs_llm_attention": lambda s: s.update(method="fastv"),
    "ratio_outside": lambda s: s.update(keep_ratio=1.5),
}
BAD_MESSAGES = {
    "module_weights_missing": "glimpseprune.module: the module folder",
    "needs_llm_attention": "glimpseprune.method 'fastv' cannot run",
    "ratio_outside": "glimpseprune.keep_ratio must be a number in (0, 1], got 1.5",
}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    py = vllm_python()
    root = tmp_path_factory.mktemp("vllm")
    model_dir = build_tiny_qwen2_5_vl_serving(root / "model")
    model, processor = gp.load_base(model_dir)
    early = random_early(model)
    module_dir = gp.save_module(early, root / "early_module")
    images = []
    for i, (w, h, seed) in enumerate(IMAGES):
        random_image(w, h, seed=seed).save(root / f"img{i}.png")
        images.append(str(root / f"img{i}.png"))
    prompts = [processor.apply_chat_template(build_messages(len(imgs), QUESTIONS[q]), add_generation_prompt=True,
                                             tokenize=False) for imgs, q in REQUESTS]
    folders = {
        "stock": model_dir,  # vLLM's own Qwen2_5_VLForConditionalGeneration
        "full": write_vllm_folder(model_dir, root / "full", "full"),
        "random": write_vllm_folder(model_dir, root / "random", "random", KEEP, method_args={"seed": 3}),
        "early_glimpse": write_vllm_folder(model_dir, root / "early", "early_glimpse", KEEP, module=module_dir),
        "visionzip": write_vllm_folder(model_dir, root / "visionzip", "visionzip", KEEP),
    }
    requests = [{"prompt": p, "images": [images[j] for j in imgs]} for p, (imgs, _) in zip(prompts, REQUESTS)]
    runs = [{"name": n, "model": str(d), "requests": requests, "max_tokens": NEW_TOKENS} for n, d in folders.items()]
    # the documented flag instead of a folder: the stock folder opted in by --hf-overrides
    overrides = {"architectures": [ARCHITECTURE], "glimpseprune": json.loads(
        (folders["random"] / "config.json").read_text())["glimpseprune"]}
    runs.append({"name": "overrides", "model": str(model_dir), "requests": requests, "max_tokens": NEW_TOKENS,
                 "engine_args": {"hf_overrides": overrides}})
    # the same folder with the prompt prefilled in chunks of CHUNK tokens: chunks end inside a pruned image's rows
    runs.append({"name": "chunked", "model": str(folders["random"]), "requests": requests, "max_tokens": NEW_TOKENS,
                 "engine_args": {"enable_chunked_prefill": True, "max_num_batched_tokens": CHUNK}})
    runs += [{"name": n, "model": str(d), "expect_error": True} for n, d in bad_folders(root, model_dir).items()]
    job = {"runs": runs}
    (root / "job.json").write_text(json.dumps(job))
    proc = subprocess.run([py, str(REPO / "tests" / "vllm_side.py"), str(root / "job.json"), str(root / "out.json")],
                          capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode:
        sys.stderr.write(proc.stderr[-6000:])
        pytest.fail(f"the vLLM side failed (exit {proc.returncode}); its log tail is above")
    out = json.loads((root / "out.json").read_text())
    return {"out": out, "model": model, "processor": processor, "early": early, "images": images}


def ours(served, method, i, keep_masks=None, **kw):
    """Our runtime on request i: (tokens, log-probs of those tokens, keep mask, kv length)."""
    from PIL import Image

    pm = gp.apply(served["model"], method, processor=served["processor"], **kw)
    imgs, q = REQUESTS[i]
    images = [Image.open(served["images"][j]).convert("RGB") for j in imgs]
    o = pm.generate(images=[images], questions=[QUESTIONS[q]], max_new_tokens=NEW_TOKENS, return_logits=True,
                    keep_masks=keep_masks)
    tokens = o.sequences[0].tolist()
    logps = [float(lg[0].float().log_softmax(-1)[t]) for lg, t in zip(o.step_logits, tokens)]
    return tokens, logps, o.keep_masks[0], o.kv_len[0]


def kept_entries(run, i) -> list[dict]:
    """Request i's kept indices per image, as the model logged them. vLLM serves images it has encoded before (the
    same pixels and, for a method that reads the question, the same prompt: ``_get_mm_hashes``) from its cache,
    without calling the model: then they are the entries of the first request that sent those images."""
    if run["kept"][i]:
        return run["kept"][i]
    return run["kept"][next(j for j in range(i + 1) if REQUESTS[j][0] == REQUESTS[i][0])]


def kept_mask(entries) -> torch.Tensor:
    """One request's flat keep mask over all its visual tokens, from the kept indices vLLM logged per image."""
    masks = []
    for e in entries:
        m = torch.zeros(e["grid"][0] * e["grid"][1], dtype=torch.bool)
        m[e["kept"]] = True
        masks.append(m)
    return torch.cat(masks)


def check_same(run, i, tokens, logps, kv_len):
    assert run["tokens"][i] == tokens, f"request {i}: vLLM {run['tokens'][i]} vs ours {tokens}"
    assert run["logprobs"][i] == pytest.approx(logps, abs=2e-3)
    assert run["prompt_len"][i] == kv_len  # vLLM's prompt holds exactly the tokens our pruned cache holds


def test_the_plugin_registers_on_a_vllm_without_the_v1_cpu_runner_module():
    """vLLM 0.34 moved its CPU runner onto the V2 runner (which reads the pruning flag itself) and removed
    ``vllm.v1.worker.cpu_model_runner``: register() must then wrap nothing and still register, not fail to import."""
    py = vllm_python()
    code = ("import sys; sys.modules['vllm.v1.worker.cpu_model_runner'] = None\n"
            "from glimpseprune.serving import vllm_plugin as p\n"
            "assert p.enable_pruning_on_cpu_runner() is False\n"
            "p.register()\n"
            "from vllm import ModelRegistry\n"
            "assert p.ARCHITECTURE in ModelRegistry.get_supported_archs()\n"
            "import vllm; print('tested', p.check_vllm_version(), vllm.__version__)\n")
    proc = subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[:2] == ["tested", "True"]  # the vLLM the serving tests run on is a tested release


@pytest.mark.parametrize("i", range(len(REQUESTS)))
def test_keep_everything_equals_our_full_and_stock_vllm(served, i):
    tokens, logps, keep, kv_len = ours(served, "full", i)
    run = served["out"]["full"]
    check_same(run, i, tokens, logps, kv_len)
    check_same(served["out"]["stock"], i, tokens, logps, kv_len)
    assert len(kept_entries(run, i)) == len(REQUESTS[i][0])  # one entry per image
    mask = kept_mask(kept_entries(run, i))
    assert mask.numel() == keep.numel() and bool(mask.all())
    assert served["out"]["stock"]["kept"][i] == []  # the stock class never runs our pruner
    assert len(set(tokens)) > 2  # the model's output varies: equal tokens are evidence, not a constant


@pytest.mark.parametrize("i", range(len(REQUESTS)))
def test_fixed_mask_equals_our_mask_method_before_the_llm(served, i):
    run, full = served["out"]["random"], served["out"]["full"]
    for entry, whole in zip(kept_entries(run, i), kept_entries(full, i), strict=True):  # the budget is per image
        assert entry["grid"] == whole["grid"]
        assert len(entry["kept"]) == max(1, int(KEEP * len(whole["kept"])))
    mask = kept_mask(kept_entries(run, i))
    if i in SINGLE:  # the fixed mask is our random method's own (the same code picks it on both sides)
        assert torch.equal(ours(served, "random", i, keep_ratio=KEEP, seed=3)[2], mask)
    tokens, logps, keep, kv_len = ours(served, "mask", i, keep_masks=[mask], prune_layer=-1)
    check_same(run, i, tokens, logps, kv_len)
    assert run["tokens"][i] != full["tokens"][i] or run["logprobs"][i] != pytest.approx(full["logprobs"][i], abs=0.05)


def test_hf_overrides_opt_in_equals_the_opt_in_folder(served):
    a, b = served["out"]["overrides"], served["out"]["random"]
    assert a["kept"] == b["kept"] and a["tokens"] == b["tokens"] and a["prompt_len"] == b["prompt_len"]
    for x, y in zip(a["logprobs"], b["logprobs"]):
        assert x == pytest.approx(y, abs=1e-5)


def test_a_prompt_prefilled_in_chunks_equals_one_prefilled_whole(served):
    """vLLM rewrites a request's positions from the kept rows' position channels chunk by chunk (``in the middle of
    media``): with chunks that end inside the pruned images the generation is the single-chunk one."""
    a, b = served["out"]["chunked"], served["out"]["random"]
    assert a["max_scheduled_tokens"] == CHUNK < min(b["prompt_len"])  # every prompt in 2 or 3 chunks
    assert b["max_scheduled_tokens"] > max(b["prompt_len"])  # the run it is compared with: one chunk
    assert a["prompt_len"] == b["prompt_len"]
    assert a["kept"] == b["kept"] and a["tokens"] == b["tokens"]
    for x, y in zip(a["logprobs"], b["logprobs"]):
        assert x == pytest.approx(y, abs=2e-3)


@pytest.mark.parametrize("i", SINGLE)
def test_early_glimpse_picks_the_same_tokens_as_our_runtime(served, i):
    run = served["out"]["early_glimpse"]
    tokens, logps, keep, kv_len = ours(served, "early_glimpse", i, module=served["early"],
                                       selection=SelectionConfig(fixed_keep_ratio=KEEP))
    assert torch.equal(kept_mask(kept_entries(run, i)), keep)
    check_same(run, i, tokens, logps, kv_len)


def test_the_same_image_with_another_question_is_pruned_again(served):
    """Requests 0 and 2 send the same image with different questions: the early glimpse reads the question, so vLLM
    must not serve request 2 request 0's pruning (a processed item cached under the image's hash alone would be)."""
    (a, qa), (b, qb) = REQUESTS[0], REQUESTS[2]
    assert a == b and qa != qb
    kept = served["out"]["early_glimpse"]["kept"]
    assert len(kept[2]) == 1  # the model ran on request 2's image (not vLLM's cache of request 0's)
    assert kept[0][0]["kept"] != kept[2][0]["kept"]  # equal to our runtime's picks for each: see the test above


@pytest.mark.parametrize("i", SINGLE)
def test_visionzip_merges_the_same_tokens_as_our_runtime(served, i):
    run = served["out"]["visionzip"]
    tokens, logps, keep, kv_len = ours(served, "visionzip", i, keep_ratio=KEEP)
    assert torch.equal(kept_mask(kept_entries(run, i)), keep)
    check_same(run, i, tokens, logps, kv_len)


def test_a_pruned_request_holds_fewer_kv_blocks(served):
    out = served["out"]
    for i in range(len(REQUESTS)):
        full = out["full"]["kv_blocks"][i]
        bs = out["full"]["block_size"]
        assert full == -(-out["full"]["prompt_len"][i] // bs)  # vLLM's pool count is the prompt's blocks
        for name in ("random", "early_glimpse", "visionzip"):
            assert out[name]["kv_blocks"][i] < full, (name, i, out[name]["kv_blocks"][i], full)


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_folder_fails_at_load_with_an_error_that_names_the_problem(served, name):
    result = served["out"][name]
    assert result["error"] is not None, f"vLLM started on the bad folder {name}"
    assert BAD_MESSAGES[name] in result["error"], result["error"][-3000:]
    assert result["seconds"] < 120  # refused while loading, not after a timeout
