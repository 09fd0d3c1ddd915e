"""Answer scoring. (The official benchmark metrics — VQA accuracy, ANLS, relaxed accuracy — come with the
evaluation stage; this is the exact-match used for the synthetic task.)"""

from __future__ import annotations

import re


def normalize_answer(text: str) -> str:
    text = text.lower().strip()
    text = re.sub(r"[^\w\s]", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: list[str]) -> float:
    """1.0 when the normalised prediction equals a normalised answer, or ends with it as its last word
    (models that echo the asked colour answer "red 7")."""
    pred = normalize_answer(prediction)
    for a in answers:
        a = normalize_answer(a)
        if pred == a or (a and pred.split()[-1:] == [a]):
            return 1.0
    return 0.0
