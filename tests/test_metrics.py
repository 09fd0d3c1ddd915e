"""Hand-checked cases for every metric rule of the harness behind the paper (lmms-eval as vendored by the
authors; the cases were worked out from its source, and `test_lmms_parity.py` runs its own functions too)."""

from __future__ import annotations

import pytest

from sdrpn_core.metrics import (
    anls,
    choice_accuracy,
    exact_match,
    hrbench_letter,
    levenshtein,
    normalize_vqa_answer,
    ocrbench_score,
    pope_metrics,
    relaxed_accuracy,
    vqa_accuracy,
    vstar_letter,
)


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("Yes", "yes"),  # case
        ("Yes.", "yes"),
        ("  two\tdogs\n", "2 dogs"),  # whitespace, number words
        ("ten", "10"),
        ("none", "0"),
        ("the cat", "cat"),  # articles
        ("a an the dog", "dog"),
        ("dont", "don't"),  # contractions
        ("isnt it", "isn't it"),
        ("1,000", "1000"),  # commas are dropped first
        ("red, white", "red white"),
        ("red/white", "red white"),  # other punctuation: a space
        ("a/b", "b"),  # … and then the article goes
        ("3.5", "3.5"),  # a period before a digit stays
        ("end.", "end"),
        ("U.S.A.", "usa"),
        ("The Coca-Cola", "coca cola"),
        ("(hello)", "hello"),
        ("(A) cat", "cat"),
        ("Nike's", "nike 's"),  # "'s" split off
        ("5:30", "5:30"),  # ':' is not in the list
        ("what?", "what"),
    ],
)
def test_evalai_normalisation(raw, normalised):
    assert normalize_vqa_answer(raw) == normalised


def test_evalai_removes_at_most_32_periods():
    assert normalize_vqa_answer("." * 40 + "x") == "." * 8 + "x"


