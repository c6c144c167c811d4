"""Stage-2 rewards: hand-computed exact / precision_match / choice / box_iou scores, the registry's errors, and the LLM
judge client against a real chat-completions server on 127.0.0.1 (good, malformed and clipped scores, timeouts,
retries, 4xx, refused connections, the on-disk cache, concurrency)."""

from __future__ import annotations

import json
import logging
import pickle
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from glimpseprune.rewards import (
    REWARDS,
    JudgeConfig,
    JudgeError,
    JudgeReward,
    Reward,
    RewardInput,
    box_iou,
    cache_key,
    check_judge,
    extract_choice,
    get_reward,
    judge_messages,
    list_rewards,
    make_reward,
    parse_box,
    parse_score,
    register_reward,
)


def ri(completion: str, answer: str = "Paris", question: str = "Capital of France?", **kw) -> RewardInput:
    return RewardInput(question=question, answer=answer, completion=completion, **kw)


# ---------------------------------------------------------------- rule-based rewards


@pytest.mark.parametrize("completion,answer,want", [
    ("Paris", "Paris", 1.0), ("  paris.  ", "Paris", 1.0), ("PARIS", "paris.", 1.0), ("Paris...", "Paris", 1.0),
    ("Lyon", "Paris", 0.0), ("Paris, France", "Paris", 0.0), ("", "Paris", 0.0), ("", "", 1.0),
])
def test_exact(completion, answer, want):
    assert make_reward("exact")([ri(completion, answer)]) == [want]


def test_exact_uses_the_eval_normalisation():
    from glimpseprune.bench.accuracy import normalize
    cases = [("New  York.", "new york"), (" A cat ", "a cat"), ("yes", "Yes.")]
    got = make_reward("exact")([ri(c, a) for c, a in cases])
    assert got == [float(normalize(c) == normalize(a)) for c, a in cases]


@pytest.mark.parametrize("completion,answer,want", [
    ("Paris", "Paris", 1.0), ("  PARIS \n", "paris", 1.0), ("Paris.", "paris", 0.0), ("Lyon", "Paris", 0.0),
])
def test_precision_match(completion, answer, want):
    assert make_reward("precision_match")([ri(completion, answer)]) == [want]


@pytest.mark.parametrize("text,want", [
    ("B", "B"), ("b", "B"), ("(B)", "B"), ("(b)", "B"), ("B.", "B"), ("[C]", "C"), ("Answer: B", "B"),
    ("answer: (D)", "D"), ("The answer is C.", "C"), ("B. A red car", "B"), ("B) blue", "B"),
    ("I think (C) is right, not (A)", "C"), ("Looking at it...\nD: the dog", "D"),
    ("A cat sits on the mat", None), ("the answer is a cat", None), ("", None), ("U.S. cities", None),
])
def test_extract_choice(text, want):
    assert extract_choice(text) == want


def test_choice_reward():
    reward = make_reward("choice")
    choices = ["red", "blue", "green"]
    got = reward([ri("(B) blue", "B"), ri("Answer: A", "(B)"), ri("blue", "B", choices=choices),
                  ri("C", "green", choices=choices), ri("I am not sure", "A"), ri("b.", "B")])
    assert got == [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="names no option letter"):
        reward([ri("A", "purple", choices=choices)])


