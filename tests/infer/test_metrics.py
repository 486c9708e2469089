"""Metric functions on hand-made cases with known values.

    pytest tests/infer/test_metrics.py
"""

from __future__ import annotations

import math

import pytest

from llava_lora.infer import metrics


@pytest.mark.parametrize("text, expected", [
    ("The red circle.", "red circle"),
    ("  A   Large,  BLUE square!  ", "large blue square"),
    ("an apple and the pear", "apple and pear"),
    ("theatre another", "theatre another"),  # articles are whole words only
    ("", ""),
])
def test_normalise_is_squad_normalisation(text, expected):
    assert metrics.normalise(text) == expected


def test_exact_match_strict_and_normalised():
    assert metrics.exact_match(" red ", "red") == 1.0  # surrounding whitespace is not an answer
    assert metrics.exact_match("Red", "red") == 0.0
    assert metrics.exact_match_normalised("Red.", "red") == 1.0
    assert metrics.exact_match_normalised("The red circle", "red circle") == 1.0
    assert metrics.exact_match_normalised("red circle", "blue circle") == 0.0


@pytest.mark.parametrize("pred, ref, expected", [
    ("red", "red", 1.0),
    ("red circle", "a red square", 0.5),  # 1 common of 2 and 2 tokens: P = R = 1/2
    ("red red", "red", 2 / 3),  # clipped: 1 common, P = 1/2, R = 1
    ("the", "a", 1.0),  # both empty after normalisation
    ("", "red", 0.0),
    ("blue", "red", 0.0),
])
def test_token_f1(pred, ref, expected):
    assert metrics.token_f1(pred, ref) == pytest.approx(expected)


def test_bleu4_known_values():
    assert metrics.bleu4(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(1.0)
    # p1..p4 = 5/6, 3/5, 1/4, 0 -> exp smoothing makes p4 = 1/(2 * 3); BP = 1 (equal lengths)
    expected = (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25
    assert metrics.bleu4(["the cat is on the mat"], ["the cat sat on the mat"]) == pytest.approx(expected)
    assert metrics.bleu4([], []) == 0.0


def test_rouge_l_known_values():
    # LCS 5 of a 5-token prediction and a 6-token reference: P = 1, R = 5/6, F = 10/11
    assert metrics.rouge_l(["the cat on the mat"], ["the cat sat on the mat"]) == pytest.approx(10 / 11)
    assert metrics.rouge_l(["Red!", "blue"], ["red", "green"]) == pytest.approx(0.5)


def test_cider_d_matches_pycocoevalcap():
    # expected values computed with pycocoevalcap 1.2's Cider on the same (pre-tokenised) texts
    preds = ["a red circle at the top left", "a blue square", "green triangle", "red red red"]
    refs = ["a red circle in the top left", "a large blue square", "green triangle", "a small red square at the bottom"]
    mean, each = metrics.cider_d(preds, refs)
    assert each == pytest.approx([4.616377262270791, 2.8579852274359956, 5.0, 0.1713104225609177])
    assert mean == pytest.approx(3.161418228066926)
    mean, each = metrics.cider_d(["red", "square", "top left"], [["red", "crimson"], "circle", "top left"])
    assert each == pytest.approx([1.25, 0.0, 5.0])  # several references per sample are averaged
    assert metrics.cider_d(["red"], ["red"]) == (0.0, [0.0])  # one document: every idf is log(1) = 0


def test_cider_d_tokenises_like_coco():
    a, _ = metrics.cider_d(["Red, circle.", "blue"], ["red circle", "blue"])
    b, _ = metrics.cider_d(["red circle", "blue"], ["red circle", "blue"])
    assert a == b


def test_score_all_keys_and_ranges():
    scores = metrics.score_all(["Red.", "a blue square", ""], ["red", "a blue square", "green"])
    assert tuple(scores) == metrics.METRICS
    assert scores["exact_match"] == pytest.approx(1 / 3)
    assert scores["exact_match_normalised"] == pytest.approx(2 / 3)
    assert scores["token_f1"] == pytest.approx(2 / 3)
    assert all(math.isfinite(v) and v >= 0 for v in scores.values())
    with pytest.raises(ValueError):
        metrics.score_all(["a"], [])
