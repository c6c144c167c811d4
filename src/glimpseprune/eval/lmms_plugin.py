"""lmms-eval plugin: ``lmms-eval --model glimpseprune --model_args model=DIR,module=DIR,max_keep_ratio=0.5 --tasks T``.

Registered through the ``lmms_eval.models`` entry-point group (lmms-eval >= 0.7; see ``pyproject.toml``), whose
payload is :func:`manifest`. Requests are answered in batches by :meth:`glimpseprune.PrunedModel.generate`; the kept
visual tokens (n_kept / n_vis / kv_len) are recorded per request and their means are logged through lmms-eval's
metric log, so they appear in the results under ``"throughput"`` (``avg_glimpseprune_n_kept`` ...) beside the scores.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from loguru import logger as eval_logger
from PIL import Image

from ..config import SelectionConfig

MODEL_ID = "glimpseprune"
CLASS_PATH = "glimpseprune.eval.lmms_plugin.GlimpsePruneLMMS"
# image placeholders of lmms-eval prompts (``<image>``, ``<image 1>``, ``<image_1>``) and Qwen's vision tokens:
# our processor inserts the images itself and refuses control tokens in a question
_PLACEHOLDER = re.compile(r"<image(?:[ _]?\d+)?>|<\|vision_start\|>|<\|image_pad\|>|<\|vision_end\|>")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def _filelock_compat() -> None:
    """lmms-eval 0.7.3 patches ``filelock._api`` (its cross-class singleton lock cache) at the start of every
    evaluation; filelock 4 (what huggingface_hub / torch resolve to here) has no ``_api``, so the patch raises.
    With filelock 4 the patch is marked done (skipped). Called when the model is built (which lmms-eval does just
    before patching), not at import: the entry point imports this module while ``lmms_eval.models`` initialises."""
    try:
        import filelock._api  # noqa: F401
    except ImportError:
        try:
            from lmms_eval import evaluator
        except ImportError:  # pragma: no cover - an lmms-eval without that module has no such patch
            return
        patch = getattr(evaluator, "_enable_reentrant_filelocks", None)
        if patch is not None:
            patch._patched = True


def manifest():
    """The entry-point payload: lmms-eval's model manifest naming :class:`GlimpsePruneLMMS`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)


# generation_kwargs that lmms-eval tasks set and what becomes of them here; others are logged once and ignored
KNOWN_GEN_KWARGS = {"until", "max_new_tokens", "temperature", "do_sample", "top_p", "top_k", "num_beams",
                    "repetition_penalty"}
_warned: set[str] = set()