def test_box_iou():
    assert box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert box_iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
    assert parse_box("It is at [12, 30.5, 200,180] I think [1, 2, 3, 4]") == [12.0, 30.5, 200.0, 180.0]
    assert parse_box("(1 2 3 4)") == [1.0, 2.0, 3.0, 4.0]
    assert parse_box("[1, 2, 3]") is None and parse_box("no box") is None

    reward = make_reward("box_iou")
    ref = [[5, 0, 15, 10], [0, 0, 1, 1]]  # only the first reference box counts
    got = reward([ri("[0, 0, 10, 10]", "", boxes=ref), ri("box: [5,0,15,10]", "", boxes=ref),
                  ri("somewhere left", "", boxes=ref), ri("[10, 10, 0, 0]", "", boxes=ref),
                  ri("[0, 0, 2.5, 10] then [5, 0, 15, 10]", "", boxes=ref)])
    assert got == pytest.approx([1 / 3, 1.0, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="no reference box"):
        reward([ri("[0, 0, 1, 1]", "")])
    with pytest.raises(ValueError, match="x1 < x2"):
        reward([ri("[0, 0, 1, 1]", "", boxes=[[3, 3, 1, 1]])])


# ---------------------------------------------------------------- registry and interface


def test_registry():
    assert {"exact", "precision_match", "choice", "box_iou", "judge"} <= set(list_rewards())
    assert get_reward("judge") is JudgeReward
    with pytest.raises(ValueError, match=r"unknown reward 'nope'.*available: \[.*'exact'"):
        get_reward("nope")
    with pytest.raises(ValueError, match="unknown reward"):
        make_reward("nope")
    with pytest.raises(TypeError, match="takes no options"):
        make_reward("exact", strict=True)

    class Dup(Reward):
        name = "exact"

    with pytest.raises(ValueError, match="already registered"):
        register_reward(Dup)

    class Bad(Reward):
        name = "not an identifier"

    with pytest.raises(ValueError, match="identifier"):
        register_reward(Bad)
    with pytest.raises(TypeError, match="Reward subclass"):
        register_reward(len)

    class Half(Reward):
        name = "test_half_reward"

        def score(self, sample):
            return 0.5

    try:
        assert register_reward(Half) is Half
        assert make_reward("test_half_reward")([ri("x"), ri("y")]) == [0.5, 0.5]
    finally:
        REWARDS.pop("test_half_reward", None)


def test_reward_checks_inputs_and_range():
    class TooBig(Reward):
        name = "too_big"

        def score(self, sample):
            return 1.5

    with pytest.raises(RuntimeError, match="outside"):
        TooBig()([ri("x")])
    with pytest.raises(TypeError, match="not a RewardInput"):
        make_reward("exact")([{"question": "q", "answer": "a", "completion": "a"}])
    with pytest.raises(TypeError, match="answer must be a str"):
        RewardInput(question="q", answer=None, completion="a")
    assert make_reward("exact")([]) == []
    sample = ri("x")
    with pytest.raises(AttributeError):
        sample.answer = "y"  # frozen


# ---------------------------------------------------------------- the judge, against a real local server


class JudgeServer:
    """A chat-completions server on 127.0.0.1. ``behaviour(body, n)`` -> (status, reply text, delay s) decides each
    reply (n: 1-based request count); requests, their headers and the peak of concurrent requests are recorded."""

    def __init__(self, behaviour):
        self.behaviour = behaviour
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(body)
                    server.headers.append(dict(self.headers))
                    n = len(server.requests)
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                # in flight until its answer is ready (counted to the end of the write, a finished request
                # overlapped the client's next one: 5 in flight at concurrency 4)
                try:
                    status, text, delay = server.behaviour(body, n)
                    time.sleep(delay)
                finally:
                    with server.lock:
                        server.in_flight -= 1
                try:
                    if status == 200:
                        data = json.dumps({"id": f"c{n}", "object": "chat.completion", "model": body["model"],
                                           "choices": [{"index": 0, "finish_reason": "stop",
                                                        "message": {"role": "assistant", "content": text}}]})
                    else:
                        data = json.dumps({"error": {"message": text}})
                    raw = data.encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                except OSError:
                    pass  # the client gave up (timeout)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.httpd.handle_error = lambda request, address: None
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def score_of(answer: str = "0.8"):
    return lambda body, n: (200, f"Score: {answer}", 0.0)


@pytest.fixture
def serve(monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.delenv("GLIMPSEPRUNE_JUDGE_API_KEY", raising=False)
    servers = []

    def start(behaviour) -> JudgeServer:
        servers.append(JudgeServer(behaviour))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def judge(server, **kw) -> JudgeReward:
    kw = {"model": "judge-model", "retries": 0, "backoff_s": 0.01, "timeout_s": 5.0, **kw}
    return JudgeReward(JudgeConfig(url=server.url if hasattr(server, "url") else server, **kw))


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def test_judge_good_answer_and_request_shape(serve):
    server = serve(score_of("0.8"))
    reward = make_reward("judge", url=server.url + "/", model="judge-model", api_key="sekret")
    assert reward([ri("It is Paris.")]) == [0.8]
    assert "sekret" not in repr(reward)
    body = server.requests[0]
    assert body["model"] == "judge-model" and body["temperature"] == 0
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert "score: <number>" in body["messages"][0]["content"]
    assert body["messages"][1]["content"].splitlines() == [
        "Question: Capital of France?", "Reference answer: Paris", "Model answer: It is Paris."]
    assert server.headers[0]["Authorization"] == "Bearer sekret"


def test_judge_api_key_from_env(serve, monkeypatch):
    server = serve(score_of("1"))
    judge(server)([ri("Paris")])
    monkeypatch.setenv("GLIMPSEPRUNE_JUDGE_API_KEY", "from-env")
    judge(server)([ri("Paris")])
    assert [h["Authorization"] for h in server.headers] == ["Bearer dummy", "Bearer from-env"]


def test_parse_score():
    assert parse_score("SCORE: .5") == 0.5
    assert parse_score("score:1") == 1.0
    for bad in ("I give it 0.9", "score: high", "score: 0.2\nscore: 0.9", "score: -0.5"):
        with pytest.raises(ValueError, match="exactly one expected"):
            parse_score(bad)
    for bad in ("Score: 1.7 ", "score: 7"):  # another scale: not full marks
        with pytest.raises(ValueError, match="outside 0..1"):
            parse_score(bad)


def test_judge_malformed_scores(serve, caplog):
    replies = {"none": "Looks right to me.", "two": "score: 0.3, or maybe score: 0.9", "big": "Score: 7"}
    server = serve(lambda body, n: (200, replies[body["messages"][1]["content"].rsplit(": ", 1)[1]], 0.0))
    with caplog.at_level(logging.WARNING, logger="glimpseprune.rewards.judge"):
        got = judge(server, on_error="zero")([ri("none"), ri("two"), ri("big")])
    assert got == [0.0, 0.0, 0.0]
    assert sum("scoring 0" in r.getMessage() for r in caplog.records) == 3
    assert judge(server, on_error="zero_malformed")([ri("none"), ri("big")]) == [0.0, 0.0]  # replies: scored 0
    for bad in ("none", "two"):
        with pytest.raises(ValueError, match=r"exactly one expected.*" + replies[bad][:10]):
            judge(server, on_error="raise")([ri(bad)])


def test_judge_timeout_is_retried_then_fails_in_bounded_time(serve):
    server = serve(lambda body, n: (200, "score: 1", 1.0))
    t0 = time.monotonic()
    with pytest.raises(JudgeError, match=r"did not answer within timeout_s=0.2s \(gave up after 2 attempts\)"):
        judge(server, timeout_s=0.2, retries=1, backoff_s=0.05)([ri("Paris")])
    assert time.monotonic() - t0 < 1.5  # 2 x 0.2 s + backoff, not the server's 1 s, let alone forever
    assert len(server.requests) == 2
    t0 = time.monotonic()
    assert judge(server, timeout_s=0.2, retries=1, on_error="zero")([ri("Paris"), ri("Lyon")]) == [0.0, 0.0]
    assert time.monotonic() - t0 < 1.5


def test_judge_server_error_then_success(serve):
    server = serve(lambda body, n: (500, "overloaded", 0.0) if n == 1 else (200, "score: 0.8", 0.0))
    assert judge(server, retries=2)([ri("Paris")]) == [0.8]
    assert len(server.requests) == 2


def test_judge_client_error_is_not_retried(serve):
    server = serve(lambda body, n: (404, "The model `judge-model` does not exist.", 0.0))
    with pytest.raises(JudgeError, match="returned HTTP 404: .*does not exist"):
        judge(server, retries=3)([ri("Paris")])
    assert len(server.requests) == 1
    assert judge(server, retries=3, on_error="zero")([ri("Paris")]) == [0.0]
    assert len(server.requests) == 2
    with pytest.raises(JudgeError, match="HTTP 404"):  # what training uses: a failed request is not a wrong answer
        judge(server, retries=3, on_error="zero_malformed")([ri("Paris")])


def test_judge_connection_refused(serve):
    url = closed_port_url()
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=r"judge at http://127\.0\.0\.1:\d+/v1/chat/completions refused the conn"):
        check_judge(JudgeConfig(url=url, model="m"))
    with pytest.raises(JudgeError, match="refused the connection .*gave up after 3 attempts"):
        judge(url, retries=2)([ri("Paris")])
    assert judge(url, retries=1, on_error="zero")([ri("Paris")]) == [0.0]
    assert time.monotonic() - t0 < 3.0


def test_check_judge(serve):
    good = serve(score_of("0.9"))
    assert check_judge(JudgeConfig(url=good.url, model="m")) == 0.9
    chatty = serve(lambda body, n: (200, "Hello! How can I help you today?", 0.0))
    with pytest.raises(ValueError, match="answered, but not in the expected form.*How can I help"):
        check_judge(JudgeConfig(url=chatty.url, model="m"))
    missing = serve(lambda body, n: (404, "no such model", 0.0))
    with pytest.raises(ValueError, match="returned HTTP 404"):
        check_judge(JudgeConfig(url=missing.url, model="m", retries=5))
    assert len(missing.requests) == 1


def test_judge_cache(serve, tmp_path):
    server = serve(score_of("0.8"))
    batch = [ri("Paris"), ri("paris"), ri("Lyon")]
    reward = judge(server, cache_dir=tmp_path / "cache")
    assert reward(batch) == [0.8] * 3 and len(server.requests) == 3
    assert reward(batch) == [0.8] * 3 and len(server.requests) == 3  # all hits
    again = judge(server, cache_dir=tmp_path / "cache", concurrency=1)  # another config, same cache
    assert again(batch[::-1]) == [0.8] * 3 and again.requests == 0 and len(server.requests) == 3
    other_model = judge(server, cache_dir=tmp_path / "cache", model="other-judge")
    other_model(batch[:1])
    assert len(server.requests) == 4
    revived = pickle.loads(pickle.dumps(reward))
    assert revived(batch) == [0.8] * 3 and len(server.requests) == 4
    key = cache_key("judge-model", judge_messages("Capital of France?", "Paris", "Lyon"))
    assert reward.cache.get_many([key]) == {key: "Score: 0.8"}


def test_judge_asks_duplicates_once(serve):
    server = serve(score_of("0.5"))
    assert judge(server)([ri("Paris")] * 4 + [ri("Lyon")]) == [0.5] * 5
    assert len(server.requests) == 2


def test_judge_cache_keeps_answers_of_a_failed_batch(serve, tmp_path):
    server = serve(lambda body, n: (500, "boom", 0.0) if "bad" in body["messages"][1]["content"]
                   else (200, "score: 0.6", 0.0))
    reward = judge(server, cache_dir=tmp_path)
    with pytest.raises(JudgeError, match=r"sample 1 .*HTTP 500"):
        reward([ri("good"), ri("bad")])
    n = len(server.requests)
    assert judge(server, cache_dir=tmp_path)([ri("good")]) == [0.6] and len(server.requests) == n


def test_judge_stops_asking_after_a_failure_when_raising(serve):
    server = serve(lambda body, n: (500, "boom", 0.0) if n == 1 else (200, "score: 0.6", 0.2))
    with pytest.raises(JudgeError, match=r"sample 0 .*HTTP 500"):
        judge(server, concurrency=1)([ri("first"), ri("second"), ri("third"), ri("fourth")])
    assert len(server.requests) < 4  # the ones not yet started were cancelled


def test_judge_concurrency(serve):
    delay, n = 0.25, 8
    server = serve(lambda body, k: (200, "score: 0.7", delay))
    t0 = time.monotonic()
    assert judge(server, concurrency=4)([ri(f"answer {i}") for i in range(n)]) == [0.7] * n
    elapsed = time.monotonic() - t0
    assert server.max_in_flight == 4
    assert n / 4 * delay * 0.9 < elapsed < n * delay * 0.75  # about 2 rounds, far from 8


def test_judge_config_validation():
    for bad in ({"url": "localhost:8000/v1"}, {"model": ""}, {"on_error": "ignore"}, {"retries": -1},
                {"timeout_s": 0}, {"concurrency": 0}, {"backoff_s": float("nan")}):
        with pytest.raises(ValueError):
            JudgeConfig(**{"url": "http://localhost:8000/v1", "model": "m", **bad})
    cfg = JudgeConfig(url="http://h:1/v1/chat/completions", model="m")
    assert cfg.endpoint == "http://h:1/v1/chat/completions"
    assert JudgeConfig(url="http://h:1/v1/", model="m").endpoint == "http://h:1/v1/chat/completions"
    with pytest.raises(TypeError, match="not both"):
        JudgeReward(cfg, model="x")


def test_extract_choice_skips_letters_past_the_options():
    from glimpseprune.rewards.choice import extract_choice

    four = ["red", "blue", "green", "white"]
    assert extract_choice("Answer: I think B", four) is None  # "I" was read as option I of four
    assert extract_choice("Answer: I think so. (B) blue", four) == "B"
    assert extract_choice("I", four) is None and extract_choice("Answer: I think B") == "I"  # no options: as before


# mutation audit: rules a one-line change could break unnoticed

def test_zero_area_reference_box_is_a_data_error():
    reward = make_reward("box_iou")
    with pytest.raises(ValueError, match="reference box"):
        reward([RewardInput("q", "", "[0, 0, 5, 5]", boxes=[[5, 0, 5, 10]])])
    with pytest.raises(ValueError, match="reference box"):
        reward([RewardInput("q", "", "[0, 0, 5, 5]", boxes=[[0, 3, 10, 3]])])


def test_box_iou_of_boxes_disjoint_in_y_only_is_zero():
    assert box_iou([0, 0, 10, 10], [0, 20, 10, 30]) == 0.0
    assert box_iou([0, 0, 10, 10], [20, 0, 30, 10]) == 0.0


def test_letter_just_past_the_options_is_not_an_answer():
    four = ["cat", "dog", "cow", "hen"]
    assert extract_choice("E", four) is None
    assert extract_choice("Answer: E", four) is None
    assert extract_choice("D", four) == "D"


def test_first_written_letter_wins():
    assert extract_choice("(C) looks tempting, but the answer is B") == "C"
    assert extract_choice("Answer: B. Not (C).") == "B"


def test_option_text_shared_by_two_options_names_no_letter():
    assert extract_choice("cat", ["cat", "dog", "cat"]) is None
    assert extract_choice("dog", ["cat", "dog", "cat"]) == "B"


def test_judge_retries_408_and_429(serve):
    """408 (request timeout) and 429 (rate limited) are retried like a 5xx, unlike other 4xx replies."""
    for status in (408, 429):
        server = serve(lambda body, n, status=status: (status, "slow down", 0.0) if n == 1
                       else (200, "score: 0.4", 0.0))
        assert judge(server, retries=1)([ri("Paris")]) == [0.4]
        assert len(server.requests) == 2


def test_judge_backoff_doubles_before_each_retry(serve, monkeypatch):
    import types

    import glimpseprune.rewards.judge as judge_mod

    sleeps: list[float] = []
    monkeypatch.setattr(judge_mod, "time", types.SimpleNamespace(sleep=sleeps.append, time=time.time))
    server = serve(lambda body, n: (503, "busy", 0.0))
    with pytest.raises(JudgeError, match=r"HTTP 503: .*busy.* \(gave up after 4 attempts\)"):
        judge(server, retries=3, backoff_s=0.5)([ri("Paris")])
    assert sleeps == [0.5, 1.0, 2.0] and len(server.requests) == 4


def test_judge_sends_its_max_tokens(serve):
    server = serve(score_of("0.5"))
    judge(server, max_tokens=7)([ri("Paris")])
    assert server.requests[0]["max_tokens"] == 7


def test_judge_zero_malformed_stops_asking_after_a_failed_request(serve):
    """what training uses: a failed request fails the step, so the requests not yet started are cancelled too."""
    server = serve(lambda body, n: (500, "boom", 0.0) if n == 1 else (200, "score: 0.6", 0.2))
    with pytest.raises(JudgeError, match=r"sample 0 .*HTTP 500"):
        judge(server, concurrency=1, on_error="zero_malformed")([ri("first"), ri("second"), ri("third"),
                                                                  ri("fourth")])
    assert len(server.requests) < 4


def test_judge_body_that_is_not_a_chat_completion_is_named(monkeypatch):
    """HTTP 200 whose body has no choices[0].message.content string (a proxy's page, a completions reply): a
    JudgeError naming the body, not an AttributeError from reading None."""
    import io

    import glimpseprune.rewards.judge as judge_mod

    for body in (b'{"choices": [{"text": "score: 1"}]}', b"<html>gateway</html>",
                 b'{"choices": [{"message": {"content": null}}]}'):
        monkeypatch.setattr(judge_mod.urllib.request, "urlopen", lambda req, timeout, body=body: io.BytesIO(body))
        with pytest.raises(JudgeError, match=r"returned a body that is not a chat completion: .*"
                           + body[:8].decode().replace("[", r"\[").replace("{", r"\{")):
            judge("http://127.0.0.1:9/v1")([ri("Paris")])


def test_judge_cache_reads_more_keys_than_one_query_holds(tmp_path):
    from glimpseprune.rewards.judge import JudgeCache

    cache = JudgeCache(tmp_path)
    keys = [f"k{i:04d}" for i in range(1203)]  # three SQL queries of at most 500 keys
    for k in keys:
        cache.put(k, "m", f"score: {k}")
    got = cache.get_many(keys + ["absent"])
    assert len(got) == 1203 and got["k0499"] == "score: k0499" and got["k0500"] == "score: k0500"
    assert got["k1202"] == "score: k1202" and "absent" not in got
    cache.close()


def test_judge_config_checks_max_tokens_and_api_key():
    for bad in ({"max_tokens": 0}, {"api_key": 5}, {"timeout_s": float("inf")}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            JudgeConfig(**{"url": "http://localhost:8000/v1", "model": "m", **bad})
