"""The benchmarks' official answer metrics, re-implemented (no external API calls).

* `vqa_accuracy`: TextVQA / VQAv2 soft accuracy with the EvalAI answer normalisation, averaged over the ten
  leave-one-annotator-out subsets (min(1, #matches among the other nine / 3)).
* `anls`: average normalised Levenshtein similarity, threshold 0.5 (DocVQA, InfoVQA).
* `relaxed_accuracy`: ChartQA's 5 % relative tolerance for numbers, exact match otherwise.
* `ocrbench_score`: OCRBench's containment rule (whitespace-free for handwritten maths).
* `extract_choice` / `choice_accuracy`: multiple-choice letters (V*, HR-Bench), parsed locally, no GPT judge.
* `pope_metrics`: accuracy / precision / recall / F1 / yes-ratio with "yes" as the positive class.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# -- EvalAI VQA answer normalisation ----------------------------------------------------------------------------

_CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}
_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _punctuation(text: str) -> str:
    """Punctuation next to a space, or any when the text has a digit-comma-digit, is deleted; other punctuation
    becomes a space; periods go unless they are decimal points."""
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _digits_articles(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_vqa_answer(text: str) -> str:
    """EvalAI's answer processor: whitespace, punctuation, number words → digits, articles, contractions."""
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    return _digits_articles(_punctuation(text)).strip()


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """Soft accuracy against the (usually ten) human answers, averaged over leave-one-out subsets."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = normalize_vqa_answer(prediction)
    gts = [normalize_vqa_answer(a) for a in answers]
    scores = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1 :] if len(gts) > 1 else gts
        scores.append(min(1.0, sum(g == pred for g in others) / 3.0))
    return sum(scores) / len(scores)


# -- ANLS --------------------------------------------------------------------------------------------------------


def levenshtein(a: str, b: str) -> int:
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, answers: list[str], threshold: float = 0.5) -> float:
    """max over references of 1 − NL (normalised Levenshtein distance), zeroed when NL ≥ threshold."""
    pred = " ".join(prediction.strip().lower().split())
    best = 0.0
    for answer in answers:
        gt = " ".join(answer.strip().lower().split())
        longest = max(len(gt), len(pred))
        dist = levenshtein(gt, pred) / longest if longest else 0.0
        best = max(best, 0.0 if dist >= threshold else 1.0 - dist)
    return best


# -- ChartQA relaxed accuracy ------------------------------------------------------------------------------------


def _to_float(text: str) -> float | None:
    text = text.strip()
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, answers: list[str], max_relative_change: float = 0.05) -> float:
    """1.0 when a number is within 5 % of a numeric reference (exact for a zero reference), or the strings match
    case-insensitively; a trailing '%' means a percentage."""
    pred = prediction.strip().rstrip(".")
    for answer in answers:
        p, t = _to_float(pred), _to_float(answer)
        if p is not None and t is not None:
            ok = abs(p - t) / abs(t) <= max_relative_change if t != 0 else p == t
        else:
            ok = pred.lower() == answer.strip().lower()
        if ok:
            return 1.0
    return 0.0


# -- OCRBench ------------------------------------------------------------------------------------------------------


def ocrbench_score(prediction: str, answers: list[str], category: str = "") -> float:
    """1 when a reference is contained in the prediction (case-insensitive); for handwritten mathematical
    expressions all whitespace is removed first."""
    pred = prediction.strip().lower().replace("\n", " ")
    for answer in answers:
        if category == "Handwritten Mathematical Expression Recognition":
            a = re.sub(r"\s+", "", answer)
            if a and a in re.sub(r"\s+", "", prediction):
                return 1.0
        else:
            a = answer.strip().lower().replace("\n", " ")
            if a and a in pred:
                return 1.0
    return 0.0


# -- multiple choice and yes/no ----------------------------------------------------------------------------------

_CHOICE = re.compile(r"(?:^|[\s(\[])([A-F])(?:$|[\s).:,\]])")


def extract_choice(prediction: str, options: Sequence[str] = ("A", "B", "C", "D")) -> str | None:
    """The chosen option letter: a bare letter ("B", "(B)", "B.", "B) red"), else an option whose text the answer
    repeats; None when nothing matches."""
    text = prediction.strip()
    m = _CHOICE.search(text)
    if m and m.group(1) in options:
        return m.group(1)
    return None


def choice_accuracy(prediction: str, answer: str, option_texts: dict[str, str] | None = None) -> float:
    letter = extract_choice(prediction, tuple(option_texts or ("A", "B", "C", "D")))
    if letter is None and option_texts:
        low = prediction.strip().lower().rstrip(".")
        hits = [k for k, v in option_texts.items() if v and v.strip().lower() == low]
        letter = hits[0] if len(hits) == 1 else None
    return 1.0 if letter == answer.strip().upper() else 0.0


def yes_no(prediction: str) -> str | None:
    words = re.findall(r"[a-z]+", prediction.lower())
    for w in words[:3]:
        if w in ("yes", "no"):
            return w
    return None


def pope_metrics(predictions: Sequence[str], answers: Sequence[str]) -> dict[str, float]:
    """POPE: "yes" is positive; an unparseable prediction counts as "no" (as the official script does)."""
    tp = fp = tn = fn = yes = 0
    for pred, gt in zip(predictions, answers, strict=True):
        p = yes_no(pred) == "yes"
        g = gt.strip().lower() == "yes"
        yes += p
        tp += p and g
        fp += p and not g
        tn += (not p) and (not g)
        fn += (not p) and g
    n = max(len(answers), 1)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n, "precision": precision, "recall": recall, "f1": f1, "yes_ratio": yes / n}


# -- the synthetic task ------------------------------------------------------------------------------------------


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
