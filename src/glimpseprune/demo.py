"""``glimpseprune demo``: a Gradio app to look at GlimpsePrune answer a question.

Upload an image (or pick one of the rendered world scenes), ask a question, and see the answer streamed as it is
decoded, the image with its kept visual tokens drawn, ``kept n/N``, and prefill / decode time and KV-cache length for
GlimpsePrune beside the same question asked with every visual token. The threshold and cap sliders re-run the
question. Everything runs offline on this machine (the embedded default unless a model and module are given);
Gradio's telemetry is switched off and nothing is shared unless asked.

``DemoSession`` holds the logic (no Gradio in it, tested directly); ``build_app`` wires it to Gradio components.
"""

from __future__ import annotations

import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .registry import get_adapter

EXAMPLE_SEED = 11
N_EXAMPLES = 5


@dataclass
class RunStats:
    """What one run cost: kept / total visual tokens, wall time (this machine) and the KV cache at decode."""

    answer: str
    n_kept: int
    n_vis: int
    prefill_ms: float
    decode_ms: float
    decode_steps: int
    kv_len: int

    @property
    def kept_frac(self) -> float:
        return self.n_kept / max(self.n_vis, 1)


def stats_markdown(glimpse: RunStats | None, full: RunStats | None) -> str:
    """The side-by-side table: GlimpsePrune and the full-token run (``None``: not run yet)."""
    def cell(s: RunStats | None, what: str) -> str:
        if s is None:
            return "…"
        return {
            "kept": f"{s.n_kept}/{s.n_vis} ({100 * s.kept_frac:.1f} %)",
            "prefill": f"{s.prefill_ms:.1f} ms",
            "decode": f"{s.decode_ms:.1f} ms ({s.decode_steps} steps)",
            "kv": f"{s.kv_len} tokens",
            "answer": s.answer.replace("|", "\\|").replace("\n", " ") or "(empty)",
        }[what]

    rows = [("visual tokens kept", "kept"), ("prefill (ViT + LLM)", "prefill"), ("decode", "decode"),
            ("KV cache at decode", "kv"), ("answer", "answer")]
    lines = ["| | GlimpsePrune | all visual tokens |", "|---|---|---|"]
    lines += [f"| {name} | {cell(glimpse, key)} | {cell(full, key)} |" for name, key in rows]
    if glimpse is not None and full is not None:
        lines.append("")
        lines.append(f"Prefill {glimpse.prefill_ms / max(full.prefill_ms, 1e-9):.2f}x and KV cache "
                     f"{glimpse.kv_len / max(full.kv_len, 1):.2f}x of the full-token run (wall time of this one "
                     "request on this machine).")
    return "\n".join(lines)


class DemoSession:
    """A base model + glimpse module loaded once; ``ask`` answers one question, streaming.

    ``ask(image, question, threshold, cap)`` is a generator of ``(answer so far, overlay image or None, stats
    markdown)``: first the GlimpsePrune answer as it is decoded, then its overlay and numbers, then the full-token
    run's numbers beside them."""

    def __init__(self, model: str = "embedded", module: str | None = "embedded", device: str = "cpu",
                 dtype: str = "float32", max_new_tokens: int = 32):
        import torch

        from .api import load_base, module_dtype, module_method_name
        from .assets import resolve_model, resolve_module
        from .checkpoint import load_plus

        if module is None:
            raise ValueError("the demo shows GlimpsePrune: give it a glimpse module (--module)")
        self.model_name, self.module_name = str(model), str(module)
        base, self.processor = load_base(resolve_model(model), device, getattr(torch, dtype))
        self.model, self.module = load_plus(base, resolve_module(module), device=device, dtype=module_dtype(base))
        self.method = module_method_name(self.module)  # an early module runs early_glimpse, as `ask` does
        self.max_new_tokens = max_new_tokens
        self._lock = threading.Lock()  # one request at a time: the timings are of that request alone
        self._warm_up()

    def _warm_up(self) -> None:
        """One untimed request per method: lazy initialisation is not charged to the first question's numbers."""
        from PIL import Image

        blank = Image.new("RGB", (224, 224), (128, 128, 128))
        for method in (self.method, "full"):
            self._pruned(method).generate(images=[[blank]], questions=["What is shown?"], max_new_tokens=1)

    def _pruned(self, method: str, threshold: float = 0.5, cap: float | None = None):
        from .api import PrunedModel, make_method
        from .config import SelectionConfig

        if method == "full":
            return PrunedModel(self.model, make_method("full"), self.processor)
        sel = SelectionConfig(threshold=float(threshold), max_keep_ratio=cap if cap else None)
        return PrunedModel(self.model, make_method(self.method, self.module, sel), self.processor)

    @staticmethod
    def _stats(out, answer: str) -> RunStats:
        return RunStats(answer=answer.strip(), n_kept=out.n_kept[0], n_vis=out.n_vis[0],
                        prefill_ms=1000 * out.timing["prefill"], decode_ms=1000 * out.timing["decode"],
                        decode_steps=out.timing["decode_steps"], kv_len=out.kv_len[0])

    def overlay(self, image, keep, question: str, answer: str):
        """``image`` at its own size, dropped tokens dimmed, kept ones outlined, with a caption band below."""
        from .bench.overlay import grid_box, overlay

        k = keep.cpu().numpy()
        box = grid_box(get_adapter(self.model), self.processor, image.size)
        return overlay(image, k, box=box, question=question, answer=answer, kept=int(k.sum()), total=int(k.size))

    def ask(self, image, question: str, threshold: float = 0.5, cap: float | None = None):
        from transformers import TextIteratorStreamer

        from .processing import load_image, to_rgb

        if image is None:
            raise ValueError("upload an image (or pick an example) first")
        if not question or not question.strip():
            raise ValueError("type a question first")
        if not 0.0 < float(threshold) < 1.0:
            raise ValueError(f"threshold must be between 0 and 1, got {threshold}")
        if cap is not None and not 0.0 <= float(cap) <= 1.0:
            raise ValueError(f"cap must be a kept fraction between 0 and 1 (0 = no cap), got {cap}")
        image = load_image(image) if isinstance(image, (str, Path)) else to_rgb(image)  # alpha onto white, as files
        with self._lock:
            pm = self._pruned(self.method, threshold, cap)
            inputs = pm.prepare([[image]], [question])
            streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
            result: dict[str, Any] = {}

            def work():
                try:
                    result["out"] = pm.generate(inputs, max_new_tokens=self.max_new_tokens, streamer=streamer)
                except BaseException as err:  # handed to the caller below; the streamer must still end
                    result["error"] = err
                    streamer.end()

            thread = threading.Thread(target=work, daemon=True)
            thread.start()
            text = ""
            try:
                for piece in streamer:
                    text += piece
                    yield text, None, stats_markdown(None, None)
            finally:  # also when the page closes the stream: the next request must not run beside this one
                thread.join()
            if "error" in result:
                raise result["error"]
            out = result["out"]
            answer = out.texts[0].strip()
            g = self._stats(out, answer)
            drawn = self.overlay(image, out.image_keep_masks[0], question, answer)
            yield answer, drawn, stats_markdown(g, None)
            full = self._pruned("full").generate(inputs, max_new_tokens=self.max_new_tokens)
            yield answer, drawn, stats_markdown(g, self._stats(full, full.texts[0]))


