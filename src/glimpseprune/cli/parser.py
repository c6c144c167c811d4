"""The argument parser of the ``glimpseprune`` command: every subcommand, its options and their help."""

from __future__ import annotations

import argparse
import sys

from ..video import DEFAULT_FPS, MAX_FRAMES
from .commands import (
    cmd_ask,
    cmd_convert,
    cmd_demo,
    cmd_make_tiny,
    cmd_make_world,
    cmd_methods,
    cmd_new_module,
    cmd_tasks,
    cmd_train,
    cmd_vllm_folder,
)
from .common import DTYPES, non_negative_int, port, positive_int
from .compare import cmd_compare
from .evaluate import cmd_eval


def _model_args(a) -> None:
    a.add_argument("--model", default="embedded", help="local Hugging Face directory of the base VLM "
                   "(default: the embedded world model shipped in the package)")
    a.add_argument("--module", help="glimpse module directory, or embedded / embedded-k0 (packaged; default: embedded "
                   "with the embedded model)")
    a.add_argument("--method", help="a registered pruning method (`glimpseprune methods`) but oracle and mask, "
                   "which need per-request boxes or masks (default: glimpse with a module, else full)")
    a.add_argument("--method-arg", action="append", metavar="KEY=VALUE", help="a setting of --method, e.g. "
                   "keep_ratio=0.1 or prune_layer=2 (repeat; `glimpseprune methods` lists them with defaults); "
                   "glimpse's selection has its own flags (--threshold ...)")
    a.add_argument("--threshold", type=float, default=0.5, help="glimpse: keep a token when its probability > this")
    a.add_argument("--max-keep-ratio", type=float, help="glimpse: cap on the kept fraction per sample (top-k)")
    a.add_argument("--min-keep", type=int, default=1, help="glimpse: keep at least this many visual tokens per "
                   "sample")
    a.add_argument("--fixed-keep-ratio", type=float, help="glimpse: keep exactly this fraction (matched-budget "
                   "mode)")
    a.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    a.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="base model dtype")


