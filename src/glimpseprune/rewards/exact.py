"""``exact``: 1 when the completion equals the reference after the evaluation's normalisation, else 0.

The normalisation is ``bench.accuracy.normalize`` itself (lower case, surrounding space and final full stops
removed), so the training reward and the ``exact_match`` of ``glimpseprune eval`` always agree.
"""

from __future__ import annotations

from ..bench.accuracy import normalize
from .base import Reward, RewardInput, register_reward


@register_reward
class ExactMatchReward(Reward):
    """``make_reward("exact")``: "Paris." == " paris" -> 1.0."""

    name = "exact"

    def score(self, sample: RewardInput) -> float:
        return float(normalize(sample.completion) == normalize(sample.answer))
