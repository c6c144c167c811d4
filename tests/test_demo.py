"""``glimpseprune demo``: the session logic (streamed answer equal to a plain generate, overlay, side-by-side numbers)
and the running Gradio app driven by a real headless browser (Debian's chromium through playwright's client):
a question is asked in the page, the answer text and the overlay image appear, and a screenshot is written.

Not skipped when something is missing: the README's test command installs gradio and playwright, and `.ci/run`
installs chromium (``apt-get install chromium``) when it is absent. Set GLIMPSEPRUNE_SCREENSHOT_DIR to keep the
screenshot (the README's docs/demo.png is made that way)."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

from glimpseprune.data.records import read_records, write_split


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    split = write_split(tmp_path_factory.mktemp("demo-scene"), n=2, seed=4)
    r = read_records(split)[0]
    return r.image_path(split.parent), r.question


@pytest.fixture(scope="module")
def session():
    from glimpseprune.demo import DemoSession

    return DemoSession(max_new_tokens=8)


def _expected(session, image_path, question, threshold=0.5, cap=None):
    from glimpseprune.processing import load_image

    pm = session._pruned("glimpse", threshold, cap)
    out = pm.generate(images=[[load_image(image_path)]], questions=[question], max_new_tokens=8)
    return out.texts[0].strip(), out.n_kept[0], out.n_vis[0]


def test_session_streams_the_answer_and_compares_with_full_tokens(session, scene):
    from PIL import Image

    image_path, question = scene
    steps = list(session.ask(Image.open(image_path), question))
    answer, n_kept, n_vis = _expected(session, image_path, question)
    streamed = [s[0] for s in steps if s[1] is None]
    assert streamed and streamed[-1].strip() == answer  # the text grew token by token to the final answer
    assert all(b.startswith(a) for a, b in zip(streamed, streamed[1:]))
    final_answer, drawn, table = steps[-1]
    assert final_answer == answer and drawn is not None and drawn.width == Image.open(image_path).width
    assert f"{n_kept}/{n_vis}" in table and f"{n_vis}/{n_vis}" in table and "Prefill" in table
    capped = list(session.ask(Image.open(image_path), question, threshold=0.05, cap=0.02))[-1][2]
    _, k_capped, _ = _expected(session, image_path, question, threshold=0.05, cap=0.02)
    assert k_capped <= 0.02 * n_vis + 1 and f"| {k_capped}/{n_vis} (" in capped  # the sliders' settings are used


def test_session_refuses_bad_input(session, scene):
    image_path, question = scene
    with pytest.raises(ValueError, match="image"):
        next(session.ask(None, question))
    with pytest.raises(ValueError, match="question"):
        next(session.ask(str(image_path), "  "))
    for threshold in (0.0, 1.0, 1.5):  # in (0, 1): 0 keeps every token, 1 none
        with pytest.raises(ValueError, match=f"threshold must be between 0 and 1, got {threshold}"):
            next(session.ask(str(image_path), question, threshold=threshold))
    for cap in (-0.1, 1.5):
        with pytest.raises(ValueError, match=f"cap must be a kept fraction between 0 and 1.*got {cap}"):
            next(session.ask(str(image_path), question, cap=cap))


def _kept_row(table: str) -> str:
    return next(line for line in table.splitlines() if line.startswith("| visual tokens kept"))


def test_the_sliders_reach_the_selection_and_cap_zero_is_no_cap(session, scene):
    """The threshold and cap sliders set the module method's selection; cap 0 (the slider's 0) means no cap, not a
    refusal."""
    from glimpseprune.config import SelectionConfig

    assert session._pruned(session.method, 0.3, 0.2).method.config.selection == \
        SelectionConfig(threshold=0.3, max_keep_ratio=0.2)
    assert session._pruned(session.method, 0.7, 0.0).method.config.selection == SelectionConfig(threshold=0.7)
    image_path, question = scene
    no_cap = _kept_row(list(session.ask(str(image_path), question, cap=None))[-1][2])
    assert _kept_row(list(session.ask(str(image_path), question, cap=0.0))[-1][2]) == no_cap


def test_stats_markdown_by_hand():
    from types import SimpleNamespace

    from glimpseprune.demo import DemoSession, RunStats, stats_markdown

    g = RunStats("a | b\nc", n_kept=16, n_vis=64, prefill_ms=30.0, decode_ms=10.4, decode_steps=5, kv_len=40)
    f = RunStats("", n_kept=64, n_vis=64, prefill_ms=120.0, decode_ms=20.0, decode_steps=6, kv_len=92)
    assert stats_markdown(g, f).splitlines() == [
        "| | GlimpsePrune | all visual tokens |", "|---|---|---|",
        "| visual tokens kept | 16/64 (25.0 %) | 64/64 (100.0 %) |",
        "| prefill (ViT + LLM) | 30.0 ms | 120.0 ms |",
        "| decode | 10.4 ms (5 steps) | 20.0 ms (6 steps) |",
        "| KV cache at decode | 40 tokens | 92 tokens |",
        "| answer | a \\| b c | (empty) |",  # a "|" in the answer does not split the table's row
        "",
        "Prefill 0.25x and KV cache 0.43x of the full-token run (wall time of this one request on this machine).",
    ]  # 30 / 120 = 0.25, 40 / 92 = 0.4348
    half = stats_markdown(g, None)
    assert "| visual tokens kept | 16/64 (25.0 %) | … |" in half and "Prefill" not in half
    assert RunStats("", 0, 0, 0.0, 0.0, 0, 0).kept_frac == 0.0  # no visual tokens: no division by zero
    out = SimpleNamespace(n_kept=[16], n_vis=[64], kv_len=[40],
                          timing={"prefill": 0.03, "decode": 0.0104, "decode_steps": 5})
    s = DemoSession._stats(out, "  yes \n")  # seconds -> ms, the answer stripped
    assert (s.answer, s.n_kept, s.n_vis, s.decode_steps, s.kv_len) == ("yes", 16, 64, 5, 40)
    assert s.prefill_ms == pytest.approx(30.0) and s.decode_ms == pytest.approx(10.4)


def test_the_app_hands_the_uploaded_file_over_as_it_is(session, scene, tmp_path):
    """Gradio's default image input converts to RGB itself (alpha onto black, 16-bit clipped to white), so the demo
    answered about another image than `glimpseprune ask` would: the app must pass the uploaded file on unconverted,
    for ``ask`` to read it as files are read."""
    import numpy as np
    from gradio.components.image import ImageData
    from PIL import Image

    from glimpseprune.demo import build_app
    from glimpseprune.processing import load_image

    image_path, question = scene
    rgb = np.asarray(Image.open(image_path).convert("RGB"))
    alpha = np.where(rgb.sum(-1) > 600, 0, 255).astype(np.uint8)  # the light background transparent
    Image.fromarray(np.dstack([np.where(alpha[..., None] == 0, 0, rgb), alpha]).astype(np.uint8), "RGBA").save(
        tmp_path / "alpha.png")
    Image.fromarray(rgb.mean(-1).astype(np.uint16) * 257).save(tmp_path / "gray16.png")  # 16-bit grey
    app = build_app(session)
    component = next(b for b in app.blocks.values() if getattr(b, "elem_id", None) == "gp-image")
    for name in ("alpha.png", "gray16.png"):
        path = tmp_path / name
        given = component.preprocess(ImageData(path=str(path), orig_name=name))
        assert given == str(path)  # the file itself, nothing converted on the way
        expected = _expected_image(session, load_image(path), question)
        assert list(session.ask(given, question))[-1][2].count(f"{expected[0]}/{expected[1]}") == 1


def _expected_image(session, image, question):
    out = session._pruned(session.method).generate(images=[[image]], questions=[question], max_new_tokens=8)
    return out.n_kept[0], out.n_vis[0]


def test_the_overlay_shows_the_kept_count(session, scene, monkeypatch):
    from glimpseprune.bench import overlay as drawing

    drawn = []
    plain = drawing.overlay

    def spy(image, keep, **kwargs):
        drawn.append((keep, kwargs))
        return plain(image, keep, **kwargs)

    monkeypatch.setattr(drawing, "overlay", spy)
    image_path, question = scene
    answer, n_kept, n_vis = _expected(session, image_path, question)
    list(session.ask(str(image_path), question))
    (keep, kwargs), = drawn
    assert int(keep.sum()) == kwargs["kept"] == n_kept and keep.size == kwargs["total"] == n_vis
    assert kwargs["question"] == question and kwargs["answer"] == answer


def test_the_app_shows_a_refusal_as_a_message(session):
    """A refused input reaches the page as a Gradio error with the refusal's own words."""
    import gradio as gr

    from glimpseprune.demo import build_app

    app = build_app(session)
    run = next(f.fn for f in app.fns.values() if getattr(f.fn, "__name__", "") == "run")
    with pytest.raises(gr.Error, match="type a question first"):
        next(run("picture.png", "  ", 0.5, 0.0))