def test_vqa_accuracy_leave_one_out():
    assert vqa_accuracy("two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)  # 3 matches: 3×(2/3) + 7×1
    assert vqa_accuracy("2", ["2"] * 2 + ["x"] * 8) == pytest.approx(0.6)  # 2×(1/3) + 8×(2/3)
    assert vqa_accuracy("2", ["2"] + ["x"] * 9) == pytest.approx(0.3)
    assert vqa_accuracy("2", ["2"] * 4 + ["x"] * 6) == 1.0
    assert vqa_accuracy("The Dog.", ["dog"] * 10) == 1.0
    assert vqa_accuracy("cat", ["dog"] * 10) == 0.0
    assert vqa_accuracy("dog", ["dog"]) == 0.0  # one reference: no other annotator agrees (as the harness)
    with pytest.raises(ValueError, match="reference"):
        vqa_accuracy("x", [])


def test_anls():
    assert levenshtein("kitten", "sitting") == 3
    assert anls("hello world", ["Hello World"]) == 1.0
    assert anls("hallo", ["hello"]) == pytest.approx(0.8)  # 1 edit / 5
    assert anls("abd", ["abc"]) == pytest.approx(2 / 3)
    assert anls("abc", ["xyz"]) == 0.0
    assert anls("abxy", ["abcd"]) == 0.5  # exactly 0.5 is kept
    assert anls("abcx", ["abcd"]) == pytest.approx(0.75)
    assert anls("xyz", ["ab", "xyz"]) == 1.0  # the best reference wins
    assert anls("", [""]) == 1.0 and anls("", ["ab"]) == 0.0
    # normalised strings, raw lengths: "a  b" vs "a b" is distance 0 over the raw length 4
    assert anls("a  b", ["a b"]) == 1.0 and anls("a  bx", ["a b"]) == pytest.approx(1 - 1 / 5)


def test_relaxed_accuracy():
    assert relaxed_accuracy("105", ["100"]) == 1.0 and relaxed_accuracy("106", ["100"]) == 0.0
    assert relaxed_accuracy("50%", ["0.5"]) == 1.0
    assert relaxed_accuracy("50", ["50%"]) == 0.0  # the target becomes 0.5
    assert relaxed_accuracy("0", ["0"]) == 1.0
    assert relaxed_accuracy("0.0", ["0"]) == 0.0  # a zero target is compared as a string
    assert relaxed_accuracy("Yes", ["yes"]) == 1.0 and relaxed_accuracy("Yes.", ["yes"]) == 0.0
    assert relaxed_accuracy("1e2", ["100"]) == 1.0 and relaxed_accuracy(" 100", ["100"]) == 1.0
    assert relaxed_accuracy("1,000", ["1000"]) == 0.0 and relaxed_accuracy("-5", ["5"]) == 0.0
    assert relaxed_accuracy("100.", ["100"]) == 1.0  # float("100.") parses


def test_ocrbench_containment():
    assert ocrbench_score("The word is HELLO.", ["Hello"]) == 1.0
    assert ocrbench_score("go", ["stop"]) == 0.0
    assert ocrbench_score("$x^{2}$", ["x^{2}"], "HME100k") == 1.0
    assert ocrbench_score("x ^ { 2 } + 1", ["x^{2}+1"], "HME100k") == 1.0  # spaces removed for maths
    assert ocrbench_score("x ^ { 2 } + 1", ["x^{2}+1"], "IIIT5K") == 0.0  # spaces matter elsewhere
    # the authors' copy lower-cases the prediction but not a maths reference
    assert ocrbench_score("\\frac { A } { 2 }", ["\\frac{A}{2}"], "HME100k") == 0.0


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("A", "A"),
        ("(B)", "B"),
        ("The answer is C.", "C"),
        ("D. leather", "D"),
        (" c ", "C"),
        ("I think it's (C)", "C"),
        ("Blue", "B"),  # a leading A-D letter counts, as in the harness
        ("answer: b", "A"),  # the "A" of "ANSWER"
        ("leather", "A"),  # the only A-D letter
        ("none", None),
        ("", None),
    ],
)
def test_vstar_letter_extraction(text, letter):
    assert vstar_letter(text) == letter
    assert choice_accuracy(text, letter or "Z") == float(letter is not None)


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("A", "A"),
        ("A.", "A"),
        ("(B)", "B"),
        ("The answer is C", "C"),
        ("D) yellow", "D"),
        ("C. green", "C"),
        ("blue", "B"),  # the option's text
        ("Blue car", "B"),
        ("Z", "Z"),
        ("Cannot determine the answer", "Z"),
        ("B or C", None),  # two letters: the harness would ask its judge
        ("red and blue", None),
        ("a", None),  # letters are case-sensitive
        ("A red car", "A"),  # the article "A" is a letter token
    ],
)
def test_hrbench_option_matching(text, letter):
    options = {"A": "red", "B": "blue", "C": "green", "D": "yellow"}
    assert hrbench_letter(text, options) == letter


def test_pope_metrics_exact_answers():
    m = pope_metrics(["Yes", "Yes.", "No", "yes", "maybe"], ["yes", "yes", "no", "no", "yes"])
    # "Yes." and "maybe" are neither yes nor no: wrong, and in neither FP nor FN
    assert m["accuracy"] == pytest.approx(2 / 5)
    assert m["precision"] == pytest.approx(0.5) and m["recall"] == pytest.approx(1.0)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(3 / 5)  # the harness's: of the ground truth
    assert m["pred_yes_ratio"] == pytest.approx(2 / 5)


def test_exact_match_with_echoed_colour():
    assert exact_match("red 7", ["7"]) == 1.0 and exact_match("7.", ["7"]) == 1.0 and exact_match("1", ["7"]) == 0.0


# -- written against mutation survivors (benchmarks/results/mutation.md) -------------------------------------------


