"""vLLM under load: stock Qwen2.5-VL vs the same model with its images pruned before the LLM (the glimpseprune plugin).

    .venv/bin/python benchmarks/vllm_load.py --out results/vllm_load            (CPU: the scaled CPU shape)
    .venv/bin/python benchmarks/vllm_load.py --shape qwen2_5_vl_7b --device cuda --image-px 1988 \\
        --requests 64 --concurrency 16 --out runs/vllm_load_7b    (a GPU machine: 71 x 71 = 5,041 visual tokens)

What it does, in one run: builds a model folder of the shape (config + processor, no weights: vLLM starts with
``--load-format dummy``, random weights; timings do not depend on them) and, for the pruned variant, an opt-in folder
(``serving.folder``) with a random early-glimpse module of the shape (or another method, ``--method``). Then,
``--rounds`` times, for each variant in turn (stock, pruned, stock, pruned, ...) it starts ``vllm serve`` on
127.0.0.1 (the vLLM environment's Python, ``--vllm-python``), sends ``--warmup`` requests, then ``--requests`` chat
requests with a bounded number in flight (``--concurrency``), each a distinct random image (no encoder-cache hits;
prefix caching off) and a question, ``--max-tokens`` generated with ``ignore_eos``; streams each answer to time its
first token; polls ``/metrics`` for vLLM's KV-cache usage; stops the server. Results: ``OUT/<variant>.json`` (per
round and request: TTFT, latency, prompt and completion tokens), ``OUT/summary.json`` and ``OUT/summary.md`` with
pruned / stock ratios of throughput (all requests / all load seconds of a variant; and per round), TTFT and KV blocks.
Model folders and server logs live in a temporary folder (printed; kept when a server fails). The machine should be
otherwise idle; the client threads are light (they wait on sockets).
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import io
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = ["What is in the picture?", "Describe the colours you see.", "Is there a square left of the circle?",
             "How many objects are there?"]


def build_folders(args, root: Path) -> dict[str, Path]:
    """``stock``: the shape's Qwen2.5-VL folder (no weights); ``pruned``: it, opted in to ``args.method``."""
    import torch
    from transformers import GenerationConfig
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    import glimpseprune as gp
    from glimpseprune.bench.shapes import load_shape
    from glimpseprune.modules.early import EarlyGlimpseModule
    from glimpseprune.adapters.qwen2_5_vl_processing import QwenVLProcessor, make_tiny_qwen_tokenizer
    from glimpseprune.processing import save_processor
    from glimpseprune.serving.folder import write_vllm_folder
    from glimpseprune.serving.spec import qwen2_5_vl_dims
    from glimpseprune.testing import _special_token_ids

    shape = load_shape(args.shape)
    tokenizer = make_tiny_qwen_tokenizer()
    config = shape.to_hf_config(token_ids=_special_token_ids(tokenizer))  # the tiny tokenizer's special tokens
    stock = root / "stock"
    stock.mkdir(parents=True, exist_ok=True)
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]  # a bare config would resolve to the embedding model
    config.dtype = "bfloat16" if args.device == "cuda" else "float32"
    config.save_pretrained(stock)
    GenerationConfig(eos_token_id=config.text_config.eos_token_id, do_sample=False).save_pretrained(stock)
    v = shape.vision
    side = v.patch_size * v.spatial_merge_size
    image_processor = Qwen2VLImageProcessorPil(min_pixels=side * side, max_pixels=args.image_px ** 2,
                                               patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
                                               merge_size=v.spatial_merge_size)
    save_processor(QwenVLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                   chat_template=tokenizer.chat_template), stock)
    module = None
    if args.method == "early_glimpse":
        torch.manual_seed(0)
        cfg = gp.config_for_model(qwen2_5_vl_dims(config), kind="early", **dataclasses.asdict(shape.vip))
        module = gp.save_module(EarlyGlimpseModule(cfg).eval(), root / "early_module")
    pruned = write_vllm_folder(stock, root / "pruned", args.method, args.keep_ratio, module=module)
    return {"stock": stock, "pruned": pruned}


