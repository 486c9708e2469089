"""Answer-quality metrics of predictions against one reference each.

    scores = score_all(predictions, references)   # {"exact_match": 0.5, "exact_match_normalised": 0.75, ...}

| key | what | scale | from |
| --- | --- | --- | --- |
| ``exact_match`` | prediction == reference, after trimming surrounding whitespace | 0-1 | here |
| ``exact_match_normalised`` | equal after SQuAD normalisation (case, punctuation, articles, whitespace) | 0-1 | here |
| ``token_f1`` | SQuAD token-overlap F1 of the normalised texts, mean over samples | 0-1 | here |
| ``bleu4`` | corpus BLEU-4 with sacrebleu's default signature (13a tokens, exp smoothing), divided by 100 | 0-1 | sacrebleu |
| ``rouge_l`` | ROUGE-L F-measure, mean over samples | 0-1 | rouge-score |
| ``cider`` | CIDEr-D over the corpus, as the COCO caption code computes it (x10 included) | 0-10 | here |

SQuAD's EM/F1 are a dozen lines in the official script and CIDEr-D's only light home (pycocoevalcap) is a
100 MB wheel carrying Java jars for the other caption metrics, so those three are written here, checked against
the reference implementations' values in tests/test_metrics.py. BLEU-4 means little on one- and two-word answers
(they have no 4-grams; smoothing alone makes it non-zero): read EM and F1 for short answers, BLEU/ROUGE/CIDEr
for captions.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

METRICS = ("exact_match", "exact_match_normalised", "token_f1", "bleu4", "rouge_l", "cider")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalise(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(prediction.strip() == reference.strip())


def exact_match_normalised(prediction: str, reference: str) -> float:
    return float(normalise(prediction) == normalise(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD F1 over normalised tokens; two empty answers agree (1.0), one empty answer scores 0."""
    pred, ref = normalise(prediction).split(), normalise(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def bleu4(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU-4 in [0, 1], sacrebleu's defaults (signature ``nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp``)."""
    from sacrebleu.metrics import BLEU

    if not predictions:
        return 0.0
    return BLEU().corpus_score(list(predictions), [list(references)]).score / 100


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure (Google's rouge-score: lower-cased ASCII alphanumeric tokens, no stemming)."""
    from rouge_score.rouge_scorer import RougeScorer

    if not predictions:
        return 0.0
    scorer = RougeScorer(["rougeL"], use_stemmer=False)
    return sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)) / len(predictions)


def caption_tokens(text: str) -> list[str]:
    """Lower-cased words without punctuation: what COCO's PTB tokenisation feeds CIDEr, without Java."""
    return "".join(" " if ch in _PUNCTUATION else ch for ch in text.lower()).split()


def _ngrams(words: list[str], n: int = 4) -> Counter:
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def cider_d(predictions: Sequence[str], references: Sequence[str | Sequence[str]], n: int = 4,
            sigma: float = 6.0) -> tuple[float, list[float]]:
    """(corpus CIDEr-D, per-sample scores), as pycocoevalcap's ``Cider`` computes them.

    Document frequencies come from the references of this corpus, so the score depends on the whole set
    (one sample alone scores 0: every n-gram's idf is log(1/1)). Each reference may be a list of references.
    """
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    if not predictions:
        return 0.0, []
    hyp_counts = [_ngrams(caption_tokens(p), n) for p in predictions]
    ref_counts = [[_ngrams(caption_tokens(r), n) for r in rs] for rs in refs]
    doc_freq: Counter = Counter()
    for rs in ref_counts:
        doc_freq.update({g for r in rs for g in r})
    log_docs = math.log(len(ref_counts))

    def tfidf(counts: Counter) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(n)]
        for gram, tf in counts.items():
            vec[len(gram) - 1][gram] = tf * (log_docs - math.log(max(1.0, doc_freq[gram])))
        norms = [math.sqrt(sum(v * v for v in level.values())) for level in vec]
        # The COCO code's "length" counts bigrams, not words; kept so that scores match published ones.
        length = sum(tf for gram, tf in counts.items() if len(gram) == 2)
        return vec, norms, length

    scores = []
    for hyp, rs in zip(hyp_counts, ref_counts):
        h_vec, h_norm, h_len = tfidf(hyp)
        total = 0.0
        for ref in rs:
            r_vec, r_norm, r_len = tfidf(ref)
            penalty = math.exp(-((h_len - r_len) ** 2) / (2 * sigma ** 2))
            for k in range(n):
                # CIDEr-D clips each hypothesis weight at the reference's, so repeating words cannot gain
                dot = sum(min(w, r_vec[k].get(g, 0.0)) * r_vec[k].get(g, 0.0) for g, w in h_vec[k].items())
                if h_norm[k] and r_norm[k]:
                    dot /= h_norm[k] * r_norm[k]
                total += dot * penalty / n
        scores.append(10.0 * total / len(rs))
    return sum(scores) / len(scores), scores


def score_all(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Every metric of METRICS for one system's predictions (aligned with ``references``)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    count = max(len(predictions), 1)
    return {
        "exact_match": sum(map(exact_match, predictions, references)) / count,
        "exact_match_normalised": sum(map(exact_match_normalised, predictions, references)) / count,
        "token_f1": sum(map(token_f1, predictions, references)) / count,
        "bleu4": bleu4(predictions, references),
        "rouge_l": rouge_l(predictions, references),
        "cider": cider_d(predictions, references)[0],
    }