def test_pope_counts_by_hand_on_an_asymmetric_set():
    preds = ["yes", "Yes", "no", "no", "yes.", "maybe", " YES "]
    gts = ["yes", "no", "yes", "no", "yes", "no", "yes"]
    m = pope_metrics(preds, gts)  # tp: 0, 6; fp: 1; fn: 2; correct: 0, 3, 6
    assert m == pytest.approx(
        {
            "accuracy": 3 / 7,
            "precision": 2 / 3,
            "recall": 2 / 3,
            "f1": 2 / 3,
            "yes_ratio": 4 / 7,
            "pred_yes_ratio": 3 / 7,
        }
    )
    assert pope_metrics(["yes"], ["yes"])["accuracy"] == 1.0
    none_yes = pope_metrics(["no", "no"], ["no", "no"])  # nothing predicted or labelled yes: 0, not 1
    assert (none_yes["precision"], none_yes["recall"], none_yes["f1"], none_yes["accuracy"]) == (0.0, 0.0, 0.0, 1.0)
    assert pope_metrics(["no"], ["yes"])["recall"] == 0.0 and pope_metrics(["maybe"], ["maybe"])["yes_ratio"] == 0.0
    with pytest.raises(ValueError):
        pope_metrics(["yes", "no"], ["yes"])


def test_ocrbench_newlines_and_spaces():
    assert ocrbench_score("a b", ["a\nb"]) == 1.0 and ocrbench_score("a\nb", ["a b"]) == 1.0
    assert ocrbench_score("x+1", ["x\n+ 1"], "HME100k") == 1.0 and ocrbench_score("x +\n1", ["x+1"], "HME100k") == 1.0
    assert ocrbench_score("x+2", ["x + 1"], "HME100k") == 0.0


def test_vqa_normaliser_drops_commas_question_marks_and_splits_possessives():
    assert normalize_vqa_answer("1,000?") == "1000"
    assert normalize_vqa_answer("Dog's\tbone\nhere") == "dog 's bone here"
    assert normalize_vqa_answer("a.b c") == "ab c"  # a period not followed by a digit goes
    # a '-' next to a space anywhere deletes every '-' (joining words); otherwise each becomes a space
    assert normalize_vqa_answer("x-y- z") == "xy z" and normalize_vqa_answer("x-y -z") == "xy z"
    assert normalize_vqa_answer("x-y") == "x y"


def test_levenshtein_both_orders_and_insertions():
    for a, b, d in [("ab", "abc", 1), ("abc", "ab", 1), ("", "abc", 3), ("abc", "axc", 1), ("ac", "abc", 1)]:
        assert levenshtein(a, b) == d
    assert levenshtein("abcdef", "azced") == 3


def test_anls_threshold_and_percent_targets():
    assert anls("abxy", ["abcd"], threshold=0.6) == 0.0 and anls("abcx", ["abcd"], threshold=0.75) == 0.75
    assert relaxed_accuracy("0.5", ["50%"]) == 1.0 and relaxed_accuracy("0.53", ["50%"]) == 0.0


def test_exact_match_reads_the_last_word_only():
    assert exact_match("7 red", ["7"]) == 0.0 and exact_match("it is 7", ["7"]) == 1.0


def test_second_round_of_survivors():
    from sdrpn_core.metrics import _to_float

    assert _to_float("50%") == 0.5 and _to_float("5X%") is None
    assert levenshtein("abcd", "bcda") == 2  # an insertion and a deletion, not four substitutions
    assert pope_metrics(["yes", "no"], ["yes", "yes"])["recall"] == 0.5  # tp == fn
    assert normalize_vqa_answer("x,y") == "xy" and normalize_vqa_answer("x?y") == "xy"
    assert hrbench_letter("Failed to obtain answer via API. A", {"A": "cat", "B": "dog"}) is None
    assert hrbench_letter("A", {"A": "cat", "B": "dog"}) == "A"


def test_newlines_and_tabs_are_spaces_when_punctuation_is_judged():
    """EvalAI replaces them before deciding whether punctuation sits next to a space (then it is deleted)."""
    from sdrpn_core.metrics import normalize_vqa_answer

    assert (
        normalize_vqa_answer("a-b\n-c") == normalize_vqa_answer("a-b\t-c") == normalize_vqa_answer("a-b -c") == "ab c"
    )
