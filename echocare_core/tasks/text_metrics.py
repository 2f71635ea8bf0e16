"""Metrics of generated reports against the reference reports, from maintained implementations.

- BLEU-1 to BLEU-4: sacrebleu's corpus BLEU on the words below (no smoothing, as the COCO caption toolkit
  that report-generation papers quote, whose tokenizer also drops punctuation; sacrebleu's own `zh`
  tokenizer splits Chinese but not Japanese or Korean).
- ROUGE-L: Google's `rouge-score` (F-measure, mean over reports), with the words below instead of its own
  tokenizer, which drops every non-Latin character.
- METEOR: NLTK's `meteor_score` (mean over reports): exact, Porter-stem and WordNet-synonym matches. NLTK's
  WordNet corpus is data that is downloaded (`python -m nltk.downloader wordnet`); without it on the machine
  the synonym stage is skipped (logged once), so scores can be slightly lower than with it. The METEOR 1.5
  jar used by the COCO caption toolkit needs Java and English paraphrase tables, and is not used.
- Findings: where the dataset declares `findings` (phrases that a report states only when present, e.g.
  "posterior shadowing": a negated mention, "no posterior shadowing", would count as stated), each is read
  from both texts as a run of whole words: accuracy over all (report, finding) pairs, and micro precision,
  recall and F1 of the findings the generated reports state.

Words are lowercased runs of letters and digits, and each CJK character on its own.
"""

from __future__ import annotations

import logging
import re
from functools import cache

import numpy as np

__all__ = ["bleu", "finding_metrics", "report_metrics", "stated", "words"]

log = logging.getLogger(__name__)
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_WORD = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")


def words(text: str) -> list[str]:
    """Lowercased words: runs of letters and digits, each CJK character on its own."""
    return _WORD.findall(text.lower())


class _Words:
    """rouge-score's tokenizer interface."""

    def tokenize(self, text: str) -> list[str]:
        return words(text)


def bleu(preds: list[str], refs: list[str], order: int = 4) -> float:
    """Corpus BLEU-`order` in [0, 1] (sacrebleu; one reference per report)."""
    from sacrebleu.metrics import BLEU

    def text(t: str) -> str:
        return " ".join(words(t))

    metric = BLEU(max_ngram_order=order, tokenize="none", smooth_method="none")
    return metric.corpus_score([text(p) for p in preds], [[text(r) for r in refs]]).score / 100


class _NoSynonyms:
    """Stands in for WordNet when its corpus is not installed: no word has a synonym."""

    def synsets(self, *args: object, **kwargs: object) -> list:
        return []


@cache
def _wordnet() -> object:
    from nltk.corpus import wordnet

    try:
        wordnet.ensure_loaded()
        return wordnet
    except LookupError:
        log.warning(
            "NLTK's WordNet corpus is not installed: METEOR matches exact words and stems, no synonyms "
            "(python -m nltk.downloader wordnet adds them)"
        )
        return _NoSynonyms()


def _meteor(preds: list[str], refs: list[str]) -> float:
    from nltk.translate.meteor_score import meteor_score

    wordnet = _wordnet()
    return float(np.mean([meteor_score([words(r)], words(p), wordnet=wordnet) for p, r in zip(preds, refs)]))


def _rouge_l(preds: list[str], refs: list[str]) -> float:
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(["rougeL"], tokenizer=_Words())
    return float(np.mean([scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)]))


def stated(texts: list[str], findings: tuple[str, ...]) -> np.ndarray:
    """`[N, F]` booleans: whether each text states each finding (its words, in order, as whole words)."""
    phrases = [words(f) for f in findings]

    def says(text: list[str], phrase: list[str]) -> bool:
        return any(text[i : i + len(phrase)] == phrase for i in range(len(text) - len(phrase) + 1))

    return np.array([[says(words(t), f) for f in phrases] for t in texts], dtype=bool).reshape(-1, len(phrases))


def finding_metrics(preds: list[str], refs: list[str], findings: tuple[str, ...]) -> dict[str, float]:
    """Accuracy over (report, finding) pairs and micro precision, recall, F1 of the stated findings.

    Precision (recall) is NaN when no generated (reference) report states a finding.
    """
    p, t = stated(preds, findings), stated(refs, findings)
    tp, fp, fn = int((p & t).sum()), int((p & ~t).sum()), int((~p & t).sum())
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
    return {
        "finding_accuracy": float((p == t).mean()),
        "finding_precision": precision,
        "finding_recall": recall,
        "finding_f1": f1,
    }


def report_metrics(preds: list[str], refs: list[str], findings: tuple[str, ...] = ()) -> dict[str, float]:
    """BLEU-1..4, METEOR, ROUGE-L and, with `findings`, the finding-level metrics. Identical texts give 1 for all
    but METEOR, which stays just below 1 (its fragmentation penalty is never 0).

    Raises:
        ValueError: the lists differ in length or are empty.
    """
    if len(preds) != len(refs) or not refs:
        raise ValueError(f"need one generated report per reference, at least one; got {len(preds)} and {len(refs)}")
    out = {f"bleu{n}": bleu(preds, refs, n) for n in range(1, 5)}
    out |= {"meteor": _meteor(preds, refs), "rouge_l": _rouge_l(preds, refs)}
    return out | (finding_metrics(preds, refs, findings) if findings else {})
