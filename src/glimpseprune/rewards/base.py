"""The reward interface and its registry.

A reward scores a batch of model completions: ``reward(samples: list[RewardInput]) -> list[float]``, one float in
[0, 1] per sample, in order. The batch is the unit so that rewards that call a service (the LLM judge) can send its
requests concurrently. Rewards register by name with ``@register_reward``, one file per reward, as pruning methods do;
``make_reward(name, **options)`` builds one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

REWARDS: dict[str, type[Reward]] = {}


@dataclass(frozen=True)
class RewardInput:
    """One completion to score. ``answer`` is the reference; ``boxes``: ground-truth boxes (x1, y1, x2, y2) in the
    completion's coordinates; ``choices``: the options of a multiple-choice question, option A first."""

    question: str
    answer: str
    completion: str
    boxes: Sequence[Sequence[float]] | None = None
    choices: Sequence[str] | None = None

    def __post_init__(self) -> None:
        for field_name in ("question", "answer", "completion"):
            value = getattr(self, field_name)
            if not isinstance(value, str):
                raise TypeError(f"RewardInput.{field_name} must be a str, got {type(value).__name__}: {value!r}")
        if self.choices is not None and (isinstance(self.choices, str)
                                         or not all(isinstance(c, str) for c in self.choices)):
            raise TypeError(f"RewardInput.choices must be a sequence of str, got {self.choices!r}")


class Reward:
    """Base class. Subclasses set ``name`` and override ``score`` (one sample) or ``score_batch`` (the whole batch);
    calling the reward checks the result: one finite float in [0, 1] per sample. Rewards with options take them as
    constructor keywords; the base takes none."""

    name: ClassVar[str] = ""

    def __init__(self, **options: Any):
        if options:
            raise TypeError(f"reward {self.name!r} takes no options, got {sorted(options)}")

    def score(self, sample: RewardInput) -> float:
        raise NotImplementedError(f"reward {self.name!r} implements neither score nor score_batch")

    def score_batch(self, samples: Sequence[RewardInput]) -> list[float]:
        return [self.score(s) for s in samples]

    def __call__(self, samples: Sequence[RewardInput]) -> list[float]:
        samples = list(samples)
        for i, s in enumerate(samples):
            if not isinstance(s, RewardInput):
                raise TypeError(f"reward {self.name!r}: sample {i} is a {type(s).__name__}, not a RewardInput")
        scores = [float(x) for x in self.score_batch(samples)]
        if len(scores) != len(samples):
            raise RuntimeError(f"reward {self.name!r} returned {len(scores)} scores for {len(samples)} samples")
        for i, x in enumerate(scores):
            if not (math.isfinite(x) and 0.0 <= x <= 1.0):
                raise RuntimeError(f"reward {self.name!r} gave sample {i} the score {x}, outside [0, 1]")
        return scores

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def register_reward(cls: type[Reward]) -> type[Reward]:
    """Class decorator: register a ``Reward`` subclass under ``cls.name`` (unique, an identifier)."""
    if not (isinstance(cls, type) and issubclass(cls, Reward)):
        raise TypeError(f"register_reward takes a Reward subclass, got {cls!r}")
    name = getattr(cls, "name", "")
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"reward class {cls.__name__} needs a `name` that is an identifier, got {name!r}")
    if name in REWARDS and REWARDS[name] is not cls:
        raise ValueError(f"reward name {name!r} is already registered by {REWARDS[name].__name__}")
    REWARDS[name] = cls
    return cls


def _load_builtins() -> None:
    from . import box_iou, choice, exact, judge, precision  # noqa: F401


def list_rewards() -> list[str]:
    """Names of the registered rewards, sorted."""
    _load_builtins()
    return sorted(REWARDS)


def get_reward(name: str) -> type[Reward]:
    """The reward class registered as ``name``; ValueError naming the known ones otherwise."""
    _load_builtins()
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; available: {list_rewards()}")
    return REWARDS[name]


def make_reward(name: str, **options: Any) -> Reward:
    """A ready reward: ``make_reward("exact")``, ``make_reward("judge", url=..., model=...)`` or
    ``make_reward("judge", config=JudgeConfig(...))``."""
    return get_reward(name)(**options)
