"""Scoring functions of the short-form benchmarks (paper §7.2, lmms-eval's default metrics), with no model knowledge.

Per-sample scores, each in [0, 1] (``METRICS`` maps a name to the function; ``aggregate`` averages them):

- ``vqa_accuracy(pred, answers)`` -- VQAv2 / VizWiz / TextVQA soft accuracy. Prediction and references go through
  ``vqa_normalize``; with the k references, the score is the mean over the k leave-one-out subsets of
  ``min(1, #matches / 3)``. With 10 references, 1 / 2 / 3 / 4+ matching ones give 0.3 / 0.6 / 0.9 / 1.0.
  Deviation from the official script: it normalises only when the 10 references are not all the same string (they
  come pre-normalised in VQAv2); here both sides are always normalised, as lmms-eval's answer processor does for the
  prediction, so ``"Two."`` scores against ten ``"2"``.
- ``anls(pred, answers, tau=0.5)`` -- DocVQA / InfographicsVQA. Both sides lower-cased, stripped and with runs of
  space collapsed; NL = Levenshtein / max(len); the score is the max over references of ``1 - NL`` when ``NL < tau``,
  else 0 (Biten et al.'s definition: NL exactly tau scores 0; lmms-eval's code keeps 0.5 there). Two empty strings
  score 1, an empty prediction against a non-empty reference 0.
- ``relaxed_accuracy(pred, answer, tolerance=0.05)`` -- ChartQA. When both parse as numbers and the reference is
  non-zero, correct iff ``|pred - ref| / |ref| <= tolerance``; otherwise a case-insensitive comparison of the stripped
  strings. A trailing ``%`` divides by 100 (as in the pix2struct / ChartQA definition), so ``"5%"`` equals ``"0.05"``
  but not ``"5"``. A reference of 0 falls back to the string comparison (``"0.0"`` vs ``"0"`` is wrong), as officially.
  No number is dug out of a sentence: ``"about 12"`` is a string.
- ``exact_match(pred, answer)`` -- GQA: equal after lower-casing, stripping and removing a final full stop
  (``bench.accuracy.normalize``).
- ``choice_accuracy(pred, answer, choices=None)`` -- ScienceQA-IMG, MMBench, SEED-Bench: the option letter read from
  the prediction by ``rewards.choice.extract_choice`` equals the reference, given as a letter (any form that function
  reads), as an option index (int, 0 = "A", ScienceQA's convention) or, with ``choices``, as an option's text.

Dataset-level scores:

- ``pope_scores(preds, labels)`` -- accuracy, precision, recall, F1 (``yes`` is the positive class) and yes-ratio (the
  fraction of predictions read as yes), plus the confusion counts. ``pope_answer`` reads a prediction: the first word
  (lower-cased, punctuation stripped) that is ``yes`` decides yes, ``no`` or ``not`` decides no; with neither, the
  official POPE script's default, yes. A ratio with a zero denominator is 0.
- ``mme_scores(rows)`` -- rows are dicts with ``subtask``, ``image`` (the image id) and ``correct`` (bool), or
  ``pred`` and ``answer`` instead of ``correct`` (read with ``mme_answer``, MME's parser: an exact yes/no, else
  yes/no within the first 4 characters, else "other" which is wrong). Per subtask: acc (over questions), acc+ (over
  images: an image counts only when all its questions, two in MME, are right) and score = (acc + acc+) * 100. The
  perception score is the sum over the 10 ``MME_PERCEPTION`` subtasks (at most 2000), cognition over the 4
  ``MME_COGNITION`` ones (at most 800); a subtask with no rows adds nothing and is listed under ``missing``.
  Subtask names match case-insensitively, with spaces or hyphens for underscores; an unknown name is an error.
- ``mmbench_circular(rows)`` -- MMBench circular evaluation: rows are dicts with ``correct`` and ``group`` (the
  question every circular shift derives from; without ``group``, MMBench's ``index`` modulo 1,000,000 is used). A
  question counts only when all its shifts are right; returns the fraction of questions that count.
  ``circular_variants(choices, answer)`` builds the shifts.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence

from ..bench.accuracy import normalize
from ..rewards.choice import extract_choice

__all__ = [
    "METRICS", "MME_COGNITION", "MME_PERCEPTION", "aggregate", "anls", "choice_accuracy", "circular_variants",
    "exact_match", "levenshtein", "mmbench_circular", "mme_answer", "mme_scores", "pope_answer", "pope_scores",
    "relaxed_accuracy", "vqa_accuracy", "vqa_normalize",
]

# ---------------------------------------------------------------------------------------------------- VQA accuracy

# Contracted spellings the VQA evaluation restores. A form with one apostrophe is restored from its spelling without
# it ("dont" -> "don't"); a form with several from each spelling missing exactly one of them ("couldnt've" and
# "couldn'tve" -> "couldn't've"). The official table's capitalised keys ("Im", "Ive", ...) are left out: words are
# lower-cased before the lookup, so they never match there either.
_CONTRACTED_FORMS = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd he'd've he's
how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't must've needn't not've o'clock
oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've somebody'd've somebody'll somebody's someone'd
someone'd've someone'll someone's something'd something'd've something'll that's there'd there'd've there're there's
they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's
where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't wouldn't've
y'all y'all'll y'all'd've you'd you'd've you'll you're you've
""".split()


