"""Hierarchical anatomy classifier with hierarchy-coherent probabilities.

The head predicts one sigmoid score per ontology node (regions, organs, structures). The max
constraint (EchoCare eq. 2-3, as in C-HMCNN) makes the probability of a node the maximum over its
subtree, so a class is never more probable than its parent. The loss is the matching hierarchical
BCE: a positive node takes the max over its *positive* subtree, and nodes below the deepest labelled
level are unknown and do not contribute.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from echocare_core.data.ontology import Ontology

__all__ = ["HierarchyHead"]


def _max_constraint(h: torch.Tensor, reach: torch.Tensor) -> torch.Tensor:
    """`out[b, i] = max_j reach[i, j] * h[b, j]` for `h` in [0, 1]: `[B, n] -> [B, n]`."""
    return (h.unsqueeze(1) * reach.unsqueeze(0)).amax(dim=-1)


class HierarchyHead(nn.Module):
    """Linear head over the global feature, `[B, C] -> [B, num_classes]` logits."""

    def __init__(self, in_features: int, ontology: Ontology) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, ontology.num_classes)
        targets, known = ontology.label_tables()
        self.register_buffer("reach", torch.from_numpy(ontology.descendant_matrix()), persistent=False)
        self.register_buffer("targets", torch.from_numpy(targets), persistent=False)
        self.register_buffer("known", torch.from_numpy(known), persistent=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Hierarchy-coherent probabilities `[B, n]`: no child above its parent."""
        return _max_constraint(torch.sigmoid(logits.float()), self.reach)

    def loss(self, logits: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hierarchical BCE per sample.

        Args:
            logits: `[B, n]`.
            label: `[B]` node index of each sample's deepest label, -1 for no label.

        Returns:
            `(loss [B], labelled [B] bool)`; unlabelled samples have loss 0.
        """
        labelled = label >= 0
        row = torch.where(labelled, label, torch.full_like(label, self.targets.shape[0] - 1))
        y, known = self.targets[row], self.known[row]  # [B, n]
        with torch.autocast(device_type=logits.device.type, enabled=False):
            h = torch.sigmoid(logits.float())
            out = (1 - y) * _max_constraint(h, self.reach) + y * _max_constraint(h * y, self.reach)
            bce = F.binary_cross_entropy(out.clamp(1e-7, 1 - 1e-7), y, reduction="none")
            per_sample = (bce * known).sum(1) / known.sum(1).clamp(min=1.0)
        return per_sample, labelled
