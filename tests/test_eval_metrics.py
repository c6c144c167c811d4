"""Benchmark scoring functions (glimpseprune.eval.metrics) against worked examples from their official definitions:
VQA normalisation and soft accuracy, ANLS, ChartQA relaxed accuracy, GQA exact match, multiple choice, MMBench
circular evaluation, POPE and MME; the registry and aggregation. Every expected value is computed by hand."""

from __future__ import annotations

import pytest

from glimpseprune.eval.metrics import (
    METRICS,
    MME_COGNITION,
    MME_PERCEPTION,
    aggregate,
    anls,
    choice_accuracy,
    circular_variants,
    exact_match,
    levenshtein,
    mmbench_circular,
    mme_answer,
    mme_scores,
    pope_answer,
    pope_scores,
    relaxed_accuracy,
    vqa_accuracy,
    vqa_normalize,
)

# ------------------------------------------------------------------------------------------------------------ VQA


@pytest.mark.parametrize("text,want", [
    ("two", "2"), ("Two", "2"), ("none", "0"), ("ten", "10"), ("eleven", "eleven"),
    ("a dog", "dog"), ("The Dog", "dog"), ("an apple", "apple"),
    ("dont", "don't"), ("don't", "don't"), ("couldnt've", "couldn't've"), ("couldn'tve", "couldn't've"),
    ("youre", "you're"), ("twas", "'twas"),
    ("im", "im"),  # the official table's key is "Im", which never matches a lower-cased word
    ("yes.", "yes"), ("Yes\n", "yes"), ("3.", "3"), ("3.5", "3.5"), ("a.b", "ab"),
    ("1,000", "1000"),  # a digit-comma-digit group: every mark is deleted, not spaced
    ("dog-house", "dog house"),  # a mark inside a word becomes a space
    ("red, white", "red white"),  # a mark next to a space is deleted
    ("(a) cat", "cat"),  # "(" touches no space -> space; ")" does -> deleted; then the article goes
    ("what?!", "what"),
    ("  two   dogs  ", "2 dogs"),
])
def test_vqa_normalize(text, want):
    assert vqa_normalize(text) == want


def _refs(n_match: int, match: str = "2", other: str = "3") -> list[str]:
    return [match] * n_match + [other] * (10 - n_match)


