"""A task that is not in the toolkit, written the way docs/architecture.md says to add one: this module and one
registry entry (the test registers it). It regresses an image's mean brightness (0-1) from its pooled feature."""

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from echocare_core.models.heads import ClassificationHead
from echocare_core.tasks.base import Loss, Task


class Brightness(Task):
    name = "brightness"
    main_metric = "mae"
    lower_is_better = True

    def head(self, cfg: Any, outputs: int, feature_size: int, report: Any, decoder: str = "unetr") -> nn.Module:
        return ClassificationHead(cfg.stage_channels[-1], 1)

    def forward(self, model: Any, images: torch.Tensor, ids: Any = None) -> torch.Tensor:
        return model.head(model.encoder(images))[:, 0]

    def target(self, ds: Any, value: str, height: int, width: int) -> torch.Tensor:
        return torch.tensor(float(value))

    def loss(self, spec: Any, stats: Any = None, tokenizer: Any = None, head: Any = None) -> Loss:
        return F.mse_loss

    def metrics(self, pred: Any, true: Any, k: int, threshold: Any = None, findings: Any = ()) -> dict[str, float]:
        return {"mae": float((pred - true).abs().mean())}

    def predict_image(self, model: Any, head: Any, inputs: Any, img: Any, stem: str, out: Any, _: float) -> list:
        return [f"{float(model(inputs.tensor(img))[0]):.4f}"]
