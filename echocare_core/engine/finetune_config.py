"""`site.yaml` for local fine-tuning (`echocare-finetune`): the site's dataset, the model, the training recipe
(`train`, the same section as a federation job's) and the site's privacy ledger."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from echocare_core.config import check_ranges
from echocare_core.engine.training import LocalTraining
from echocare_core.models.heads import Decoder
from echocare_core.models.report import ReportHeadConfig
from echocare_core.models.swin import EncoderConfig

__all__ = ["FinetuneConfig", "FinetuneData", "FinetuneLedger", "FinetuneModel"]


@dataclass(frozen=True)
class FinetuneData:
    folder: str = ""  # the dataset folder (dataset.yaml + manifest.csv); checked with the verifier first
    split_seed: int = 0  # patient-grouped split when the manifest has no `split` column
    num_workers: int = 1

    def __post_init__(self) -> None:
        if not self.folder:
            raise ValueError("data.folder is empty: name the dataset folder (dataset.yaml + manifest.csv)")
        if self.num_workers < 0:
            raise ValueError(f"num_workers={self.num_workers}: must be >= 0")


@dataclass(frozen=True)
class FinetuneModel:
    init: str | None = (
        None  # encoder weights: the EchoCare release .pth, a toolkit or SwinUNETR checkpoint (null: random)
    )
    init_partial: bool = False  # load only the tensors of `init` that fit (otherwise a mismatch stops the run)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)  # used when `init` is not a toolkit checkpoint
    feature_size: int = 16  # width of the dense decoder (segmentation, landmarks, detection)
    decoder: Decoder = "unetr"  # the dense decoder: unetr (skips from every stage) or light (few parameters, for DP)
    frames: int = 16  # regression over clips: frames the model sees per clip, evenly spaced
    report: ReportHeadConfig = field(default_factory=ReportHeadConfig)  # report generation: the text decoder
    tokenizer: str | None = None  # report: a tokenizers JSON file (tokenizer.json); null = byte-level, any language
    beam: int = 3  # report: beam width when writing reports for validation and test (1 = greedy)

    def __post_init__(self) -> None:
        check_ranges(self, {key: (getattr(self, key) >= 1, ">= 1") for key in ("feature_size", "frames", "beam")})


@dataclass(frozen=True)
class FinetuneLedger:
    """The site's privacy ledger, which DP runs pay into: the same as its federated rounds'."""

    folder: str = "echocare_site/privacy"  # echocare-client's state_dir/privacy
    epsilon_budget: float = 0.0  # the site's lifetime cap per dataset (as in its site.yaml); 0: no cap

    def __post_init__(self) -> None:
        if self.epsilon_budget < 0:
            raise ValueError(f"epsilon_budget={self.epsilon_budget}: must be >= 0 (0: no cap)")


@dataclass(frozen=True)
class FinetuneConfig:
    output: str = "runs/finetune"  # run folder: best/ and last/ checkpoints, metrics.jsonl, test_metrics.json
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    epochs: int = 20  # passes over the training split
    max_batch_size: int = 0  # the most images the device holds at once: a larger train.batch_size goes through in
    # pieces of this size, accumulated into one step (0: no limit)
    data: FinetuneData = field(default_factory=FinetuneData)
    model: FinetuneModel = field(default_factory=FinetuneModel)
    train: LocalTraining = field(default_factory=LocalTraining)  # the recipe, as a federation job's `train`
    ledger: FinetuneLedger = field(default_factory=FinetuneLedger)

    def __post_init__(self) -> None:
        check_ranges(
            self,
            {"epochs": (self.epochs >= 1, ">= 1"), "max_batch_size": (self.max_batch_size >= 0, ">= 0 (0: no limit)")},
        )
