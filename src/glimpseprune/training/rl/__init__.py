"""GlimpsePrune+'s reinforcement learning (stage 2): the GRPO math (``grpo``: group advantages, k3 KL, the clipped and
single-update losses, the supervised term) and one step on the pruned schedule (``step``: G rollouts from one pruned
prefill each, rewards, guidance, the update). ``training/stage2.py`` runs the loop; rewards live in
``glimpseprune.rewards`` (the eval's judge uses them too); the rollout primitives over a compacted cache in
``runtime/rollout.py``."""

from .grpo import group_advantages, grpo_loss, k3_kl, masked_mean, sft_loss
from .step import GRPOStep, Rollouts

__all__ = ["GRPOStep", "Rollouts", "group_advantages", "grpo_loss", "k3_kl", "masked_mean", "sft_loss"]
