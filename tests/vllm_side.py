"""The vLLM half of the serving equivalence tests (tests/test_vllm_serving.py), run with the vLLM environment's
Python: ``python tests/vllm_side.py JOB.json OUT.json``. Not collected by pytest.

JOB: {"runs": [{"name", "model", "requests": [{"prompt", "images": [path, ...]}], "max_tokens", "engine_args"?}]}.
Each run starts vLLM in this process (one engine at a time, greedy, fp32, up to MAX_IMAGES images per prompt) on its
model folder and, per request (one at a time), records the generated tokens, their log-probabilities, the prompt
length vLLM scheduled, the KV-cache blocks the request held after its prefill (vLLM's block pool: free blocks before
minus after) and, for pruning folders, the kept indices the model logged for each of its images (none for images vLLM
served from its cache). OUT is written after every run. A run with "expect_error": true only starts vLLM and records
the error it raised.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: its scheduler is readable
# a fixed KV pool: by default vLLM's CPU worker wants 92 % of the machine's memory free at start, which a test run
# (the pytest process beside it) does not leave
KV_BYTES = 1 << 30
MAX_IMAGES = 2


def _scheduler(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


def run_one(run: dict, log_dir: Path) -> dict:
    from PIL import Image
    from vllm import LLM, SamplingParams

    kept_log = log_dir / f"{run['name']}.kept.jsonl"
    kept_log.unlink(missing_ok=True)
    os.environ["GLIMPSEPRUNE_VLLM_KEPT_LOG"] = str(kept_log)
    t0 = time.time()
    llm = LLM(model=run["model"], dtype="float32", max_model_len=2048, enforce_eager=True, seed=0,
              limit_mm_per_prompt={"image": MAX_IMAGES}, max_num_seqs=4, enable_prefix_caching=False,
              kv_cache_memory_bytes=KV_BYTES, **run.get("engine_args", {}))
    load_s = time.time() - t0
    kept_log.unlink(missing_ok=True)  # the engine's profiling run on dummy images logs too
    params = SamplingParams(temperature=0.0, max_tokens=run["max_tokens"], ignore_eos=True, logprobs=1)
    engine, pool = llm.llm_engine, _scheduler(llm).kv_cache_manager.block_pool
    out = {"tokens": [], "logprobs": [], "prompt_len": [], "kv_blocks": [], "kept": [], "load_s": round(load_s, 1)}
    logged = 0  # kept-log lines before this request
    for i, req in enumerate(run["requests"]):
        images = [Image.open(path).convert("RGB") for path in req["images"]]
        free0 = pool.get_num_free_blocks()
        engine.add_request(f"r{i}", {"prompt": req["prompt"], "multi_modal_data": {"image": images}}, params)
        held, finished = None, None
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished:
                    finished = o
            if held is None:
                held = free0 - pool.get_num_free_blocks()  # after the prefill step
        gen = finished.outputs[0]
        out["tokens"].append(list(gen.token_ids))
        out["logprobs"].append([step[t].logprob for t, step in zip(gen.token_ids, gen.logprobs)])
        out["prompt_len"].append(len(finished.prompt_token_ids))
        out["kv_blocks"].append(held)
        lines = kept_log.read_text().splitlines() if kept_log.exists() else []
        out["kept"].append([json.loads(line) for line in lines[logged:]])  # this request's images, in order
        logged = len(lines)
    out["block_size"] = _scheduler(llm).cache_config.block_size
    out["max_scheduled_tokens"] = _scheduler(llm).max_num_scheduled_tokens  # a step's token budget (prefill chunk)
    engine.engine_core.shutdown()
    del llm, engine, pool
    gc.collect()
    return out


def load_error(run: dict) -> dict:
    """Start vLLM on a folder that must be refused: the error text (its whole exception chain) and the seconds
    until vLLM gave up."""
    import traceback

    from vllm import LLM

    t0 = time.time()
    try:
        llm = LLM(model=run["model"], dtype="float32", max_model_len=2048, enforce_eager=True,
                  limit_mm_per_prompt={"image": MAX_IMAGES}, max_num_seqs=4, kv_cache_memory_bytes=KV_BYTES)
    except Exception as e:  # what a user sees
        return {"error": "".join(traceback.format_exception(e)), "seconds": round(time.time() - t0, 1)}
    llm.llm_engine.engine_core.shutdown()
    return {"error": None, "seconds": round(time.time() - t0, 1)}


def main(job_file: str, out_file: str) -> int:
    job = json.loads(Path(job_file).read_text())
    log_dir = Path(out_file).parent
    results: dict = {}
    for run in job["runs"]:
        results[run["name"]] = load_error(run) if run.get("expect_error") else run_one(run, log_dir)
        Path(out_file).write_text(json.dumps(results))
        print(f"vllm run {run['name']}: {results[run['name']]}"[:200], flush=True)
        gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
