"""The benchmarks' answer metrics as the harness behind the paper computes them, on the raw model output.

The reference is the lmms-eval copy vendored in the authors' repository (its task files are byte-identical to
lmms-eval 0.4.0 on PyPI, which the parity tests run against these functions):
* `vqa_accuracy`: TextVQA soft accuracy, EvalAI answer normalisation, mean over the leave-one-annotator-out
  subsets of min(1, #matches among the others / 3) (one reference alone scores 0, as there).
* `anls`: 1 - normalised Levenshtein distance of the lower-cased, whitespace-collapsed strings, divided by the
  longer *raw* length; kept when >= 0.5 (DocVQA, InfoVQA).
* `relaxed_accuracy`: ChartQA, 5 % relative tolerance when both parse as numbers and the target is non-zero,
  else case-insensitive string equality (nothing stripped).
* `ocrbench_score`: OCRBench containment; for the HME100k handwritten maths set all spaces and newlines go.
* `vstar_letter` / `choice_accuracy`: V*'s letter extraction; `hrbench_letter`: HR-Bench's rule-based option
  matcher (its GPT judge, called when the rules fail, needs a network: such answers score 0 here).
* `pope_metrics`: accuracy, precision, recall, F1 with "yes" positive on the exact lower-cased answer.
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
# The harness's pattern reads as a look-ahead for the text "<=\d": it deletes every '.' not followed by a digit.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
_MAX_PERIODS = 32  # the harness passes re.UNICODE (32) as `count`: at most 32 periods are removed


def _punctuation(text: str) -> str:
    """Punctuation next to a space, or any when the text has a digit-comma-digit, is deleted; other punctuation
    becomes a space; periods go unless a digit follows. Every test looks at the original text."""
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, _MAX_PERIODS)


def _digits_articles(text: str) -> str:
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_vqa_answer(text: str) -> str:
    """EvalAI's answer processor: lower case, ',' '?' dropped, "'s" split off, punctuation, number words to
    digits, articles dropped, contractions restored."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles(_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Soft accuracy against the (usually ten) human answers, averaged over leave-one-out subsets."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = normalize_vqa_answer(prediction)
    gts = [normalize_vqa_answer(a) for a in answers]
    scores = [min(1.0, sum(g == pred for j, g in enumerate(gts) if j != i) / 3.0) for i in range(len(gts))]
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


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """1 - the smallest normalised Levenshtein distance over the references, 0 below `threshold`. The distance is
    taken between normalised strings but divided by the longer raw length, as the harness does."""
    if not answers:
        raise ValueError("anls needs at least one reference answer")
    det = " ".join(prediction.strip().lower().split())
    distances = []
    for answer in answers:
        gt = " ".join(answer.strip().lower().split())
        length = max(len(answer.upper()), len(prediction.upper()))
        distances.append(levenshtein(gt, det) / length if length else 0.0)
    best = 1.0 - min(distances)
    return 0.0 if best < threshold else best


# -- ChartQA relaxed accuracy ------------------------------------------------------------------------------------


def _to_float(text: str) -> float | None:
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, answers: Sequence[str], max_relative_change: float = 0.05) -> float:
    """1.0 when prediction and a target both parse as numbers ('%' divides by 100) and differ by at most 5 % of a
    non-zero target; otherwise when the strings are equal ignoring case. A zero target is compared as a string."""
    p = _to_float(prediction)
    for target in answers:
        t = _to_float(target)
        numeric = p is not None and bool(t)
        if abs(p - t) / abs(t) <= max_relative_change if numeric else prediction.lower() == target.lower():
            return 1.0
    return 0.0


# -- OCRBench ------------------------------------------------------------------------------------------------------

HANDWRITTEN_MATH = "HME100k"  # OCRBench's source dataset scored without spaces