class _HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default after its help, unless it is None / off or the help already names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if ("default" in text or d is None or d is False or d == argparse.SUPPRESS or text == argparse.SUPPRESS
                or not (action.option_strings or action.nargs in ("?", "*"))):
            return text
        return text + " (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """The parser of every (sub)command, nested ones included (add_subparsers makes its parsers of this class):
    defaults in --help, and the output options shared by all, so that ``-v`` / ``-q`` work after the subcommand as
    well as before it. Under a subcommand they default to SUPPRESS: an option given before it is not reset."""

    def __init__(self, *args, top: bool = False, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)
        default = False if top else argparse.SUPPRESS
        self.add_argument("-v", "--verbose", action="store_true", default=default,
                          help="log progress at INFO level, show model-loading progress bars, tracebacks on errors")
        self.add_argument("-q", "--quiet", action="store_true", default=default,
                          help="no progress bars, no notes or info logs on stderr (results and errors still print)")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from .. import __version__

    def of(pkg: str) -> str:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return "not installed"

    return f"glimpseprune {__version__} (torch {of('torch')}, transformers {of('transformers')}, Python " \
           f"{sys.version.split()[0]})"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="glimpseprune", top=True, description="Dynamic visual-token pruning for VLMs (offline). "
                "Results go to stdout; progress, notes and errors to stderr.")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    a = sub.add_parser("ask", help="answer one question about an image or a video, printing the answer and "
                       "`kept n/N (x %%)`")
    a.add_argument("image_pos", nargs="?", metavar="IMAGE", help="image file (or use --image); with --video and no "
                   "QUESTION, the question")
    a.add_argument("question_pos", nargs="?", metavar="QUESTION", help="the question (or use --question)")
    a.add_argument("--image", action="append", help="image file; repeat for several images")
    a.add_argument("--video", help="video file (Qwen2.5-VL; decoded with PyAV: pip install 'glimpseprune[video]'), "
                   "placed after the images; e.g. ask --video clip.mp4 'What happens?'")
    a.add_argument("--fps", type=float, help=f"with --video: frames sampled per second (default {DEFAULT_FPS:g})")
    a.add_argument("--max-frames", type=positive_int, help=f"with --video: most frames sampled (default {MAX_FRAMES}; "
                   "a longer clip is sampled evenly over its whole length)")
    a.add_argument("--question", help="the question text")
    a.add_argument("--overlay", help="write the (first) image with its kept tokens highlighted to this PNG; with "
                   "--video, a contact sheet of its frames, each with its kept tokens")
    a.add_argument("--overwrite", action="store_true", help="let --overlay replace an existing file that is not an "
                   "overlay drawn by glimpseprune (one it drew is replaced anyway; the input image never is)")
    _model_args(a)
    a.add_argument("--max-new-tokens", type=positive_int, default=32, help="tokens to generate")
    a.add_argument("--json", action="store_true", help="print one JSON line instead of text (notes go to stderr)")
    a.set_defaults(fn=cmd_ask)

    e = sub.add_parser("eval", help="exact match and kept fractions on a JSONL split (samples.jsonl + summary.json)")
    e.add_argument("--split", help="records JSONL (e.g. from `glimpseprune make-world`)")
    e.add_argument("--task", help="instead of --split: a registered benchmark (see `glimpseprune tasks`), read from "
                   "--data")
    e.add_argument("--data", help="with --task: the benchmark's local release folder (nothing is downloaded)")
    e.add_argument("--max-new-tokens", type=positive_int, default=32, help="with --task: tokens to generate")
    e.add_argument("--judge-url", help="OpenAI-compatible endpoint of the LLM judge (free-form tasks)")
    e.add_argument("--judge-model", help="the judge's model name (recorded in the results)")
    e.add_argument("--judge-cache", help="folder of the judge's on-disk cache (default OUT/judge_cache)")
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--limit", type=positive_int, help="evaluate the first N records only")
    e.add_argument("--batch-size", type=positive_int, default=8, help="samples per batch")
    e.add_argument("--resume", action="store_true", help="continue an interrupted run in OUT (same settings): "
                   "records already in OUT/samples.jsonl are not run again")
    e.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in OUT")
    e.add_argument("--on-error", choices=["stop", "skip"], default="stop", help="a record that cannot be "
                   "evaluated (unreadable image, refused question): stop with the results so far saved (default), or "
                   "skip it, logging it in OUT/errors.jsonl")
    e.add_argument("--compare-full", action="store_true", help="also run without pruning (OUT/full) and report "
                   "the relative accuracy (OUT/relative.json)")
    e.add_argument("--json", action="store_true", help="print the summary (OUT/summary.json; with --compare-full "
                   "also the full run's and the relative report) as one JSON object on stdout; the human-readable "
                   "lines go to stderr")
    _model_args(e)
    e.set_defaults(fn=cmd_eval)

    k = sub.add_parser("compare", help="pruning methods x budgets on a split: one JSON per run, compare.md, "
                       "compare.png")
    k.add_argument("--split", help="records JSONL (e.g. from `glimpseprune make-world`)")
    k.add_argument("--out", required=True, help="output folder")
    k.add_argument("--task", help="instead of --split: a registered benchmark (see `glimpseprune tasks`), read from "
                   "--data; every run goes through the task's prompt and metric")
    k.add_argument("--data", help="with --task: the benchmark's local release folder (nothing is downloaded)")
    k.add_argument("--max-new-tokens", type=positive_int, default=32, help="with --task: tokens to generate")
    k.add_argument("--judge-url", help="OpenAI-compatible endpoint of the LLM judge (free-form tasks)")
    k.add_argument("--judge-model", help="the judge's model name (recorded in the results)")
    k.add_argument("--judge-cache", help="folder of the judge's on-disk cache (default OUT/judge_cache)")
    k.add_argument("--resume", action="store_true", help="with --task: continue an interrupted comparison in OUT "
                   "(same settings): finished runs are kept, an interrupted one continues from its samples")
    k.add_argument("--methods", nargs="+", help="registered methods (default: all but mask and early_glimpse; full "
                   "always runs)")
    k.add_argument("--budgets", type=float, nargs="+",
                   help="kept fractions of the fixed-budget runs (default: 0.056 0.111 0.222 0.333)")
    k.add_argument("--k-sweep", action="store_true", help="instead: accuracy and prefill cost vs the pruning "
                   "layer K (GlimpsePrune's masks, oracle boxes and attention top-k dropped after each K)")
    k.add_argument("--cap", type=float, help="cap of GlimpsePrune's capped dynamic run (default 0.111)")
    k.add_argument("--limit", type=positive_int, help="evaluate the first N records only")
    k.add_argument("--batch-size", type=positive_int, default=16, help="samples per batch")
    k.add_argument("--overwrite", action="store_true", help="replace the results of an earlier comparison in OUT")
    k.add_argument("--model", default="embedded", help="local base model folder (default: the embedded one)")
    k.add_argument("--module", help="glimpse module folder (default: the embedded one with the embedded model)")
    k.add_argument("--device", default="cpu", help="torch device")
    k.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="base model dtype")
    k.add_argument("--json", action="store_true", help="print one JSON object on stdout: the output folder and each "
                   "run's headline figures (with --k-sweep: the sweep); the table and progress go to stderr")
    k.set_defaults(fn=cmd_compare)

    w = sub.add_parser("make-world", help="render a split of the synthetic VQA world (PNGs + records.jsonl)")
    w.add_argument("--out", required=True, help="output folder")
    w.add_argument("--n", type=positive_int, default=500, help="number of samples (families in turn)")
    w.add_argument("--overwrite", action="store_true", help="replace another split in OUT (the same split is left "
                   "as it is)")
    w.add_argument("--seed", type=non_negative_int, default=1, help="split seed (1 is the held-out split used in "
                   "the README)")
    w.add_argument("--video", action="store_true", help="render clips instead (video_records.jsonl + videos/): the "
                   "question's evidence is visible in one moment (frame pair) only")
    w.add_argument("--frames", type=positive_int, help="with --video: frames per clip (a multiple of 2; default 4)")
    w.set_defaults(fn=cmd_make_world)

    r = sub.add_parser("train", help="train from a YAML config: stage 1 (glimpse token + VIP) or `stage: 2` "
                       "(GlimpsePrune+, GRPO + LoRA)")
    r.add_argument("--config", required=True, help="YAML file (see configs/)")
    r.add_argument("--output-dir", help="override the config's output_dir")
    r.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir (its "
                   "recorded config must match)")
    r.add_argument("--overwrite", action="store_true", help="replace the earlier run in output_dir")
    r.add_argument("--merge", metavar="DIR", help="stage 2: also write the base model with the LoRA adapter merged "
                   "into its weights to DIR")
    r.add_argument("--device", help="torch device (default cpu)")
    r.set_defaults(fn=cmd_train)

    c = sub.add_parser("convert", help="convert an upstream release (config.json + new_modules_gp.pt)")
    c.add_argument("--upstream", required=True, help="upstream module directory")
    c.add_argument("--out", required=True, help="output directory")
    c.add_argument("--vision-depth", type=positive_int, metavar="N", help="blocks of the base model's vision "
                   "encoder. Qwen2.5-VL releases record it (vision_config.depth) and LLaVA-1.5 releases do not "
                   "(assumed 24, CLIP-L); N overrides either, e.g. for a LLaVA with another CLIP tower")
    c.add_argument("--overwrite", action="store_true", help="write into --out although it holds files")
    c.set_defaults(fn=cmd_convert)

    n = sub.add_parser("new-module", help="write an untrained glimpse module sized for a base model")
    n.add_argument("--model", required=True, help="local base model directory")
    n.add_argument("--out", required=True, help="output directory")
    n.add_argument("--preset", help="named preset of a released architecture: qwen2_5_vl_7b, qwen2_5_vl_3b, "
                   "llava_1_5_7b, llava_1_5_13b, qwen3_vl_8b, qwen3_vl_4b, qwen3_vl_2b")
    n.add_argument("--small", action="store_true", help="small VIP widths for tiny test models")
    n.add_argument("--seed", type=non_negative_int, default=0, help="initialisation seed")
    n.add_argument("--overwrite", action="store_true", help="write into --out although it holds files")
    n.set_defaults(fn=cmd_new_module)

    t = sub.add_parser("make-tiny", help="write a tiny random model (DIR/model: Qwen2.5-VL, LLaVA-1.5 or Qwen3-VL), an "
                       "untrained module (DIR/module) and an image (DIR/example.png), for demos and tests")
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--family", choices=["qwen2_5_vl", "llava", "qwen3_vl"], default="qwen2_5_vl", help="model family")
    t.add_argument("--seed", type=non_negative_int, default=0, help="initialisation seed")
    t.add_argument("--overwrite", action="store_true", help="write into --out although it holds files")
    t.set_defaults(fn=cmd_make_tiny)

    v = sub.add_parser("vllm-folder", help="write a model folder that vLLM serves with its images pruned before the "
                       "LLM (links the base files, edits config.json, copies the module)",
                       description="Write OUT: the Qwen2.5-VL folder MODEL opted in to pruning in vLLM. Every file "
                       "but config.json is linked (no weights are copied); config.json names the architecture "
                       "GlimpsePruneQwen2_5_VLForConditionalGeneration and holds a 'glimpseprune' section; a module "
                       "method's module is copied into OUT/glimpse_module. Methods vLLM can run (before the LLM, a "
                       "count fixed by --keep-ratio): early_glimpse, cdpruner, divprune, visionzip, random, "
                       "downsample, full. Then: vllm serve OUT (with glimpseprune installed in vLLM's environment).")
    v.add_argument("--model", required=True, help="local Qwen2.5-VL model folder")
    v.add_argument("--out", required=True, help="new output folder (refused if it holds files)")
    v.add_argument("--method", required=True, help="early_glimpse, cdpruner, divprune, visionzip, random, downsample "
                   "or full")
    v.add_argument("--keep-ratio", type=float, help="share of each image's visual tokens kept, in (0, 1] (full: 1)")
    v.add_argument("--module", help="trained module folder (early_glimpse)")
    v.add_argument("--method-arg", action="append", metavar="KEY=VALUE", help="another setting of --method, e.g. "
                   "seed=1 (repeatable)")
    v.set_defaults(fn=cmd_vllm_folder)

    tk = sub.add_parser("tasks", help="list the registered benchmark tasks (eval --task NAME --data DIR)")
    tk.set_defaults(fn=cmd_tasks)

    d = sub.add_parser("demo", help="a browser app (Gradio, offline): ask a question about an image and see the "
                       "answer streamed, the kept tokens drawn and GlimpsePrune's cost beside the full-token run's",
                       description="Serve a Gradio app on this machine (nothing is shared or downloaded; telemetry "
                       "off). Upload an image or pick a rendered world scene, ask a question: the GlimpsePrune answer "
                       "streams in as it is decoded, the image is drawn with its kept visual tokens outlined and a "
                       "caption (question, answer, kept n/N), and a table puts GlimpsePrune's kept tokens, prefill "
                       "and decode time and KV-cache length beside the same question asked with every visual token. "
                       "The threshold and cap sliders re-run the question. Needs gradio: pip install "
                       "'glimpseprune[demo]'.")
    d.add_argument("--model", default="embedded", help="local base model folder (default: the embedded one)")
    d.add_argument("--module", default="embedded", help="glimpse module folder (or a GlimpsePrune+ folder)")
    d.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: reachable from other "
                   "machines)")
    d.add_argument("--port", type=port, default=7860, help="port to serve on")
    d.add_argument("--max-new-tokens", type=positive_int, default=32, help="tokens to generate per answer")
    d.add_argument("--device", default="cpu", help="torch device")
    d.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="base model dtype")
    d.set_defaults(fn=cmd_demo)

    m = sub.add_parser("methods", help="list the registered pruning methods: where each prunes, its settings")
    m.add_argument("--json", action="store_true", help="print them as one JSON list")
    m.set_defaults(fn=cmd_methods)

    from ..bench.report import add_bench_parser

    add_bench_parser(sub)
    return p
