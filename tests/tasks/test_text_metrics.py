"""Report metrics on hand-made texts: identical reports score 1, known n-gram overlaps give known values."""

import math

import pytest

from echocare_core.tasks.text_metrics import bleu, finding_metrics, report_metrics, words

REFS = [
    "A 9 mm anechoic nodule in the left deep field, with a smooth margin and posterior acoustic enhancement.",
    "甲状腺右叶低回声结节，边界不清。",
]
FINDINGS = ("anechoic", "posterior acoustic enhancement", "irregular margin")


def test_identical_reports_score_one():
    m = report_metrics(REFS, REFS, FINDINGS)
    for key in (
        "bleu1",
        "bleu2",
        "bleu3",
        "bleu4",
        "rouge_l",
        "finding_accuracy",
        "finding_precision",
        "finding_recall",
        "finding_f1",
    ):
        assert m[key] == pytest.approx(1.0), key
    assert 0.99 < m["meteor"] < 1.0  # METEOR's fragmentation penalty is never 0


def test_known_unigram_and_bigram_overlap():
    # 4 of 5 words match; bigrams: "a cyst" matches, 1 of 4; same length, so no brevity penalty
    assert bleu(["a cyst is seen here"], ["a cyst was seen there"], 1) == pytest.approx(3 / 5)
    assert bleu(["a cyst is seen here"], ["a cyst was seen there"], 2) == pytest.approx(math.sqrt(3 / 5 * 1 / 4))
    m = report_metrics(["a cyst is seen here"], ["a cyst was seen there"])
    assert m["rouge_l"] == pytest.approx(3 / 5) and m["bleu4"] == pytest.approx(0.0, abs=1e-6)
    assert "finding_f1" not in m


@pytest.mark.parametrize(
    "pred, ref",
    [
        ("甲状腺右叶低回声结", "甲状腺左叶低回声结"),
        ("あいうえおかきくけさ"[:9], "あいうえおかきくこ"),
        ("갑상선우엽저에코결", "갑상선좌엽저에코결"),
    ],
)
def test_chinese_japanese_and_korean_are_scored_per_character(pred, ref):
    assert words("甲状腺 nodule, 5mm") == ["甲", "状", "腺", "nodule", "5mm"]
    # 8 of the 9 characters agree (one differs): BLEU-1 counts characters, not the whole sentence as one word
    assert bleu([pred], [ref], 1) == pytest.approx(8 / 9)
    assert report_metrics([pred], [ref])["rouge_l"] == pytest.approx(8 / 9)


def test_findings_are_counted_per_report_and_finding():
    preds = ["anechoic, posterior acoustic enhancement", "an irregular margin", "nothing"]
    refs = ["anechoic", "irregular margin, anechoic", "nothing"]
    m = finding_metrics(preds, refs, FINDINGS)
    # stated: tp = anechoic (1) + irregular margin (2) = 2; fp = enhancement (1); fn = anechoic (2)
    assert m["finding_precision"] == pytest.approx(2 / 3) and m["finding_recall"] == pytest.approx(2 / 3)
    assert m["finding_f1"] == pytest.approx(2 / 3) and m["finding_accuracy"] == pytest.approx(7 / 9)
    assert math.isnan(finding_metrics(["none"], ["none"], FINDINGS)["finding_precision"])
    # whole words only: "microcalcification" is not "calcification"
    m = finding_metrics(
        ["microcalcification"],
        ["calcification, Posterior Acoustic Enhancement"],
        ("calcification", "posterior acoustic enhancement"),
    )
    assert m["finding_recall"] == 0 and m["finding_accuracy"] == 0


def test_mismatched_lists_are_refused():
    with pytest.raises(ValueError, match="one generated report per reference"):
        report_metrics(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="at least one"):
        report_metrics([], [])