def images(n: int, px: int, seed: int) -> list[str]:
    """n distinct random PNG images (data URLs), px x px."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        arr = (rng.random((px // 16, px // 16, 3)) * 255).astype("uint8")
        img = Image.fromarray(arr).resize((px, px), Image.NEAREST)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return out


def get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def start_server(args, folder: Path, port: int, log: Path) -> subprocess.Popen:
    cmd = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
           "--served-model-name", "m", "--host", "127.0.0.1", "--port", str(port), "--load-format", "dummy",
           "--dtype", "bfloat16" if args.device == "cuda" else "float32", "--max-model-len", str(args.max_model_len),
           "--max-num-seqs", str(args.concurrency), "--limit-mm-per-prompt", json.dumps({"image": 1}),
           "--no-enable-prefix-caching", "--seed", "0"]
    if args.device == "cpu":  # a fixed KV pool (else vLLM's CPU worker wants 92 % of the memory free at start)
        cmd += ["--enforce-eager", "--kv-cache-memory-bytes", str(args.kv_space_gib << 30)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    f = open(log, "w")
    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.time() + args.start_timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {proc.returncode} while starting; see {log}")
        try:
            get(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            time.sleep(1)
    stop_server(proc)
    raise RuntimeError(f"vllm serve did not answer /health within {args.start_timeout} s; see {log}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def chat(port: int, image: str, question: str, max_tokens: int, timeout: float) -> dict:
    """One streamed chat completion: TTFT, latency, prompt and completion tokens (from the usage chunk)."""
    body = {"model": "m", "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                      {"type": "text", "text": question}]}]}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    ttft, usage = None, None
    with urllib.request.urlopen(req, timeout=timeout) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if ttft is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                usage = chunk["usage"]
    if usage is None:
        raise RuntimeError("the server sent no usage chunk")
    return {"ttft_s": ttft, "latency_s": time.perf_counter() - t0, "prompt_tokens": usage["prompt_tokens"],
            "completion_tokens": usage["completion_tokens"]}


class KVWatch(threading.Thread):
    """Polls /metrics: the peak of vLLM's KV-cache usage gauge, and the pool's block count and size."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port, self.peak, self.blocks, self.block_size = port, 0.0, None, None
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                text = get(f"http://127.0.0.1:{self.port}/metrics")
            except OSError:
                time.sleep(0.25)
                continue
            for m in re.finditer(r"^vllm:kv_cache_usage_perc\{[^}]*\} ([0-9.e+-]+)$", text, re.M):
                self.peak = max(self.peak, float(m.group(1)))
            info = re.search(r"^vllm:cache_config_info\{([^}]*)\}", text, re.M)
            if info:
                labels = dict(re.findall(r'(\w+)="([^"]*)"', info.group(1)))
                self.blocks = int(labels["num_gpu_blocks"]) if labels.get("num_gpu_blocks", "None") != "None" else None
                self.block_size = int(labels["block_size"]) if labels.get("block_size", "None") != "None" else None
            time.sleep(0.25)


def load_once(args, name: str, folder: Path, port: int, imgs: list[str], rnd: int) -> dict:
    """One server start and one load pass; the requests' images are the round's own (distinct across rounds)."""
    proc = start_server(args, folder, port, args.work / f"server_{name}_{rnd}.log")
    base = rnd * args.requests
    try:
        for i in range(args.warmup):
            chat(port, imgs[-1 - i], QUESTIONS[i % len(QUESTIONS)], args.max_tokens, args.request_timeout)
        watch = KVWatch(port)
        watch.start()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            futures = [pool.submit(chat, port, imgs[base + i], QUESTIONS[i % len(QUESTIONS)], args.max_tokens,
                                   args.request_timeout) for i in range(args.requests)]
            results = [f.result() for f in futures]
        wall = time.perf_counter() - t0
        time.sleep(0.6)
        watch.done.set()
        watch.join()
    finally:
        stop_server(proc)
    print(f"round {rnd} {name}: {len(results) / wall:.3f} req/s", flush=True)
    return {"wall_s": wall, "kv_usage_peak": watch.peak, "kv_pool_blocks": watch.blocks,
            "block_size": watch.block_size, "requests": results}