def test_an_early_module_runs_early_glimpse(scene):
    """`demo --module DIR` with an early module ran method 'glimpse' and failed at start; it runs the module's own
    method, as `ask` does, and keeps what that method keeps."""
    from glimpseprune.api import apply, load_base
    from glimpseprune.checkpoint import load_module
    from glimpseprune.config import SelectionConfig
    from glimpseprune.demo import DemoSession
    from glimpseprune.processing import load_image

    folder = Path(__file__).resolve().parents[1] / "results" / "early_glimpse" / "module"
    early = DemoSession(module=str(folder), max_new_tokens=8)
    assert early.method == "early_glimpse"
    image_path, question = scene
    answer, _, table = list(early.ask(str(image_path), question))[-1]
    model, processor = load_base("embedded")
    pm = apply(model, "early_glimpse", module=load_module(folder), selection=SelectionConfig(threshold=0.5),
               processor=processor)
    out = pm.generate(images=[[load_image(image_path)]], questions=[question], max_new_tokens=8)
    assert answer == out.texts[0].strip() and f"| {out.n_kept[0]}/{out.n_vis[0]} (" in table


def test_a_failed_generation_is_raised_and_frees_the_session(session, scene, monkeypatch):
    """The generation thread failing: the stream ends and the caller gets that error (it waited forever on the
    streamer), and the next request runs."""
    import threading

    from glimpseprune.api import PrunedModel

    def broken(self, *args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(PrunedModel, "generate", broken)
    image_path, question = scene
    caught = []

    def consume():
        try:
            list(session.ask(str(image_path), question))
        except Exception as err:  # noqa: BLE001 - handed to the test thread
            caught.append(err)

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    t.join(timeout=30)
    assert not t.is_alive(), "ask() hung after its generation failed"
    assert len(caught) == 1 and isinstance(caught[0], RuntimeError) and "out of memory" in str(caught[0])
    assert not session._lock.locked()


def test_a_session_needs_a_module():
    from glimpseprune.demo import DemoSession

    with pytest.raises(ValueError, match="give it a glimpse module"):
        DemoSession(module=None)


def test_a_closed_stream_waits_for_its_generation(session, scene, monkeypatch):
    """The page going away closes the stream: the lock (one request at a time) is released only after the
    generation thread has ended, so the next request's timings are its own (a generation made to outlast the
    stream by 1 s)."""
    import threading
    import time

    from glimpseprune.api import PrunedModel

    plain = PrunedModel.generate

    def slow(self, *args, **kwargs):
        out = plain(self, *args, **kwargs)
        time.sleep(1.0)
        return out

    monkeypatch.setattr(PrunedModel, "generate", slow)
    image_path, question = scene
    before = threading.active_count()
    stream = session.ask(str(image_path), question)
    next(stream)
    assert session._lock.locked()  # held while the answer streams: a second request waits
    stream.close()
    assert not session._lock.locked() and threading.active_count() == before


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(port: int, tmp_path):
    """``glimpseprune demo`` in a subprocess, as a user starts it; returns the process once the page answers."""
    import subprocess
    import sys
    import time
    import urllib.request

    log = (tmp_path / "demo.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "glimpseprune.cli", "demo", "--port", str(port),
                             "--max-new-tokens", "8"], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "no_proxy": "127.0.0.1,localhost", "GRADIO_ANALYTICS_ENABLED": "False"})
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"glimpseprune demo exited: {(tmp_path / 'demo.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise AssertionError("glimpseprune demo did not serve its page within 180 s")


