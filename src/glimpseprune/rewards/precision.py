"""``precision_match``: upstream's short-answer reward, 1 when ``strip().lower()`` of completion and reference are
equal, else 0.

It differs from ``exact`` only in that a final full stop counts: "Paris." does not match "paris" here, while
``exact`` (the evaluation's normalisation) drops it. Kept for runs that reproduce upstream's stage-2 recipe.
"""

from __future__ import annotations

from .base import Reward, RewardInput, register_reward


@register_reward
class PrecisionMatchReward(Reward):
    """``make_reward("precision_match")``: " Paris " == "paris" -> 1.0, "Paris." vs "paris" -> 0.0."""

    name = "precision_match"

    def score(self, sample: RewardInput) -> float:
        return float(sample.completion.strip().lower() == sample.answer.strip().lower())