@pytest.mark.parametrize("n_match,want", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_soft_accuracy_by_hand(n_match, want):
    # n matching references of 10: the n subsets without a match keep n - 1, the 10 - n others keep n, so the score
    # is (n * min(1, (n-1)/3) + (10-n) * min(1, n/3)) / 10: 1 -> 9/30, 2 -> (2/3 + 16/3)/10, 3 -> (2 + 7)/10, 4 -> 1
    assert vqa_accuracy("two", _refs(n_match)) == pytest.approx(want)


def test_vqa_accuracy_normalises_both_sides():
    assert vqa_accuracy("Yes.", ["yes"] * 10) == 1.0
    assert vqa_accuracy("a dog", ["dog"] * 10) == 1.0
    assert vqa_accuracy("dont", ["don't"] * 10) == 1.0
    assert vqa_accuracy("2", ["Two"] * 3 + ["three"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("dogs", ["dog"] * 10) == 0.0
    # fewer than 10 references: leave-one-out over what there is (3 refs, 2 match: (1/3 + 1/3 + 2/3) / 3)
    assert vqa_accuracy("cat", ["cat", "cat", "dog"]) == pytest.approx(4 / 9)


@pytest.mark.parametrize("answers", [[], "yes"])
def test_vqa_accuracy_needs_a_list(answers):
    with pytest.raises(ValueError, match="non-empty list"):
        vqa_accuracy("yes", answers)


# ----------------------------------------------------------------------------------------------------------- ANLS


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("abc", "abc") == 0


@pytest.mark.parametrize("pred,answers,want", [
    ("Hello World", "hello  world ", 1.0),  # case and runs of space do not count
    ("hallo", ["hello"], 0.8),  # one substitution in 5 characters: NL 0.2
    ("hello", ["xyz", "hallo", "help"], 0.8),  # best reference wins ("help": 2/5 -> 0.6)
    ("abc", ["xyz"], 0.0),  # NL 1
    ("abcd", ["abxyz"], 0.0),  # 3 edits / 5 = 0.6 >= tau
    ("ab", ["ax"], 0.0),  # NL exactly 0.5 is not below tau
    ("", [""], 1.0),
    ("", ["abc"], 0.0),
    ("abc", [""], 0.0),
])
def test_anls(pred, answers, want):
    assert anls(pred, answers) == pytest.approx(want)


def test_anls_tau_and_errors():
    assert anls("ab", ["ax"], tau=0.6) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="at least one"):
        anls("x", [])


# ------------------------------------------------------------------------------------------------------- ChartQA


@pytest.mark.parametrize("pred,answer,want", [
    ("12.5", "12", 1.0),  # |0.5| / 12 = 0.042
    ("12", "12.5", 1.0),  # 0.5 / 12.5 = 0.04
    ("12.7", "12", 0.0),  # 0.7 / 12 = 0.058
    ("105", "100", 1.0), ("95", "100", 1.0),  # exactly 5 %: inclusive
    ("-10.4", "-10", 1.0), ("10", "-10", 0.0),
    ("5%", "0.05", 1.0), ("0.05", "5%", 1.0),  # "%" divides by 100
    ("5%", "5", 0.0), ("5.2%", "5%", 1.0),
    (" 7 ", "7.0", 1.0),
    ("Yes", "yes", 1.0), ("Canada", "canada.", 0.0), ("Asia", "Europe", 0.0),  # non-numbers: exact, case-blind
    ("0", "0", 1.0), ("0.0", "0", 0.0),  # a zero reference falls back to the string comparison
    ("1,000", "1000", 0.0),  # not a number -> strings differ
    ("about 12", "12", 0.0),
])
def test_relaxed_accuracy(pred, answer, want):
    assert relaxed_accuracy(pred, answer) == want


def test_relaxed_accuracy_tolerance():
    assert relaxed_accuracy("110", "100", tolerance=0.1) == 1.0
    assert relaxed_accuracy("110", "100") == 0.0
    assert relaxed_accuracy("100", "100", tolerance=0.0) == 1.0


# ----------------------------------------------------------------------------------------------------------- GQA


@pytest.mark.parametrize("pred,answer,want", [
    ("Yes.", "yes", 1.0), (" Left \n", "left", 1.0), ("RED", "red", 1.0),
    ("a dog", "dog", 0.0), ("left side", "left", 0.0), ("no", "yes", 0.0),
])
def test_exact_match(pred, answer, want):
    assert exact_match(pred, answer) == want


# ------------------------------------------------------------------------------------------------ multiple choice

COLOURS = ["red", "blue", "green"]


@pytest.mark.parametrize("pred,answer,choices,want", [
    ("B", "B", None, 1.0), ("(b)", "B", None, 1.0), ("B. blue", "(B)", None, 1.0),
    ("The answer is C.", 2, None, 1.0),  # ScienceQA gives the index: 2 -> C
    ("A", 0, COLOURS, 1.0),
    ("blue", "B", COLOURS, 1.0),  # no letter: the option's text
    ("C", "green", COLOURS, 1.0),  # reference given as an option's text
    ("A", "green", COLOURS, 0.0),
    ("I am not sure", "A", None, 0.0),
    ("A cat sits on the mat", "A", None, 0.0),  # a lone capital is not an answer
])
def test_choice_accuracy(pred, answer, choices, want):
    assert choice_accuracy(pred, answer, choices) == want


@pytest.mark.parametrize("answer,choices,match", [
    (3, COLOURS, "out of range"), (-1, None, "out of range"), ("purple", COLOURS, "names no option"),
    (True, None, "must be a letter"),
])
def test_choice_reference_errors(answer, choices, match):
    with pytest.raises(ValueError, match=match):
        choice_accuracy("A", answer, choices)


def test_circular_variants():
    assert circular_variants(["cat", "dog", "cow", "pig"], "B") == [
        (["cat", "dog", "cow", "pig"], "B"), (["dog", "cow", "pig", "cat"], "A"),
        (["cow", "pig", "cat", "dog"], "D"), (["pig", "cat", "dog", "cow"], "C")]
    for shifted, letter in circular_variants(COLOURS, 2):
        assert shifted[ord(letter) - ord("A")] == "green"
    with pytest.raises(ValueError, match="beyond"):
        circular_variants(COLOURS, "D")


def test_mmbench_circular():
    rows = ([{"group": "q1", "correct": True}] * 4  # all 4 shifts right
            + [{"group": "q2", "correct": c} for c in (True, True, False, True)]  # one shift wrong
            + [{"group": "q3", "correct": True}] * 3)  # 3 options, all right
    assert mmbench_circular(rows) == pytest.approx(2 / 3)
    assert sum(r["correct"] for r in rows) / len(rows) == pytest.approx(10 / 11)  # plain accuracy is laxer
    # MMBench's own convention: shift k of question i carries index i + k * 1e6
    indexed = [{"index": 7, "correct": True}, {"index": 1_000_007, "correct": False},
               {"index": 8, "correct": True}, {"index": 1_000_008, "correct": True}]
    assert mmbench_circular(indexed) == 0.5
    with pytest.raises(ValueError, match="no rows"):
        mmbench_circular([])


# ----------------------------------------------------------------------------------------------------------- POPE


@pytest.mark.parametrize("text,want", [
    ("Yes", "yes"), ("yes.", "yes"), ("Yes, there is a dog in the image.", "yes"), ("No", "no"), ("no.", "no"),
    ("There is no dog in the image.", "no"), ("The dog is not visible.", "no"),
    ("Yes, but there is no cat.", "yes"),  # the first of yes/no decides
    ("I cannot tell", "yes"), ("", "yes"),  # neither: the official default
])
def test_pope_answer(text, want):
    assert pope_answer(text) == want


def test_pope_scores_by_hand():
    preds = ["Yes", "yes.", "No", "no", "Yes", "No, there is none."]
    labels = ["yes", "yes", "yes", "no", "no", "NO"]
    got = pope_scores(preds, labels)
    assert (got["tp"], got["fp"], got["tn"], got["fn"], got["n"]) == (2, 1, 2, 1, 6)
    assert got["accuracy"] == pytest.approx(4 / 6)
    assert got["precision"] == pytest.approx(2 / 3)
    assert got["recall"] == pytest.approx(2 / 3)
    assert got["f1"] == pytest.approx(2 / 3)
    assert got["yes_ratio"] == pytest.approx(0.5)


def test_pope_always_yes_and_always_no():
    labels = ["yes", "yes", "no", "no"]
    yes = pope_scores(["Yes"] * 4, labels)
    assert (yes["accuracy"], yes["precision"], yes["recall"], yes["yes_ratio"]) == (0.5, 0.5, 1.0, 1.0)
    assert yes["f1"] == pytest.approx(2 / 3)
    no = pope_scores(["No"] * 4, [True, True, False, False])
    assert (no["accuracy"], no["precision"], no["recall"], no["f1"], no["yes_ratio"]) == (0.5, 0.0, 0.0, 0.0, 0.0)


def test_pope_errors():
    with pytest.raises(ValueError, match="yes or no"):
        pope_scores(["yes"], ["maybe"])
    with pytest.raises(ValueError, match="2 predictions for 1"):
        pope_scores(["yes", "no"], ["yes"])
    with pytest.raises(ValueError, match="no predictions"):
        pope_scores([], [])


# ------------------------------------------------------------------------------------------------------------ MME


@pytest.mark.parametrize("text,want", [
    ("Yes", "yes"), ("no", "no"), ("Yes.", "yes"), ("No, it is not.", "no"), (" yes, a cat", "yes"),
    ("The answer is yes", "other"),  # yes/no only counts in the first 4 characters
    ("Not sure", "no"),  # "not " holds "no": MME's parser says no
])
def test_mme_answer(text, want):
    assert mme_answer(text) == want


def test_mme_subtask_lists():
    assert len(MME_PERCEPTION) == 10 and len(MME_COGNITION) == 4
    assert {"existence", "count", "position", "color", "OCR", "artwork"} <= set(MME_PERCEPTION)
    assert set(MME_COGNITION) == {"commonsense_reasoning", "numerical_calculation", "text_translation",
                                  "code_reasoning"}


def test_mme_scores_by_hand():
    def row(subtask, image, correct):
        return {"subtask": subtask, "image": image, "correct": correct}

    rows = [
        row("existence", "e1", True), row("existence", "e1", True),
        row("existence", "e2", True), row("existence", "e2", False),
        row("count", "c1", False), row("count", "c1", False),
        {"subtask": "Color", "image": "k1", "pred": "Yes", "answer": "Yes"},  # read with mme_answer
        {"subtask": "color", "image": "k1", "pred": "no", "answer": "Yes"},
        row("code reasoning", "r1", True), row("code_reasoning", "r1", True),
    ]
    got = mme_scores(rows)
    ex = got["subtasks"]["existence"]
    # acc 3/4 questions, acc+ 1/2 images (e2 has a wrong question) -> (0.75 + 0.5) * 100
    assert (ex["acc"], ex["acc_plus"], ex["score"], ex["n_questions"], ex["n_images"]) == (0.75, 0.5, 125.0, 4, 2)
    assert got["subtasks"]["count"]["score"] == 0.0
    assert (got["subtasks"]["color"]["acc"], got["subtasks"]["color"]["acc_plus"]) == (0.5, 0.0)
    assert got["subtasks"]["code_reasoning"]["score"] == 200.0
    assert got["perception"] == pytest.approx(125 + 0 + 50)
    assert got["cognition"] == pytest.approx(200)
    assert got["total"] == pytest.approx(375)
    assert "OCR" in got["missing"] and "existence" not in got["missing"]


def test_mme_full_marks():
    rows = [{"subtask": s, "image": f"{s}-{i}", "correct": True}
            for s in MME_PERCEPTION + MME_COGNITION for i in range(3) for _ in range(2)]
    got = mme_scores(rows)
    assert (got["perception"], got["cognition"], got["total"], got["missing"]) == (2000.0, 800.0, 2800.0, [])


def test_mme_errors():
    with pytest.raises(ValueError, match="unknown MME subtask 'foo'"):
        mme_scores([{"subtask": "foo", "image": "x", "correct": True}])
    with pytest.raises(ValueError, match="no rows"):
        mme_scores([])


# ---------------------------------------------------------------------------------------- registry and aggregation


def test_registry_and_aggregate():
    assert set(METRICS) == {"vqa_accuracy", "anls", "relaxed_accuracy", "exact_match", "choice_accuracy"}
    scores = [METRICS["vqa_accuracy"]("two", _refs(n)) for n in (1, 4, 0, 3)]
    assert aggregate("vqa_accuracy", scores) == {"metric": "vqa_accuracy", "score": pytest.approx(0.55), "n": 4}
    assert METRICS["anls"]("hallo", ["hello"]) == pytest.approx(0.8)
    assert aggregate("exact_match", [1.0, 0.0]) == {"metric": "exact_match", "score": 0.5, "n": 2}
    with pytest.raises(KeyError, match="unknown per-sample metric 'bleu'"):
        aggregate("bleu", [1.0])
    with pytest.raises(ValueError, match="no scores"):
        aggregate("anls", [])


# mutation audit: rules a one-line change could break unnoticed

def test_mme_answer_reads_only_the_first_four_characters():
    assert mme_answer("yes, it is") == "yes"
    assert mme_answer("a yes") == "other"  # "yes" starts at character 3: outside the first 4
    assert mme_answer("ok no") == "other"


def test_mmbench_groups_by_index_modulo_one_million():
    rows = [{"index": 1, "correct": True}, {"index": 1_000_001, "correct": False},
            {"index": 100_001, "correct": True}]
    assert mmbench_circular(rows) == pytest.approx(0.5)  # {1, 1000001}: wrong; {100001}: right