def _contraction_table() -> dict[str, str]:
    table: dict[str, str] = {}
    for form in _CONTRACTED_FORMS:
        marks = [i for i, ch in enumerate(form) if ch == "'"]
        if len(marks) == 1:
            table[form.replace("'", "")] = form
        else:
            for i in marks:
                table[form[:i] + form[i + 1:]] = form
    table["somebody'd"] = "somebodyd"  # an entry of the official table that runs the other way; kept for parity
    return table


_CONTRACTIONS = _contraction_table()
_NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_NUMBER_WORDS["none"] = "0"
_ARTICLES = frozenset({"a", "an", "the"})
_VQA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# A full stop not followed by a digit: "yes." and "3." lose it, "1.5" keeps it. (The official pattern also opens with
# "(?!<=\d)", a look-ahead that can never fail before a full stop, so it is this one.)
_LOOSE_PERIOD = re.compile(r"\.(?!\d)")


def _vqa_punctuation(text: str) -> str:
    # A mark next to a space (or any mark, when the text has a digit-comma-digit group such as "1,000") is deleted;
    # a mark inside a word ("dog-house") becomes a space. The test looks at the text as given, not as it is rewritten.
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _VQA_PUNCT:
        deleted = delete_all or f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if deleted else " ")
    return _LOOSE_PERIOD.sub("", out)


