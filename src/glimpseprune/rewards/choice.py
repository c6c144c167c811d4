"""``choice``: single-choice questions; 1 when the option letter the completion gives is the reference's, else 0.

The completion's letter is the first one written in a recognised form (upper case, standing alone): "(B)" or "[B]"
anywhere, "Answer: B" / "the answer is B", or "B." / "B:" / "B)" at the start of a line; a completion that is just
a letter ("b", "(b)", "B.") counts in either case. A lone capital without such marks ("A cat sits") is not read as
an answer. When no letter is found and the sample has ``choices``, a completion equal to one option's text
(normalised as in ``exact``) chooses that option. With ``choices``, a letter beyond them is skipped ("Answer: I think
B" gives B among four options).

The reference is a letter in any of those forms, or, with ``choices``, the text of one option.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ..bench.accuracy import normalize
from .base import Reward, RewardInput, register_reward

_ALONE = re.compile(r"[\(\[]?([A-Za-z])[\)\]]?[.:]?")
_FORMS = (
    re.compile(r"[\(\[]([A-Z])[\)\]]"),
    re.compile(r"(?i:answer)(?:\s+(?i:is))?\s*[:：]?\s*[\(\[]?([A-Z])(?![A-Za-z0-9])"),
    re.compile(r"(?m)^\s*([A-Z])[.:)](?=\s|$)"),
)


def extract_choice(text: str, choices: Sequence[str] | None = None) -> str | None:
    """The option letter (upper case) that ``text`` gives, or None; see the module docstring for the forms."""
    text = text.strip()

    def offered(letter: str) -> bool:  # with the options known, a letter past them is not an answer ("I think B")
        return not choices or ord(letter.upper()) - ord("A") < len(choices)

    alone = _ALONE.fullmatch(text)
    if alone and offered(alone.group(1)):
        return alone.group(1).upper()
    found = [(m.start(1), m.group(1)) for form in _FORMS
             for m in [next((m for m in form.finditer(text) if offered(m.group(1))), None)] if m]
    if found:
        return min(found)[1]
    if choices:
        matches = [i for i, c in enumerate(choices) if normalize(c) == normalize(text)]
        if len(matches) == 1 and matches[0] < 26:
            return chr(ord("A") + matches[0])
    return None


@register_reward
class ChoiceReward(Reward):
    """``make_reward("choice")``: completion "(B) a dog" against reference "B" -> 1.0."""

    name = "choice"

    def score(self, sample: RewardInput) -> float:
        ref = extract_choice(sample.answer, sample.choices)
        if ref is None:
            raise ValueError(f"choice reward: the reference {sample.answer!r} names no option letter "
                             f"(question {sample.question[:80]!r})")
        return float(extract_choice(sample.completion, sample.choices) == ref)
