"""``box_iou``: intersection over union of the first box written in the completion and the first reference box.

A box is four numbers in square brackets or parentheses, separated by commas or spaces: "[12, 30.5, 200, 180]".
It is read as (x1, y1, x2, y2) in the same coordinates as ``RewardInput.boxes`` (matching them, e.g. to the resized
image a Qwen2.5-VL sees, is the caller's business). A completion without such a box, or whose box has x2 <= x1 or
y2 <= y1, scores 0. A sample without a valid reference box is a data error (ValueError).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from .base import Reward, RewardInput, register_reward

_NUM = r"\s*([-+]?(?:\d+\.?\d*|\.\d+))\s*"
_BOX = re.compile(r"[\[\(]" + r"[,\s]".join([_NUM] * 4) + r"[\]\)]")


def parse_box(text: str) -> list[float] | None:
    """The first box "[x1, y1, x2, y2]" in ``text``, as floats, or None."""
    m = _BOX.search(text)
    return [float(v) for v in m.groups()] if m else None


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two xyxy boxes; 0 when either has no area."""
    ax1, ay1, ax2, ay2 = a
    bx1, by1, bx2, by2 = b
    area_a = max(ax2 - ax1, 0.0) * max(ay2 - ay1, 0.0)
    area_b = max(bx2 - bx1, 0.0) * max(by2 - by1, 0.0)
    inter = max(min(ax2, bx2) - max(ax1, bx1), 0.0) * max(min(ay2, by2) - max(ay1, by1), 0.0)
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


@register_reward
class BoxIoUReward(Reward):
    """``make_reward("box_iou")``: completion "[0, 0, 10, 10]" against box [5, 0, 15, 10] -> 1/3."""

    name = "box_iou"

    def score(self, sample: RewardInput) -> float:
        if not sample.boxes:
            raise ValueError(f"box_iou reward: sample has no reference box (question {sample.question[:80]!r})")
        ref = [float(v) for v in sample.boxes[0]]
        if len(ref) != 4 or not all(math.isfinite(v) for v in ref) or ref[2] <= ref[0] or ref[3] <= ref[1]:
            raise ValueError(f"box_iou reward: reference box {list(sample.boxes[0])!r} is not x1 < x2, y1 < y2 "
                             f"(question {sample.question[:80]!r})")
        box = parse_box(sample.completion)
        if box is None or not all(math.isfinite(v) for v in box):
            return 0.0
        return min(max(box_iou(box, ref), 0.0), 1.0)