def pooled(args, name: str, folder: Path, rounds: list[dict]) -> dict:
    """A variant's rounds together: throughput = all requests / all load seconds."""
    results = [r for rnd in rounds for r in rnd["requests"]]
    wall = sum(rnd["wall_s"] for rnd in rounds)
    prompt = statistics.mean(r["prompt_tokens"] for r in results)
    block = rounds[0]["block_size"]
    res = {"variant": name, "folder": str(folder), "wall_s": wall, "requests_per_s": len(results) / wall,
           "output_tokens_per_s": sum(r["completion_tokens"] for r in results) / wall,
           "requests_per_s_by_round": [len(rnd["requests"]) / rnd["wall_s"] for rnd in rounds],
           "ttft_median_s": statistics.median(r["ttft_s"] for r in results),
           "latency_median_s": statistics.median(r["latency_s"] for r in results), "prompt_tokens_mean": prompt,
           "kv_usage_peak": max(rnd["kv_usage_peak"] for rnd in rounds),
           "kv_pool_blocks": rounds[0]["kv_pool_blocks"], "block_size": block,
           "kv_blocks_per_request": math.ceil((prompt + args.max_tokens) / block) if block else None,
           "rounds": rounds}
    (args.out / f"{name}.json").write_text(json.dumps(res, indent=1) + "\n")
    print(f"{name}: {res['requests_per_s']:.3f} req/s, {res['output_tokens_per_s']:.1f} out tok/s, TTFT median "
          f"{res['ttft_median_s']:.2f} s, prompt {prompt:.0f} tokens, KV peak {100 * res['kv_usage_peak']:.1f} %",
          flush=True)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="new results folder (refused if it holds files)")
    p.add_argument("--vllm-python", default=str(REPO / ".venv-vllm" / "bin" / "python"))
    p.add_argument("--shape", default="qwen2_5_vl_scaled_cpu", help="configs/shapes/ name")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--method", default="early_glimpse", help="a method vLLM can run before the LLM")
    p.add_argument("--keep-ratio", type=float, default=0.111)
    p.add_argument("--image-px", type=int, default=896, help="image side in px (896: 32 x 32 = 1024 visual tokens)")
    p.add_argument("--requests", type=int, default=16, help="requests per round")
    p.add_argument("--rounds", type=int, default=2, help="server starts per variant, interleaved")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--kv-space-gib", type=int, default=2, help="CPU only: the KV-cache pool in GiB")
    p.add_argument("--start-timeout", type=float, default=600)
    p.add_argument("--request-timeout", type=float, default=600)
    p.add_argument("--port", type=int, default=8391)
    args = p.parse_args(argv)
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise SystemExit(f"{args.out} already exists and is not an empty folder (another run's results?); choose a "
                         "new --out")
    if not Path(args.vllm_python).exists():
        raise SystemExit(f"no vLLM environment at {args.vllm_python}: run scripts/setup_vllm_env.sh")
    args.out.mkdir(parents=True, exist_ok=True)
    args.work = Path(tempfile.mkdtemp(prefix="vllm_load_"))  # model folders and server logs
    print(f"model folders and server logs: {args.work}", flush=True)
    folders = build_folders(args, args.work)
    imgs = images(args.rounds * args.requests + args.warmup, args.image_px, seed=0)
    rounds: dict[str, list[dict]] = {name: [] for name in folders}
    for rnd in range(args.rounds):  # stock, pruned, stock, pruned, ...: drift hits both alike
        for i, name in enumerate(folders):
            rounds[name].append(load_once(args, name, folders[name], args.port + i, imgs, rnd))
    runs = {name: pooled(args, name, folders[name], rounds[name]) for name in folders}
    shutil.rmtree(args.work)  # kept when a variant fails, for its server log
    s, q = runs["stock"], runs["pruned"]
    summary = {
        "machine": f"{platform.node()} ({os.cpu_count()} CPUs, {args.device})", "shape": args.shape,
        "method": args.method, "keep_ratio": args.keep_ratio, "image_px": args.image_px,
        "requests": args.requests, "rounds": args.rounds, "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "throughput_ratio_by_round": [a / b for a, b in zip(q["requests_per_s_by_round"],
                                                            s["requests_per_s_by_round"])],
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "throughput_ratio": q["requests_per_s"] / s["requests_per_s"],
        "output_tokens_per_s_ratio": q["output_tokens_per_s"] / s["output_tokens_per_s"],
        "ttft_median_ratio": q["ttft_median_s"] / s["ttft_median_s"],
        "prompt_tokens": {"stock": s["prompt_tokens_mean"], "pruned": q["prompt_tokens_mean"]},
        "kv_blocks_per_request": {"stock": s["kv_blocks_per_request"], "pruned": q["kv_blocks_per_request"]},
        "kv_usage_peak": {"stock": s["kv_usage_peak"], "pruned": q["kv_usage_peak"]},
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    rows = ["| variant | req/s | output tok/s | TTFT median (s) | prompt tokens | KV blocks / request | KV peak |",
            "|---|---|---|---|---|---|---|"]
    for r in (s, q):
        rows.append(f"| {r['variant']} | {r['requests_per_s']:.3f} | {r['output_tokens_per_s']:.1f} | "
                    f"{r['ttft_median_s']:.2f} | {r['prompt_tokens_mean']:.0f} | {r['kv_blocks_per_request']} | "
                    f"{100 * r['kv_usage_peak']:.1f} % |")
    rows.append(f"\npruned / stock: throughput **{summary['throughput_ratio']:.2f}x**, TTFT median "
                f"{summary['ttft_median_ratio']:.2f}x ({args.method}, keep_ratio {args.keep_ratio}, {args.rounds} x "
                f"{args.requests} requests interleaved, {args.concurrency} in flight, {args.max_tokens} tokens each; "
                f"{summary['machine']})")
    (args.out / "summary.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