def example_scenes(folder: str | Path, n: int = N_EXAMPLES) -> list[list[str]]:
    """``n`` rendered world scenes with their questions, as Gradio example rows ``[image path, question]``."""
    from .data.records import read_records, write_split

    split = write_split(folder, n=n, seed=EXAMPLE_SEED, overwrite=True)
    return [[str(r.image_path(split.parent)), r.question] for r in read_records(split)]


def build_app(session: DemoSession, examples: list[list[str]] | None = None):
    """The Gradio Blocks app over ``session``."""
    import gradio as gr

    def run(image, question, threshold, cap):
        try:
            yield from session.ask(image, question, threshold, cap or None)
        except ValueError as err:
            raise gr.Error(str(err)) from None

    with gr.Blocks(title="glimpseprune demo") as app:
        gr.Markdown(f"## GlimpsePrune: answer from the visual tokens the question needs\n"
                    f"model `{session.model_name}`, module `{session.module_name}` — runs on this machine; the "
                    "table compares the same question with every visual token kept.")
        with gr.Row():
            with gr.Column():
                # the uploaded file itself (image_mode=None: Gradio converts nothing), read by load_image as
                # `ask` reads files: alpha onto white, 16-bit scaled, EXIF applied, oversized images refused
                image = gr.Image(type="filepath", image_mode=None, label="image", elem_id="gp-image", height=320)
                question = gr.Textbox(label="question", elem_id="gp-question", lines=1)
                threshold = gr.Slider(0.05, 0.95, value=0.5, step=0.05, elem_id="gp-threshold",
                                      label="threshold: keep a visual token when its probability is above this")
                cap = gr.Slider(0.0, 1.0, value=0.0, step=0.01, elem_id="gp-cap",
                                label="cap: at most this fraction of the visual tokens (0 = no cap)")
                ask = gr.Button("Ask", variant="primary", elem_id="gp-ask")
            with gr.Column():
                answer = gr.Textbox(label="answer (GlimpsePrune, streamed)", elem_id="gp-answer", interactive=False)
                drawn = gr.Image(label="kept visual tokens", elem_id="gp-overlay", interactive=False, height=360)
                stats = gr.Markdown(stats_markdown(None, None), elem_id="gp-stats")
        if examples:
            gr.Examples(examples=examples, inputs=[image, question], label="world scenes")
        outputs = [answer, drawn, stats]
        ask.click(run, [image, question, threshold, cap], outputs)
        question.submit(run, [image, question, threshold, cap], outputs)
        threshold.release(run, [image, question, threshold, cap], outputs)
        cap.release(run, [image, question, threshold, cap], outputs)
    return app


def launch(model: str = "embedded", module: str | None = "embedded", host: str = "127.0.0.1", port: int = 7860,
           device: str = "cpu", dtype: str = "float32", max_new_tokens: int = 32, block: bool = True):
    """Load, build and serve; returns the app (``block=False``: serve in the background, for tests)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    session = DemoSession(model, module, device, dtype, max_new_tokens)
    examples = example_scenes(Path(tempfile.mkdtemp(prefix="glimpseprune-demo-")) / "examples")
    app = build_app(session, examples)
    app.queue(default_concurrency_limit=1)
    app.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block, quiet=not block,
               show_error=True)
    return app
