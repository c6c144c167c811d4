"""Rewards for GlimpsePrune+ (stage-2 RL), registered by name: ``exact``, ``precision_match``, ``choice``,
``box_iou`` and ``judge`` (an LLM over an OpenAI-compatible endpoint).

Example::

    from glimpseprune.rewards import RewardInput, make_reward
    reward = make_reward("exact")
    reward([RewardInput(question="Capital of France?", answer="Paris", completion="paris.")])  # [1.0]
"""

from .base import REWARDS, Reward, RewardInput, get_reward, list_rewards, make_reward, register_reward
from .box_iou import BoxIoUReward, box_iou, parse_box
from .choice import ChoiceReward, extract_choice
from .exact import ExactMatchReward
from .judge import (
    JudgeCache,
    JudgeConfig,
    JudgeError,
    JudgeReward,
    cache_key,
    check_judge,
    judge_messages,
    parse_score,
    request_reply,
)
from .precision import PrecisionMatchReward

__all__ = ["REWARDS", "BoxIoUReward", "ChoiceReward", "ExactMatchReward", "JudgeCache", "JudgeConfig", "JudgeError",
           "JudgeReward", "PrecisionMatchReward", "Reward", "RewardInput", "box_iou", "cache_key", "check_judge",
           "extract_choice", "get_reward", "judge_messages", "list_rewards", "make_reward", "parse_box",
           "parse_score", "register_reward", "request_reply"]
