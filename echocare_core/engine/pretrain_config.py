"""`pretrain.yaml`: the researcher's config for `echocare-pretrain`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from echocare_core.data.pretrain import AugmentConfig
from echocare_core.models.swin import EncoderConfig

__all__ = ["PretrainConfig", "DataConfig", "MimConfig", "OptimConfig", "CheckpointConfig"]


@dataclass(frozen=True)
class DataConfig:
    """Where images come from and how they are read."""

    sources: tuple[str, ...] = ()  # dataset folders (with manifest.csv) or plain image folders
    ontology: str = "default"  # YAML file Region: {Organ: [Structure]}, or the shipped "default"
    frame_step: int = 10  # multi-frame DICOM: use every k-th frame
    min_nonzero: int = 1000  # drop images with fewer non-zero pixels (paper section 4.4)
    num_workers: int = 2  # DataLoader worker processes per training process
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        if self.frame_step < 1:
            raise ValueError(f"frame_step={self.frame_step}: must be >= 1")
        if self.num_workers < 0:
            raise ValueError(f"num_workers={self.num_workers}: must be >= 0")


@dataclass(frozen=True)
class MimConfig:
    """SimMIM masking."""

    mask_ratio: float = 0.5
    mask_patch_size: int = 32

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio={self.mask_ratio}: must be in (0, 1)")
        if self.mask_patch_size < 1:
            raise ValueError(f"mask_patch_size={self.mask_patch_size}: must be >= 1")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW + cosine schedule with linear warm-up; batch sizes count images."""

    lr: float = 5e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    batch_size: int = 256  # images per optimizer step, all processes together
    micro_batch: int = 32  # images per forward pass in one process; the rest is gradient accumulation
    steps: int = 10000  # optimizer steps in total
    warmup_steps: int = 500
    clip_grad: float = 5.0  # max global gradient norm; 0 disables clipping
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU

    def __post_init__(self) -> None:
        if self.micro_batch < 1 or self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} and micro_batch={self.micro_batch} must be >= 1")
        if self.batch_size % self.micro_batch:
            raise ValueError(f"batch_size={self.batch_size} must be a multiple of micro_batch={self.micro_batch}")
        if self.steps < 1 or self.warmup_steps < 0:
            raise ValueError(f"steps={self.steps} must be >= 1 and warmup_steps={self.warmup_steps} >= 0")
        if not 0 < self.min_lr <= self.lr:
            raise ValueError(f"lr={self.lr}, min_lr={self.min_lr}: need 0 < min_lr <= lr")
        if self.clip_grad < 0 or self.weight_decay < 0:
            raise ValueError(
                f"clip_grad={self.clip_grad} and weight_decay={self.weight_decay} must be >= 0 "
                f"(clip_grad 0 turns clipping off)"
            )


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 500  # also saved at the end and when the run is stopped with Ctrl-C / SIGTERM
    keep_last: int = 3

    def __post_init__(self) -> None:
        if self.every_steps < 1 or self.keep_last < 1:
            raise ValueError(f"every_steps={self.every_steps} and keep_last={self.keep_last} must be >= 1")


@dataclass(frozen=True)
class PretrainConfig:
    """Everything `echocare-pretrain` needs; saved resolved as `config.yaml` in the run folder."""

    output: str = "runs/pretrain"  # run folder: checkpoints, metrics.jsonl, report.md; reused to resume
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    hie_weight: float = 1.0  # lambda in L_MIM + lambda * L_HIE
    log_every: int = 10  # optimizer steps between metric lines
    init_weights: str | None = None  # encoder to start from: the EchoCare release .pth or a toolkit checkpoint
    init_partial: bool = False  # load only the tensors of `init_weights` that fit (otherwise a mismatch stops)
    compile: bool = False  # torch.compile the model: ~1.9x faster on an H100 after a few minutes of compiling
    data: DataConfig = field(default_factory=DataConfig)
    model: EncoderConfig = field(default_factory=EncoderConfig)
    mim: MimConfig = field(default_factory=MimConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self) -> None:
        if not self.data.sources:
            raise ValueError(
                "data.sources is empty: list at least one folder of images "
                "(make a demo one with `echocare-data synth --task pretrain`)"
            )
        if self.log_every < 1:
            raise ValueError(f"log_every={self.log_every}: must be >= 1")
        if self.hie_weight < 0:
            raise ValueError(f"hie_weight={self.hie_weight}: must be >= 0 (0 trains MIM only)")
        if self.mim.mask_patch_size % self.model.patch_size or self.model.img_size % self.mim.mask_patch_size:
            raise ValueError(
                f"mim.mask_patch_size={self.mim.mask_patch_size} must be a multiple of "
                f"model.patch_size={self.model.patch_size} and divide model.img_size={self.model.img_size}"
            )
