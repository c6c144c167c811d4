"""Stage-1 losses as pure functions: Dice + BCE on token masks, the answer's LM loss, and the label-free KL.

Per-sample losses are averaged over the batch; each sample's logits are a 1-D tensor over its visual tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """1 - (2 sum(p g) + eps) / (sum(p) + sum(g) + eps), p = sigmoid(logits), for one sample."""
    p = torch.sigmoid(logits.float())
    g = target.float()
    return 1.0 - (2.0 * (p * g).sum() + eps) / (p.sum() + g.sum() + eps)


def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy with logits over one sample's tokens, in fp32."""
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())


def mask_loss(logits: list[torch.Tensor], targets: list[torch.Tensor], dice_weight: float = 1.0,
              bce_weight: float = 0.1) -> torch.Tensor:
    """Batch mean of dice_weight * Dice + bce_weight * BCE (upstream stage-1 weights 1.0 / 0.1)."""
    if len(logits) != len(targets):
        raise ValueError(f"{len(logits)} logit vectors for {len(targets)} targets")
    per = []
    for lg, tg in zip(logits, targets, strict=True):
        if lg.shape != tg.shape:
            raise ValueError(f"mask logits {tuple(lg.shape)} and target {tuple(tg.shape)} differ")
        per.append(dice_weight * dice_loss(lg, tg) + bce_weight * bce_loss(lg, tg))
    return torch.stack(per).mean()


def lm_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits (B, T, V) predicting ids (B, T) where mask (B, T) is set (token mean)."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), ids.flatten(), reduction="none")
    m = mask.flatten().float()
    return (ce * m).sum() / m.sum().clamp(min=1.0)


def kl_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of next-token distributions (B, T, V), token mean where mask is set."""
    t = F.log_softmax(teacher.float(), dim=-1)
    s = F.log_softmax(student.float(), dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)
    m = mask.float()
    return (kl * m).sum() / m.sum().clamp(min=1.0)


def mask_metrics(logits: list[torch.Tensor], targets: list[torch.Tensor]) -> dict[str, float]:
    """Token-level precision, recall and IoU of (sigmoid > 0.5) against the targets, summed over the batch; also
    the mean kept fraction."""
    tp = fp = fn = 0.0
    kept = []
    for lg, tg in zip(logits, targets, strict=True):
        pred, g = lg.detach() > 0, tg.bool()
        tp += float((pred & g).sum())
        fp += float((pred & ~g).sum())
        fn += float((~pred & g).sum())
        kept.append(float(pred.float().mean()))
    return {"precision": tp / max(tp + fp, 1.0), "recall": tp / max(tp + fn, 1.0),
            "iou": tp / max(tp + fp + fn, 1.0), "kept": sum(kept) / max(len(kept), 1)}
