"""``judge``: an LLM grades each completion against the reference, over any OpenAI-compatible chat-completions
endpoint (e.g. ``vllm serve`` at ``http://localhost:8000/v1``). Standard library only.

Each sample is one request (temperature 0) whose reply must hold exactly one ``score: <number>`` between 0 and 1
(a larger number means the judge grades on another scale: malformed, not clipped). Requests run ``concurrency``
at a time; identical prompts in a batch are asked once. Every request has ``timeout_s``; HTTP 5xx, 408 and 429,
refused or dropped connections and timeouts are retried ``retries`` times with exponential backoff, other 4xx replies
are not, so a judge that is down costs a bounded time per batch. A sample whose request fails or whose reply holds no
single score in [0, 1] raises ``JudgeError`` (a ValueError), or, with ``on_error="zero"``, is logged and scored 0;
with ``on_error="zero_malformed"`` (what training and ``eval`` use) only a reply that arrived without a usable score
is scored 0 and a failed request still raises: a right answer whose request failed would otherwise count as wrong
(and in training be pushed down against its group). Call ``check_judge`` once before training: it fails fast, naming the
problem, when the judge cannot be reached or does not answer in the expected form.

With ``cache_dir``, replies are kept in an SQLite file there, keyed by the sha256 of the judge model and the full
prompt; a cached prompt costs no request, replies are written as they arrive (an interrupted run is not asked again)
and several threads or processes may share the file. Failed requests are not cached.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import math
import os
import re
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .base import Reward, RewardInput, register_reward

logger = logging.getLogger(__name__)

API_KEY_ENV = "GLIMPSEPRUNE_JUDGE_API_KEY"
ON_ERROR = ("raise", "zero", "zero_malformed")
CACHE_FILE = "judge_cache.sqlite3"
RETRY_STATUS = frozenset({408, 429})  # besides every 5xx

SYSTEM_PROMPT = (
    "You grade answers to questions. You are given a question, its reference answer and a model's answer. Judge "
    "how closely the model's answer agrees with the reference answer, as an answer to that question, on a scale "
    "from 0 to 1: 1 means it says the same thing, 0 means it is wrong or unrelated, and the closer it comes the "
    "higher the score. Reply with exactly one line of the form `score: <number>` and nothing else."
)
SCORE_RE = re.compile(r"score:\s*([0-9]*\.?[0-9]+)")


class JudgeError(ValueError):
    """The judge could not be reached, refused the request, or replied without a single score."""


@dataclass(frozen=True)
class JudgeConfig:
    """Where the judge is and how to call it. ``url``: the API base (``http://host:port/v1``; a full
    ``.../chat/completions`` URL is also accepted). ``api_key``: None reads ``$GLIMPSEPRUNE_JUDGE_API_KEY``, else
    "dummy". ``retries``: extra attempts after the first (so 1 + retries in all). ``backoff_s``: wait before the
    first retry, doubled before each further one. ``cache_dir``: None for no cache."""

    url: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    timeout_s: float = 20.0
    retries: int = 3
    backoff_s: float = 0.5
    concurrency: int = 4
    cache_dir: str | Path | None = None
    on_error: str = "raise"
    max_tokens: int = 32

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or not self.url.startswith(("http://", "https://")):
            raise ValueError(f"judge url must start with http:// or https://, got {self.url!r}")
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"judge model must be a non-empty string, got {self.model!r}")
        if self.api_key is not None and not isinstance(self.api_key, str):
            raise ValueError("judge api_key must be a string or None")
        for name in ("timeout_s", "backoff_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"judge {name} must be a finite number >= 0, got {v!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"judge timeout_s must be > 0, got {self.timeout_s!r}")
        for name, low in (("retries", 0), ("concurrency", 1), ("max_tokens", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"judge {name} must be an integer >= {low}, got {v!r}")
        if self.on_error not in ON_ERROR:
            raise ValueError(f"judge on_error must be one of {ON_ERROR}, got {self.on_error!r}")

    @property
    def endpoint(self) -> str:
        base = self.url.rstrip("/")
        return base if base.endswith("/chat/completions") else base + "/chat/completions"

    def resolved_api_key(self) -> str:
        return self.api_key if self.api_key is not None else os.environ.get(API_KEY_ENV) or "dummy"


def judge_messages(question: str, answer: str, completion: str) -> list[dict[str, str]]:
    """The chat messages that ask the judge to grade one completion."""
    user = f"Question: {question}\nReference answer: {answer}\nModel answer: {completion}"
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def parse_score(reply: str) -> float:
    """The score in a judge reply; JudgeError unless it holds exactly one ``score: <number>`` (case-insensitive)
    and the number lies in [0, 1]."""
    found = SCORE_RE.findall(reply.lower())
    if len(found) != 1:
        what = "no" if not found else f"{len(found)}"
        raise JudgeError(f"judge reply holds {what} `score: <number>` (exactly one expected): {reply[:200]!r}")
    score = float(found[0])
    if score > 1.0:  # "score: 7" on a 0-10 scale would read as full marks if clipped
        raise JudgeError(f"judge reply's score {found[0]} is outside 0..1 (the prompt asks for 0 to 1): "
                         f"{reply[:200]!r}")
    return score


def cache_key(model: str, messages: Sequence[dict[str, str]]) -> str:
    """sha256 of the judge model and the full prompt."""
    blob = json.dumps({"model": model, "messages": list(messages)}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _snippet(data: bytes, n: int = 200) -> str:
    return data[:n].decode("utf-8", "replace").strip() or "(empty body)"


def _is_timeout(err: BaseException) -> bool:
    return isinstance(err, TimeoutError) or isinstance(getattr(err, "reason", None), TimeoutError)


def _describe(cfg: JudgeConfig, err: BaseException) -> str:
    where = f"judge at {cfg.endpoint}"
    reason = getattr(err, "reason", err)
    if isinstance(reason, ConnectionRefusedError):
        return f"{where} refused the connection (is the server running?)"
    if _is_timeout(err):
        return f"{where} did not answer within timeout_s={cfg.timeout_s}s"
    return f"{where} could not be reached: {reason}"


def request_reply(cfg: JudgeConfig, messages: Sequence[dict[str, str]], attempts: int | None = None) -> str:
    """Ask the judge once (with up to ``attempts`` tries, default 1 + cfg.retries); the reply's text."""
    attempts = cfg.retries + 1 if attempts is None else attempts
    payload = {"model": cfg.model, "messages": list(messages), "temperature": 0, "max_tokens": cfg.max_tokens}
    data = json.dumps(payload).encode("utf-8")
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {cfg.resolved_api_key()}"}
    last = ""
    for attempt in range(attempts):
        if attempt:
            time.sleep(cfg.backoff_s * 2 ** (attempt - 1))
        req = urllib.request.Request(cfg.endpoint, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=cfg.timeout_s) as resp:
                body = resp.read()
        except urllib.error.HTTPError as err:
            try:
                detail = _snippet(err.read())
            except Exception:  # the status alone is enough
                detail = "(unreadable body)"
            last = f"judge at {cfg.endpoint} returned HTTP {err.code}: {detail}"
            if err.code < 500 and err.code not in RETRY_STATUS:
                raise JudgeError(last) from None
            continue
        except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
            last = _describe(cfg, err)
            continue
        try:
            content = json.loads(body)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            content = None
        if not isinstance(content, str):
            raise JudgeError(f"judge at {cfg.endpoint} returned a body that is not a chat completion: "
                             f"{_snippet(body)}")
        return content
    raise JudgeError(f"{last} (gave up after {attempts} attempt{'s' if attempts > 1 else ''})")