def decoding_kwargs(gen_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``PrunedModel.generate`` settings from a task's ``generation_kwargs``, by lmms-eval's own convention (its
    simple Qwen2.5-VL model): sampling exactly when ``temperature > 0`` (``do_sample`` alone does not sample), then
    with ``top_p`` / ``top_k``; greedy otherwise; ``repetition_penalty`` either way. Beam search is refused."""
    if int(gen_kwargs.get("num_beams") or 1) > 1:
        raise ValueError(f"generation_kwargs num_beams={gen_kwargs['num_beams']}: beam search is not supported "
                         "(the pruning runtime decodes greedily or by sampling)")
    unknown = sorted(set(gen_kwargs) - KNOWN_GEN_KWARGS - _warned)
    if unknown:
        _warned.update(unknown)
        eval_logger.warning(f"glimpseprune ignores generation_kwargs {unknown}")
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    out: dict[str, Any] = {"do_sample": temperature > 0}
    if temperature > 0:
        out["temperature"] = temperature
        for key, cast in (("top_p", float), ("top_k", int)):
            if gen_kwargs.get(key) is not None:
                out[key] = cast(gen_kwargs[key])
    if gen_kwargs.get("repetition_penalty") is not None:
        out["repetition_penalty"] = float(gen_kwargs["repetition_penalty"])
    return out


def _optional(value: Any) -> Any:
    """None for lmms-eval's spellings of "unset" in ``--model_args`` ("", "none", "null")."""
    if value is None or (isinstance(value, str) and value.strip().lower() in {"", "none", "null"}):
        return None
    return value


def clean_context(context: str) -> str:
    """The question text of an lmms-eval context: image placeholders removed, whitespace tidied."""
    return re.sub(r"[ \t]+\n", "\n", _PLACEHOLDER.sub("", context)).strip()


def truncate_at(text: str, until: list[str]) -> str:
    """The text up to the first stop string (lmms-eval's ``until``)."""
    cut = len(text)
    for stop in until:
        if stop:
            at = text.find(stop)
            if at != -1:
                cut = min(cut, at)
    return text[:cut]


def _as_images(visuals: Any) -> list[Image.Image | str | Path]:
    """A doc's visuals as a list of PIL images / image paths; videos and audio are refused by name."""
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        visuals = [visuals]
    out: list[Image.Image | str | Path] = []
    for v in visuals:
        if isinstance(v, Image.Image):
            out.append(v.convert("RGB") if v.mode != "RGB" else v)
        elif isinstance(v, (str, Path)) and Path(v).suffix.lower() in {".png", ".jpg", ".jpeg", ".webp", ".bmp",
                                                                         ".gif", ".tif", ".tiff"}:
            out.append(v)
        else:
            raise ValueError(f"glimpseprune answers image questions only; got a {type(v).__name__} visual "
                             f"({str(v)[:80]!r})")
    return out


class GlimpsePruneLMMS(lmms):
    """An lmms-eval model answering with a :class:`glimpseprune.PrunedModel` (greedy by default, batched).

    model_args: ``model`` (directory or ``embedded``), ``module`` (directory, ``embedded``/``embedded-k0``, or
    none for the unpruned model), ``method`` (default: glimpse with a module, else full), the selection fields
    ``threshold`` / ``max_keep_ratio`` / ``min_keep`` / ``fixed_keep_ratio``, ``max_new_tokens``, ``dtype``.
    """

    is_simple = True

    def __init__(self, model: str = "embedded", module: str | None = None, method: str | None = None,
                 threshold: float = 0.5, max_keep_ratio: float | None = None, min_keep: int = 1,
                 fixed_keep_ratio: float | None = None, max_new_tokens: int = 32, dtype: str = "float32",
                 batch_size: int | str | None = 1, device: str | None = None, max_batch_size: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__()
        _filelock_compat()
        import glimpseprune
        from glimpseprune.assets import resolve_model, resolve_module

        if kwargs:
            eval_logger.warning(f"glimpseprune: ignoring unknown model_args {sorted(kwargs)}")
        if str(dtype) not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        bs = _optional(batch_size)
        if bs is None or str(bs) == "auto" or str(bs).startswith("auto:"):
            bs = 1 if bs is None else int(_optional(max_batch_size) or 8)
        self.batch_size = int(bs)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        self.max_new_tokens = int(max_new_tokens)
        selection = SelectionConfig(threshold=float(threshold), max_keep_ratio=_optional(max_keep_ratio),
                                    min_keep=int(min_keep), fixed_keep_ratio=_optional(fixed_keep_ratio))
        self._device = torch.device(_optional(device) or "cpu")
        self.pm = glimpseprune.load(resolve_model(str(model)), module=resolve_module(_optional(module)),
                                    method=_optional(method), selection=selection, device=self._device,
                                    dtype=_DTYPES[str(dtype)])
        self.records: list[dict[str, Any]] = []  # per answered request: task, doc_id, n_kept, n_vis, kv_len

    @property
    def device(self) -> torch.device:
        return self._device

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError("glimpseprune answers generate_until tasks only: pruning decisions are made at "
                                  "prefill for generation, loglikelihood (multiple-choice scoring) tasks are not "
                                  "supported; use the task's generation variant")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("glimpseprune does not support multi-round generation tasks")

    def _batches(self, requests: list[Instance]) -> list[list[int]]:
        """Request indices grouped by (task, split, generation kwargs), in chunks of batch_size."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            _, gen_kwargs, _, _, task, split = req.args
            key = json.dumps([task, split, gen_kwargs], sort_keys=True, default=str)
            groups.setdefault(key, []).append(i)
        return [idx[s:s + self.batch_size] for idx in groups.values() for s in range(0, len(idx), self.batch_size)]

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answers per request, in request order; logs the mean kept-token statistics of the run."""
        answers: list[str | None] = [None] * len(requests)
        start, n_gen, stats = time.perf_counter(), 0, []
        for batch in self._batches(requests):
            args = [requests[i].args for i in batch]
            gen_kwargs = dict(args[0][1] or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            images = [_as_images(doc_to_visual(self.task_dict[task][split][doc_id]))
                      for _, _, doc_to_visual, doc_id, task, split in args]
            questions = [clean_context(a[0]) for a in args]
            out = self.pm.generate(images=images, questions=questions,
                                   max_new_tokens=int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens),
                                   **decoding_kwargs(gen_kwargs))
            tokenizer = getattr(self.pm.processor, "tokenizer", None)
            for b, i in enumerate(batch):
                text = truncate_at(out.texts[b], until).strip()
                answers[i] = text
                if tokenizer is not None:
                    n_gen += len(tokenizer(out.texts[b], add_special_tokens=False)["input_ids"])
                rec = {"task": args[b][4], "doc_id": args[b][3], "n_kept": int(out.n_kept[b]),
                       "n_vis": int(out.n_vis[b]), "kv_len": int(out.kv_len[b])}
                stats.append(rec)
                self.cache_hook.add_partial("generate_until", (args[b][0], gen_kwargs), text)
        self.records.extend(stats)
        if stats:
            self._log(stats, time.perf_counter() - start, n_gen)
        return [a if a is not None else "" for a in answers]

    @staticmethod
    def summarize(records: list[dict[str, Any]]) -> dict[str, float]:
        """Means of n_kept, n_vis, kv_len and of the kept fraction n_kept / n_vis over records."""
        n = max(len(records), 1)
        mean = {k: sum(r[k] for r in records) / n for k in ("n_kept", "n_vis", "kv_len")}
        mean["kept_frac"] = sum(r["n_kept"] / r["n_vis"] for r in records if r["n_vis"]) / max(
            sum(1 for r in records if r["n_vis"]), 1)
        return mean

    def summary(self) -> dict[str, float]:
        """The kept-token means over every request answered so far."""
        return self.summarize(self.records)

    def _log(self, stats: list[dict[str, Any]], elapsed: float, n_gen: int) -> None:
        extra = {f"glimpseprune_{k}": v for k, v in self.summarize(stats).items()}
        extra["num_requests"] = len(stats)  # lmms-eval derives avg_latency from it
        try:  # lmms-eval >= 0.4: lands in results["throughput"] as avg_<key>
            from lmms_eval.models.model_utils.gen_metrics import log_metrics
        except ImportError:  # pragma: no cover - older releases
            eval_logger.info(f"glimpseprune kept-token stats: {extra}")
            return
        log_metrics(total_elapsed_time=elapsed, total_gen_tokens=n_gen,
                    avg_speed=n_gen / elapsed if elapsed > 0 else 0.0, additional_metrics=extra)
        eval_logger.info("glimpseprune: kept {:.1f}/{:.1f} visual tokens ({:.1%}), KV cache {:.1f} entries".format(
            extra["glimpseprune_n_kept"], extra["glimpseprune_n_vis"], extra["glimpseprune_kept_frac"],
            extra["glimpseprune_kv_len"]))
