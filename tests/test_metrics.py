"""Hand-checked cases for every normalisation rule and metric."""

from __future__ import annotations

import pytest

from sdrpn_core.metrics import (
    anls,
    choice_accuracy,
    exact_match,
    extract_choice,
    levenshtein,
    normalize_vqa_answer,
    ocrbench_score,
    pope_metrics,
    relaxed_accuracy,
    vqa_accuracy,
)


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("Yes", "yes"),  # case
        ("  two\tdogs\n", "2 dogs"),  # whitespace, number words
        ("ten", "10"),
        ("none", "0"),
        ("the cat", "cat"),  # articles
        ("a an the dog", "dog"),
        ("dont", "don't"),  # contractions
        ("isnt it", "isn't it"),
        ("1,000", "1000"),  # digit-comma-digit: punctuation deleted
        ("red, white", "red white"),  # comma before a space: deleted
        ("red/white", "red white"),  # other punctuation: a space
        ("3.5", "3.5"),  # decimal point kept
        ("end.", "end"),  # period dropped
        ("coca-cola", "coca cola"),
        ("(hello)", "hello"),
    ],
)
def test_evalai_normalisation(raw, normalised):
    assert normalize_vqa_answer(raw) == normalised


def test_vqa_accuracy_leave_one_out():
    assert vqa_accuracy("two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)  # 3 matches: 3×(2/3) + 7×1
    assert vqa_accuracy("2", ["2"] * 2 + ["x"] * 8) == pytest.approx(0.6)  # 2×(1/3) + 8×(2/3)
    assert vqa_accuracy("2", ["2"] * 10) == 1.0
    assert vqa_accuracy("The Dog.", ["dog"] * 10) == 1.0
    assert vqa_accuracy("cat", ["dog"] * 10) == 0.0
    with pytest.raises(ValueError, match="reference"):
        vqa_accuracy("x", [])


def test_anls():
    assert levenshtein("kitten", "sitting") == 3
    assert anls("Hello  World", ["hello world"]) == 1.0
    assert anls("hallo", ["hello"]) == pytest.approx(0.8)  # 1 edit / 5
    assert anls("abc", ["xyz"]) == 0.0  # NL = 1 ≥ 0.5
    assert anls("abcd", ["abxy"]) == 0.0  # NL = 0.5 exactly: zeroed
    assert anls("abcd", ["zzzz", "abcx"]) == pytest.approx(0.75)  # best reference wins


def test_relaxed_accuracy():
    assert relaxed_accuracy("10.4", ["10"]) == 1.0  # 4 % off
    assert relaxed_accuracy("10.6", ["10"]) == 0.0  # 6 % off
    assert relaxed_accuracy("51%", ["0.5"]) == 1.0  # percentage
    assert relaxed_accuracy("0", ["0"]) == 1.0 and relaxed_accuracy("0.01", ["0"]) == 0.0
    assert relaxed_accuracy("Yes", ["yes"]) == 1.0 and relaxed_accuracy("no", ["yes"]) == 0.0


def test_ocrbench_containment():
    assert ocrbench_score("The sign says STOP here", ["stop"]) == 1.0
    assert ocrbench_score("go", ["stop"]) == 0.0
    hme = "Handwritten Mathematical Expression Recognition"
    assert ocrbench_score("x ^ { 2 } + 1", ["x^{2}+1"], hme) == 1.0
    assert ocrbench_score("x ^ { 2 } + 1", ["x^{2}+1"]) == 0.0  # spaces matter elsewhere


def test_choice_extraction():
    for text, letter in [("B", "B"), ("(C)", "C"), ("A. red", "A"), ("The answer is D.", "D"), ("[B]", "B")]:
        assert extract_choice(text) == letter
    assert extract_choice("I cannot tell") is None
    assert extract_choice("E", options=("A", "B", "C", "D")) is None
    assert choice_accuracy("(b)", "B") == 0.0  # lower-case letters are words, not options
    assert choice_accuracy("The red one", "B", {"A": "the blue one", "B": "the red one"}) == 1.0


def test_pope_metrics():
    m = pope_metrics(["Yes", "yes, it is", "No", "no", "maybe"], ["yes", "no", "no", "yes", "yes"])
    # tp 1, fp 1, tn 1, fn 2 ("maybe" counts as no)
    assert m["accuracy"] == pytest.approx(2 / 5)
    assert m["precision"] == pytest.approx(0.5) and m["recall"] == pytest.approx(1 / 3)
    assert m["f1"] == pytest.approx(0.4) and m["yes_ratio"] == pytest.approx(0.4)


def test_exact_match_with_echoed_colour():
    assert exact_match("red 7", ["7"]) == 1.0 and exact_match("7.", ["7"]) == 1.0 and exact_match("1", ["7"]) == 0.0