def ocrbench_score(prediction: str, answers: Sequence[str], dataset: str = "") -> float:
    """1 when a reference is contained in the lower-cased prediction. For `HME100k` spaces and newlines are removed
    from both and the reference keeps its case (so, as in the authors' harness, an upper-case formula cannot
    match); otherwise the reference is lower-cased too."""
    pred = prediction.lower().strip()
    for answer in answers:
        if dataset == HANDWRITTEN_MATH:
            a = answer.strip().replace("\n", " ").replace(" ", "")
            hit = a in pred.replace("\n", " ").replace(" ", "")
        else:
            hit = answer.lower().strip().replace("\n", " ") in pred.replace("\n", " ")
        if hit:
            return 1.0
    return 0.0


# -- multiple choice and yes/no ----------------------------------------------------------------------------------

_VSTAR_PATTERNS = [
    re.compile(p, re.IGNORECASE)
    for p in (
        r"^([A-D])\s*[\.)\]]*",
        r"(?:THE\s+)?(?:ANSWER|CHOICE|OPTION)(?:\s+IS)?[\s:]+([A-D])",
        r"\(([A-D])\)",
        r"([A-D])\s*(?:\.|\)|])",
        r"(?:^|\s)([A-D])(?:\s|$)",
    )
]


def vstar_letter(prediction: str) -> str | None:
    """V*'s extraction, in its order: a leading letter ("Blue" reads as B, as there), "answer is X", "(X)", "X." /
    "X)", a lone letter; then the only A-D letter in the text."""
    text = prediction.strip().upper()
    for pattern in _VSTAR_PATTERNS:
        if m := pattern.search(text):
            return m.group(1).upper()
    letters = re.findall(r"[A-D]", text)
    # the harness then falls back to the first character when it is A-D, which the leading-letter pattern took
    return letters[0] if len(letters) == 1 else None


def choice_accuracy(prediction: str, answer: str) -> float:
    return 1.0 if vstar_letter(prediction) == answer.strip().upper() else 0.0


_REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)


def hrbench_letter(prediction: str, options: dict[str, str]) -> str | None:
    """HR-Bench's rule-based matcher: exactly one option letter as a whole token (after .()[],:;!*#{} become
    spaces; case-sensitive), else 'Z' for a refusal or a lone 'Z', else exactly one option text contained in the
    answer (case-insensitive); None where the harness would ask its GPT judge."""
    if "Failed to obtain answer via API" in prediction:
        return None
    if any(r in prediction for r in _REFUSALS):
        return "Z"
    tokens = re.sub(r"[.()\[\],:;!*#{}]", " ", prediction).split()
    hits = [k for k in options if k in tokens]
    if len(hits) == 1:
        return hits[0]
    if not hits and "Z" in tokens:
        return "Z"
    low = prediction.lower()
    texts = [k for k, v in options.items() if str(v).lower() in low]
    return texts[0] if len(texts) == 1 else None


def pope_metrics(predictions: Sequence[str], answers: Sequence[str]) -> dict[str, float]:
    """POPE as the harness counts: the answer is the whole lower-cased, stripped output ("Yes." is neither yes nor
    no); an answer that is neither is wrong and counts in neither FP nor FN. `yes_ratio` is the harness's: the
    share of "yes" among the ground truth; `pred_yes_ratio` is the share of "yes" answers."""
    preds = [p.lower().strip() for p in predictions]
    gts = [g.lower().strip() for g in answers]
    tp = sum(p == "yes" and g == "yes" for p, g in zip(preds, gts, strict=True))
    fp = sum(p == "yes" and g == "no" for p, g in zip(preds, gts, strict=True))
    fn = sum(p == "no" and g == "yes" for p, g in zip(preds, gts, strict=True))
    correct = sum(p == g for p, g in zip(preds, gts, strict=True))
    n = max(len(gts), 1)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    labelled = sum(g in ("yes", "no") for g in gts)
    return {
        "accuracy": correct / n,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": sum(g == "yes" for g in gts) / labelled if labelled else 0.0,
        "pred_yes_ratio": sum(p == "yes" for p in preds) / n,
    }


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
