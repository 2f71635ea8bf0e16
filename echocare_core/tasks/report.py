"""Report generation: a transformer decoder on the last stage's tokens of one or two images, trained by next-token
cross-entropy with a findings classifier; BLEU, METEOR, ROUGE-L and finding-level scores (`text_metrics`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from echocare_core.data.contract import DatasetSpec
from echocare_core.data.text import ReportTokenizer
from echocare_core.models.report import ReportHeadConfig
from echocare_core.tasks.base import Loss, Task
from echocare_core.tasks.text_metrics import report_metrics, stated

__all__ = ["Report", "report_loss"]


class Report(Task):
    name = "report"
    main_metric = "bleu4"
    teacher_forcing = True
    sample_parts = "a report's views"

    def outputs(self, classes: int, labels: int, landmarks: int, tokenizer: ReportTokenizer | None = None) -> int:
        return (tokenizer or ReportTokenizer()).vocab_size  # byte-level unless the site names a tokenizer

    def loss(
        self,
        spec: DatasetSpec,
        stats: Any = None,
        tokenizer: ReportTokenizer | None = None,
        head: ReportHeadConfig | None = None,
    ) -> Loss:
        if tokenizer is None:
            raise ValueError("report generation's loss needs the tokenizer")
        return report_loss(tokenizer, head)

    def metrics(self, pred: Any, true: Any, k: int, threshold: float | None = None, findings: Any = ()) -> dict:
        return report_metrics(pred, true, tuple(findings))


def report_loss(
    tokenizer: ReportTokenizer, head: ReportHeadConfig | None = None
) -> Callable[[tuple[torch.Tensor, torch.Tensor], torch.Tensor], torch.Tensor]:
    """Per report, the next-token cross-entropy (mean over its tokens, padding left out) plus, where the head
    classifies findings, `findings_weight` times the findings' binary cross-entropy, labelled by whether the
    report's text (as far as its ids reach) states each; then the mean over reports."""
    findings, weight = (head.findings, head.findings_weight) if head and head.classifies else ((), 0.0)

    def loss(out: tuple[torch.Tensor, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:  # [B, L - 1, vocab], [B, F]
        logits, finding_logits = out
        target = ids[:, 1:]
        keep = (target != tokenizer.pad).float()
        ce = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")  # [B, L - 1]
        per_report = (ce * keep).sum(1) / keep.sum(1).clamp(min=1)
        if findings:
            labels = stated([tokenizer.decode(r) for r in ids], findings)
            bce = F.binary_cross_entropy_with_logits(
                finding_logits, torch.as_tensor(labels, dtype=finding_logits.dtype, device=ids.device), reduction="none"
            )
            per_report = per_report + weight * bce.mean(1)
        return per_report.mean()

    return loss