def check_judge(cfg: JudgeConfig) -> float:
    """One quick grading request (no retry, no cache), to call before training starts; the score it got.
    JudgeError (a ValueError) naming the URL when the judge cannot be reached, refuses the request (wrong model
    name, key) or replies without a single ``score: <number>``."""
    messages = judge_messages("What is two plus two?", "4", "The answer is 4.")
    reply = request_reply(cfg, messages, attempts=1)
    try:
        return parse_score(reply)
    except JudgeError as err:
        raise JudgeError(f"judge at {cfg.endpoint} (model {cfg.model!r}) answered, but not in the expected form: "
                         f"{err}") from None


class JudgeCache:
    """Judge replies on disk (SQLite), keyed by ``cache_key``; safe to share between threads and processes."""

    def __init__(self, cache_dir: str | Path):
        self.path = Path(cache_dir) / CACHE_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = -1

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():  # never reuse a connection across fork
            conn = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False, isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
            except sqlite3.OperationalError:
                pass  # file systems without shared memory keep the default journal
            conn.execute("CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, model TEXT NOT NULL, "
                         "reply TEXT NOT NULL, created REAL NOT NULL)")
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def get_many(self, keys: Sequence[str]) -> dict[str, str]:
        out: dict[str, str] = {}
        keys = list(dict.fromkeys(keys))
        with self._lock:
            conn = self._connection()
            for i in range(0, len(keys), 500):
                chunk = keys[i:i + 500]
                rows = conn.execute(f"SELECT key, reply FROM replies WHERE key IN ({','.join('?' * len(chunk))})",
                                    chunk).fetchall()
                out.update(rows)
        return out

    def put(self, key: str, model: str, reply: str) -> None:
        with self._lock:
            self._connection().execute("INSERT OR REPLACE INTO replies VALUES (?, ?, ?, ?)",
                                       (key, model, reply, time.time()))

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = state["path"]
        self._lock, self._conn, self._pid = threading.Lock(), None, -1