def vqa_normalize(text: str) -> str:
    """The VQA evaluation's answer normalisation: "Two dogs." -> "2 dogs", "A Dog" -> "dog", "dont" -> "don't".

    Line breaks and tabs become spaces; the text is stripped and lower-cased; punctuation is deleted or turned into
    spaces (see ``_vqa_punctuation``); number words up to ten (and "none") become digits; the articles a / an / the
    are dropped; contractions written without their apostrophe get it back; words are joined by single spaces.
    """
    text = _vqa_punctuation(text.replace("\n", " ").replace("\t", " ").strip().lower())
    words = [_NUMBER_WORDS.get(w, w) for w in text.split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(pred: str, answers: Sequence[str]) -> float:
    """VQA soft accuracy of ``pred`` against the annotators' ``answers`` (10 in VQAv2 / VizWiz / TextVQA)."""
    if isinstance(answers, str) or not answers:
        raise ValueError(f"vqa_accuracy needs a non-empty list of reference answers, got {answers!r}")
    p = vqa_normalize(pred)
    hits = [vqa_normalize(a) == p for a in answers]
    total = sum(hits)
    # leaving out reference i keeps total - hits[i] matches among the others
    return sum(min(1.0, (total - h) / 3.0) for h in hits) / len(hits)


# ------------------------------------------------------------------------------------------------------------ ANLS

def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each costing 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _anls_text(text: str) -> str:
    return " ".join(text.lower().split())


def anls(pred: str, answers: str | Sequence[str], tau: float = 0.5) -> float:
    """Average Normalised Levenshtein Similarity of one prediction: max over references of 1 - NL, 0 when NL >= tau."""
    refs = [answers] if isinstance(answers, str) else list(answers)
    if not refs:
        raise ValueError("anls needs at least one reference answer")
    p = _anls_text(pred)
    best = 0.0
    for ref in refs:
        r = _anls_text(ref)
        longest = max(len(p), len(r))
        nl = levenshtein(p, r) / longest if longest else 0.0
        if nl < tau:
            best = max(best, 1.0 - nl)
    return best


# ------------------------------------------------------------------------------------------------ relaxed accuracy

def _as_number(text: str) -> float | None:
    text = text.strip()
    percent = text.endswith("%")
    try:
        value = float(text.rstrip("%")) if percent else float(text)
    except ValueError:
        return None
    if not math.isfinite(value):
        return None
    return value / 100.0 if percent else value


def relaxed_accuracy(pred: str, answer: str, tolerance: float = 0.05) -> float:
    """ChartQA relaxed accuracy: numbers within ``tolerance`` relative to the reference, else exact (case-blind)."""
    p, r = _as_number(pred), _as_number(answer)
    if p is not None and r:
        return float(abs(p - r) / abs(r) <= tolerance)
    return float(pred.strip().lower() == answer.strip().lower())


# ----------------------------------------------------------------------------------------------------- exact match

def exact_match(pred: str, answer: str) -> float:
    """GQA exact match: equal after lower-casing, stripping and removing a final full stop."""
    return float(normalize(pred) == normalize(answer))


# ------------------------------------------------------------------------------------------------- multiple choice

def _reference_letter(answer: str | int, choices: Sequence[str] | None) -> str:
    if isinstance(answer, bool):
        raise ValueError(f"choice reference must be a letter, an option index or an option's text, got {answer!r}")
    if isinstance(answer, int):
        if answer < 0 or answer >= 26 or (choices is not None and answer >= len(choices)):
            raise ValueError(f"choice reference index {answer} is out of range")
        return chr(ord("A") + answer)
    letter = extract_choice(answer) or extract_choice(answer, choices)  # a letter as written, else an option's text
    if letter is None:
        raise ValueError(f"choice reference {answer!r} names no option letter")
    return letter


def choice_accuracy(pred: str, answer: str | int, choices: Sequence[str] | None = None) -> float:
    """1 when the option letter ``pred`` gives is the reference's (a letter, an index or, with choices, a text)."""
    return float(extract_choice(pred, choices) == _reference_letter(answer, choices))


def circular_variants(choices: Sequence[str], answer: str | int) -> list[tuple[list[str], str]]:
    """MMBench's circular shifts: for k = 0..n-1 the options rotated left by k and the answer's letter among them.

    ``circular_variants(["cat", "dog", "cow"], "B")`` -> [(["cat","dog","cow"], "B"), (["dog","cow","cat"], "A"),
    (["cow","cat","dog"], "C")].
    """
    n = len(choices)
    index = ord(_reference_letter(answer, choices)) - ord("A")
    if index >= n:
        raise ValueError(f"answer {answer!r} is beyond the {n} choices")
    return [(list(choices[k:]) + list(choices[:k]), chr(ord("A") + (index - k) % n)) for k in range(n)]


def mmbench_circular(rows: Iterable[Mapping]) -> float:
    """Fraction of questions with every circular shift right (rows: ``group`` or ``index``, and ``correct``)."""
    verdicts: dict[object, bool] = {}
    for row in rows:
        group = row["group"] if "group" in row else int(row["index"]) % 1_000_000
        verdicts[group] = verdicts.get(group, True) and bool(row["correct"])
    if not verdicts:
        raise ValueError("mmbench_circular got no rows")
    return sum(verdicts.values()) / len(verdicts)


# ------------------------------------------------------------------------------------------------------------ POPE

_WORD = re.compile(r"[a-z]+")


def pope_answer(text: str) -> str:
    """"yes" or "no": the first word that is yes (-> yes) or no / not (-> no); "yes" when there is neither."""
    for word in _WORD.findall(text.lower()):
        if word == "yes":
            return "yes"
        if word in ("no", "not"):
            return "no"
    return "yes"


def _yes_no_label(label: str | bool) -> bool:
    if isinstance(label, bool):
        return label
    value = str(label).strip().lower()
    if value not in ("yes", "no"):
        raise ValueError(f"POPE label must be yes or no, got {label!r}")
    return value == "yes"


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def pope_scores(preds: Sequence[str], labels: Sequence[str | bool]) -> dict:
    """POPE accuracy / precision / recall / F1 / yes_ratio (and tp, fp, tn, fn, n): raw predictions vs yes/no labels."""
    if len(preds) != len(labels):
        raise ValueError(f"pope_scores: {len(preds)} predictions for {len(labels)} labels")
    if not preds:
        raise ValueError("pope_scores got no predictions")
    tp = fp = tn = fn = 0
    for pred, label in zip(preds, labels):
        said_yes, is_yes = pope_answer(pred) == "yes", _yes_no_label(label)
        tp += said_yes and is_yes
        fp += said_yes and not is_yes
        tn += not said_yes and not is_yes
        fn += not said_yes and is_yes
    n = len(preds)
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {"accuracy": (tp + tn) / n, "precision": precision, "recall": recall,
            "f1": _ratio(2 * precision * recall, precision + recall), "yes_ratio": (tp + fp) / n,
            "tp": tp, "fp": fp, "tn": tn, "fn": fn, "n": n}


# ------------------------------------------------------------------------------------------------------------- MME

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
_MME_NAMES = {name.lower(): name for name in MME_PERCEPTION + MME_COGNITION}


def _mme_subtask(name: str) -> str:
    key = re.sub(r"[\s\-]+", "_", str(name).strip().lower())
    if key not in _MME_NAMES:
        raise ValueError(f"unknown MME subtask {name!r}; known: {', '.join(MME_PERCEPTION + MME_COGNITION)}")
    return _MME_NAMES[key]


def mme_answer(text: str) -> str:
    """MME's reading of a reply: "yes" / "no" when it is exactly that, else the one found in its first 4 characters
    (yes first), else "other"."""
    text = text.strip().lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def _mme_correct(row: Mapping) -> bool:
    if "correct" in row:
        return bool(row["correct"])
    return mme_answer(row["pred"]) == str(row["answer"]).strip().lower()


def mme_scores(rows: Iterable[Mapping]) -> dict:
    """MME per-subtask acc / acc_plus / score and the perception, cognition and total scores (see module docstring)."""
    images: dict[str, dict[object, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        images[_mme_subtask(row["subtask"])][row["image"]].append(_mme_correct(row))
    if not images:
        raise ValueError("mme_scores got no rows")
    subtasks = {}
    for name, per_image in images.items():
        verdicts = [v for vs in per_image.values() for v in vs]
        acc = sum(verdicts) / len(verdicts)
        acc_plus = sum(all(vs) for vs in per_image.values()) / len(per_image)
        subtasks[name] = {"acc": acc, "acc_plus": acc_plus, "score": (acc + acc_plus) * 100.0,
                          "n_questions": len(verdicts), "n_images": len(per_image)}
    perception = sum(subtasks[s]["score"] for s in MME_PERCEPTION if s in subtasks)
    cognition = sum(subtasks[s]["score"] for s in MME_COGNITION if s in subtasks)
    return {"subtasks": subtasks, "perception": perception, "cognition": cognition, "total": perception + cognition,
            "missing": [s for s in MME_PERCEPTION + MME_COGNITION if s not in subtasks]}


# -------------------------------------------------------------------------------------------- registry, aggregation

METRICS: dict[str, Callable[..., float]] = {
    "vqa_accuracy": vqa_accuracy,
    "anls": anls,
    "relaxed_accuracy": relaxed_accuracy,
    "exact_match": exact_match,
    "choice_accuracy": choice_accuracy,
}


def aggregate(name: str, per_sample_scores: Iterable[float]) -> dict:
    """``{"metric": name, "score": mean, "n": count}`` for a per-sample metric of ``METRICS`` (scores in [0, 1])."""
    if name not in METRICS:
        raise KeyError(f"unknown per-sample metric {name!r}; known: {', '.join(sorted(METRICS))}")
    scores = [float(s) for s in per_sample_scores]
    if not scores:
        raise ValueError(f"aggregate({name!r}) got no scores")
    return {"metric": name, "score": sum(scores) / len(scores), "n": len(scores)}
