"""Report generation: a transformer decoder on the last stage's tokens of one or two images, trained by next-token
cross-entropy with a findings classifier; BLEU, METEOR, ROUGE-L and finding-level scores (`text_metrics`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from echocare_core.data.io import ImageReadError, read_image
from echocare_core.data.spec import DatasetSpec
from echocare_core.data.text import ReportTokenizer
from echocare_core.models.report import ReportHead, ReportHeadConfig
from echocare_core.tasks.base import InputSpec, Loss, Task, TaskHead
from echocare_core.tasks.text_metrics import bleu, report_metrics, stated

__all__ = ["Report", "report_loss", "studies"]


class Report(Task):
    name = "report"
    main_metric = "bleu4"
    teacher_forcing = True
    sample_parts = "a report's views"
    stacked = False

    def outputs(self, classes: int, labels: int, landmarks: int, tokenizer: ReportTokenizer | None = None) -> int:
        return (tokenizer or ReportTokenizer()).vocab_size  # byte-level unless the site names a tokenizer

    def head(
        self, cfg: Any, outputs: int, feature_size: int, report: ReportHeadConfig | None, decoder: str = "unetr"
    ) -> nn.Module:
        return ReportHead(cfg.stage_channels[-1], cfg.stage_resolutions[-1] ** 2, outputs, report or ReportHeadConfig())

    def forward(self, model: Any, images: torch.Tensor, ids: torch.Tensor | None = None) -> Any:
        """The views of each report `[B, V, C, H, W]` with its token ids `[B, L]` (teacher forcing) ->
        `[B, L - 1, vocab]` logits of ids[:, 1:] and `[B, F]` logits of the head's findings (F may be 0)."""
        if ids is None:
            raise ValueError("a report model reads the report's ids in training; to write one use generate()")
        return model.head(self.views(model, images), ids[:, :-1])

    def views(self, model: Any, images: torch.Tensor) -> torch.Tensor:
        """Last-stage tokens of every view: `[B, V, C, H, W] -> [B, V, h * w, C_enc]`."""
        b, v = images.shape[:2]
        return model.encoder.forward_features(images.flatten(0, 1)).reshape(b, v, -1, model.encoder.num_features)

    def generate(self, model: Any, images: torch.Tensor, bos: int, eos: int, beam: int = 1) -> list[list[int]]:
        """Report ids of each sample's views `[B, V, C, H, W]` (greedy for `beam` 1, else beam search)."""
        return model.head.generate(self.views(model, images), bos, eos, beam)

    def finding_probabilities(self, model: Any, images: torch.Tensor) -> torch.Tensor:
        """`[B, F]` probabilities of the report head's findings in each sample's views `[B, V, C, H, W]`."""
        return model.head.finding_logits(self.views(model, images)).sigmoid()

    def images_per_sample(self, frames: int, views: int) -> int:
        return views

    def target(self, ds: Any, value: str, height: int, width: int) -> torch.Tensor:
        """The report's token ids `[max_tokens]`."""
        return ds.tokenizer.encode(value)

    def flip(self, target: Any, size: int) -> None:
        return None  # reports say "left" and "right"

    def predict_batch(self, model: Any, batch: dict[str, Any], ds: Any, beam: int) -> tuple[list, list]:
        """Reports written with beam search of width `beam`, beside the manifest's reports."""
        tok = ds.tokenizer
        written = [tok.decode(ids) for ids in self.generate(model, batch["image"], tok.bos, tok.eos, beam)]
        return written, [ds.rows[int(i)]["report"] for i in batch["row"]]

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

    def resampled(self, pred: Any, true: Any, k: int) -> Callable[[np.ndarray], float]:
        return lambda idx: bleu([pred[i] for i in idx], [true[i] for i in idx])  # corpus BLEU-4

    def columns(self, head: TaskHead) -> list[str]:
        return ["study", "images", "report_file", "report", *[f"p_{f}" for f in _classified(head)]]

    def predict_files(
        self,
        model: Any,
        head: TaskHead,
        inputs: InputSpec,
        files: list[Path],
        out: Path,
        min_score: float,
        beam: int,
    ) -> tuple[list[list[str]], int]:
        """One row per study (`studies`): its images, the report (also written to `<study>_report.txt`) and the
        probability of each finding the head's classifier scores."""
        if beam < 1:
            raise ValueError(f"beam={beam}: must be >= 1 (1: greedy)")
        tok, scored = head.report_tokenizer(), _classified(head)
        rows, unreadable = [], 0
        for i, (study, views) in enumerate(studies(files, head.report.views)):
            names = ";".join(str(f) for f in views)
            try:
                x = torch.cat([inputs.tensor(read_image(f, inputs.channels)[None]) for f in views])[None]
            except ImageReadError:
                unreadable += 1
                rows.append([study, names, "unreadable", "", *[""] * len(scored)])
                continue
            with torch.no_grad():
                text = tok.decode(self.generate(model, x, tok.bos, tok.eos, beam)[0])
                probs = self.finding_probabilities(model, x)[0]  # [F]; F is 0 without a classifier
            name = f"{i:05d}_{study}_report.txt"
            (out / name).write_text(text + "\n", encoding="utf-8")
            rows.append([study, names, name, text, *[f"{float(p):.4f}" for p in probs]])
        return rows, unreadable


def _classified(head: TaskHead) -> list[str]:
    """The findings a report model's classifier scores from the images (none without one)."""
    return list(head.report.findings) if head.report is not None and head.report.classifies else []


def studies(files: list[Path], views: int) -> list[tuple[str, list[Path]]]:
    """(name, images) of each study: every image alone for a one-view model; the images of one folder for a
    two-view model (a folder of one image: it is repeated).

    Raises:
        ValueError: a folder with more images than the model reads per report.
    """
    if views == 1:
        return [(f.stem, [f]) for f in files]
    folders: dict[Path, list[Path]] = {}
    for file in files:
        folders.setdefault(file.parent, []).append(file)
    for folder, members in folders.items():
        if len(members) > views:
            raise ValueError(
                f"{folder} holds {len(members)} images: the model reads {views} per report, from one "
                f"study folder each (put each study's images in a folder of its own)"
            )
    return [(folder.name, sorted(members) * (views // len(members))) for folder, members in folders.items()]


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