def test_demo_in_a_real_browser(scene, session, tmp_path):
    import subprocess

    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "the browser test needs Debian's chromium: apt-get install chromium (.ci/run does)"
    image_path, question = scene
    answer, n_kept, n_vis = _expected(session, image_path, question)
    port = _free_port()
    proc = _serve(port, tmp_path)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1360, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/", wait_until="networkidle")
            page.locator("#gp-image input[type=file]").set_input_files(str(image_path))
            page.locator("#gp-question textarea").fill(question)
            page.locator("#gp-ask").click()
            # the full-token column fills last: then the answer, the overlay and the numbers are all there
            page.wait_for_function("() => document.querySelector('#gp-stats') && "
                                   "document.querySelector('#gp-stats').innerText.includes('Prefill')",
                                   timeout=120_000)
            shown = page.locator("#gp-answer textarea").input_value()
            img = page.locator("#gp-overlay img")
            img.wait_for(state="visible", timeout=30_000)
            natural = img.evaluate("el => [el.complete, el.naturalWidth, el.naturalHeight]")
            stats = page.locator("#gp-stats").inner_text()
            shot = tmp_path / "demo.png"
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert shown.strip() == answer
    assert natural[0] and natural[1] > 0 and natural[2] > 0
    assert f"{n_kept}/{n_vis}" in stats and "all visual tokens" in stats
    assert shot.is_file() and shot.stat().st_size > 10_000
    keep = os.environ.get("GLIMPSEPRUNE_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / "demo.png")


def test_a_busy_port_is_named_before_the_model_loads(monkeypatch, capsys):
    """The model loaded (minutes for a real one) and then gradio said "Cannot find empty port" (also for a bad host)."""
    from glimpseprune.cli import main

    def no_session(*a, **k):
        raise AssertionError("the model loaded before the port was checked")

    monkeypatch.setattr("glimpseprune.demo.DemoSession", no_session)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["demo", "--host", "127.0.0.1", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot serve on --host 127.0.0.1 --port {port}" in err, err
