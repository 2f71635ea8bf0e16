"""`site.yaml` for local fine-tuning (`echocare-finetune`): the site's dataset, model and training limits."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from echocare_core.models.report import ReportHeadConfig
from echocare_core.models.swin import EncoderConfig
from echocare_core.privacy.settings import DPSettings

__all__ = ["FinetuneConfig", "FinetuneData", "FinetuneModel", "FinetuneOptim", "FinetunePrivacy"]


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
    init: str | None = None  # encoder weights: the EchoCare release .pth, a toolkit or SwinUNETR checkpoint (null: random)
    init_partial: bool = False  # load only the tensors of `init` that fit (otherwise a mismatch stops the run)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)  # used when `init` is not a toolkit checkpoint
    mode: Literal["full", "frozen", "lora"] = "lora"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    feature_size: int = 16  # width of the dense decoder (segmentation, landmarks, detection)
    frames: int = 16  # regression over clips: frames the model sees per clip, evenly spaced
    report: ReportHeadConfig = field(default_factory=ReportHeadConfig)  # report generation: the text decoder
    tokenizer: str | None = None  # report: a tokenizers JSON file (tokenizer.json); null = byte-level, any language
    beam: int = 3  # report: beam width when writing reports for validation and test (1 = greedy)

    def __post_init__(self) -> None:
        if self.lora_rank < 1 or self.feature_size < 1 or self.frames < 1 or self.beam < 1:
            raise ValueError(f"lora_rank={self.lora_rank}, feature_size={self.feature_size}, frames={self.frames} "
                             f"and beam={self.beam} must be >= 1")


@dataclass(frozen=True)
class FinetuneOptim:
    lr: float = 3e-4
    weight_decay: float = 0.05
    batch_size: int = 16
    epochs: int = 20
    warmup_epochs: int = 1
    clip_grad: float = 1.0
    precision: Literal["auto", "fp32", "bf16"] = "auto"

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.batch_size < 1 or self.epochs < 1 or self.warmup_epochs < 0 or self.clip_grad < 0:
            raise ValueError(f"need lr > 0, batch_size >= 1, epochs >= 1, warmup_epochs >= 0, clip_grad >= 0; "
                             f"got lr={self.lr}, batch_size={self.batch_size}, epochs={self.epochs}, "
                             f"warmup_epochs={self.warmup_epochs}, clip_grad={self.clip_grad}")


@dataclass(frozen=True)
class FinetunePrivacy:
    """DP-SGD for local fine-tuning, paid for in the same ledger as the site's federated rounds."""

    epsilon: float = 0.0  # for the whole run (all epochs); 0: no differential privacy
    delta: float = 1e-5
    max_grad_norm: float = 1.0  # per-sample clipping norm
    mode: Literal["hooks", "ghost"] = "hooks"  # ghost: per-sample norms only, two backward passes, less memory
    ledger: str = "echocare_site/privacy"  # the site's ledger: echocare-client's state_dir/privacy
    epsilon_budget: float = 0.0  # the site's lifetime cap per dataset (as in its site.yaml); 0: no cap

    def __post_init__(self) -> None:
        self.settings  # noqa: B018 - DPSettings checks the values
        if self.epsilon_budget < 0:
            raise ValueError(f"privacy.epsilon_budget={self.epsilon_budget}: must be >= 0 (0: no cap)")

    @property
    def settings(self) -> DPSettings:
        return DPSettings(self.epsilon, self.delta, self.max_grad_norm, self.mode)


@dataclass(frozen=True)
class FinetuneConfig:
    output: str = "runs/finetune"  # run folder: best/ and last/ checkpoints, metrics.jsonl, test_metrics.json
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: FinetuneData = field(default_factory=FinetuneData)
    model: FinetuneModel = field(default_factory=FinetuneModel)
    optim: FinetuneOptim = field(default_factory=FinetuneOptim)
    privacy: FinetunePrivacy = field(default_factory=FinetunePrivacy)
