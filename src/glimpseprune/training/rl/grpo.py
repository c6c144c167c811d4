"""GRPO pieces for GlimpsePrune+ (pure tensor functions, tested on hand-computed numbers).

* ``group_advantages``: A = (r - mean_group) / (std_group + eps), groups of G consecutive rewards (upstream: eps 1e-4,
  population std over the G rollouts of a prompt), or with ``scale=False`` A = r - mean_group (Dr. GRPO; trl's
  ``scale_rewards="none"``): dividing by the std weights a group by how sure the policy already is, so the rare
  wrong draw on a question it nearly always gets right is pushed down hardest. A group whose rewards are all equal
  gets A = 0: no gradient.
* ``k3_kl``: per-token k3 estimator of KL(policy || reference), exp(ref - pol) - (ref - pol) - 1 (>= 0, unbiased).
* ``grpo_loss``: mean over sequences of the mean over their completion tokens of
  -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) + beta * k3, ratio = exp(logp - logp_old). With ``old`` =
  logp.detach() (one update per batch, upstream's form) the ratio is exactly 1 and the gradient is -A * grad logp.
* ``sft_loss``: the supervised term (``sft_weight`` > 0): mean over prompts with a reference of the mean negative
  log-prob of its tokens (reference answer + EOS, teacher-forced on the same pruned prefill as the rollouts).
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, G: int, eps: float = 1e-4, scale: bool = True) -> torch.Tensor:
    """rewards (N*G,) in groups of G consecutive rollouts -> advantages (N*G,); ``scale``: divide by the group's
    std (+ eps)."""
    if rewards.dim() != 1 or rewards.numel() % G:
        raise ValueError(f"rewards must be 1-D with a multiple of G={G} entries, got shape {tuple(rewards.shape)}")
    r = rewards.float().view(-1, G)
    centred = r - r.mean(dim=1, keepdim=True)
    if not scale:
        return centred.view(-1)
    return (centred / (r.std(dim=1, unbiased=False, keepdim=True) + eps)).view(-1)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || ref) from the sampled tokens' log-probs: e^(ref - logp) - (ref - logp) - 1."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per row, the mean of x over mask (rows without a token give 0)."""
    m = mask.to(x.dtype)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, advantages: torch.Tensor,
              mask: torch.Tensor, beta: float = 0.04, clip_eps: float | None = None) -> tuple[torch.Tensor, dict]:
    """The GRPO objective (to minimise) and its parts. logp/old_logp/ref_logp/mask: (R, T); advantages: (R,).

    ``clip_eps`` None: the unclipped single-update form; else PPO's clipped ratio (several updates per batch)."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None].to(logp.dtype)
    per_token = ratio * adv
    if clip_eps is not None:
        per_token = torch.minimum(per_token, torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv)
    policy = -masked_mean(per_token, mask)
    kl = masked_mean(k3_kl(logp, ref_logp), mask) if ref_logp is not None else torch.zeros_like(policy)
    loss = (policy + beta * kl).mean()
    return loss, {"policy_loss": float(policy.detach().mean()), "kl": float(kl.detach().mean())}


def sft_loss(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the rows with any token of the per-row mean of -logp over ``mask`` (rows without one are left out;
    0 when none has one). logp, mask: (B, T)."""
    has = mask.any(dim=1)
    if not bool(has.any()):
        return logp.sum() * 0.0
    return -masked_mean(logp, mask)[has].mean()