@register_reward
class JudgeReward(Reward):
    """``make_reward("judge", url="http://localhost:8000/v1", model="Qwen/Qwen2.5-32B-Instruct")`` or
    ``JudgeReward(JudgeConfig(...))``. ``requests`` counts the HTTP requests made (cache hits make none)."""

    name = "judge"

    def __init__(self, config: JudgeConfig | None = None, **kwargs: Any):
        if config is not None and kwargs:
            raise TypeError("pass either a JudgeConfig or its fields as keywords, not both")
        self.config = config if config is not None else JudgeConfig(**kwargs)
        if not isinstance(self.config, JudgeConfig):
            raise TypeError(f"judge expects a JudgeConfig, got {type(self.config).__name__}")
        self.cache = JudgeCache(self.config.cache_dir) if self.config.cache_dir is not None else None
        self.requests = 0
        self._count_lock = threading.Lock()

    def _ask(self, messages: list[dict[str, str]]) -> str:
        with self._count_lock:
            self.requests += 1
        return request_reply(self.config, messages)

    def score_batch(self, samples: Sequence[RewardInput]) -> list[float]:
        cfg = self.config
        prompts = [judge_messages(s.question, s.answer, s.completion) for s in samples]
        keys = [cache_key(cfg.model, m) for m in prompts]
        unique = dict(zip(keys, prompts))
        replies = self.cache.get_many(list(unique)) if self.cache is not None else {}
        errors: dict[str, JudgeError] = {}
        todo = [k for k in unique if k not in replies]
        if todo:
            with ThreadPoolExecutor(max_workers=min(cfg.concurrency, len(todo)),
                                    thread_name_prefix="judge") as pool:
                futures: dict[Future, str] = {pool.submit(self._ask, unique[k]): k for k in todo}
                for fut in as_completed(futures):
                    k = futures[fut]
                    try:
                        reply = fut.result()
                    except CancelledError:
                        continue
                    except JudgeError as err:
                        errors[k] = err
                        if cfg.on_error != "zero":  # the step fails anyway: do not start the rest
                            for other in futures:
                                other.cancel()
                        continue
                    replies[k] = reply
                    if self.cache is not None:
                        self.cache.put(k, cfg.model, reply)
        if errors and cfg.on_error != "zero":  # the first failed request, in sample order
            i, k = next((i, k) for i, k in enumerate(keys) if k in errors)
            raise JudgeError(f"judge, sample {i} (question {samples[i].question[:80]!r}): {errors[k]}") from None
        scores = []
        for i, (s, k) in enumerate(zip(samples, keys)):
            try:
                if k in errors:
                    raise errors[k]
                scores.append(parse_score(replies[k]))
            except JudgeError as err:
                if cfg.on_error == "raise":
                    raise JudgeError(f"judge, sample {i} (question {s.question[:80]!r}): {err}") from None
                logger.warning("judge, sample %d: %s; scoring 0", i, err)
                scores.append(0.0)
        return scores

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()

    def __getstate__(self) -> dict[str, Any]:
        return {"config": self.config, "cache": self.cache, "requests": self.requests}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._count_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"JudgeReward({self.config!r})"
