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


def _max_logit(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """`out[b, i] = max over allowed j of logits[b, j]` (`allowed` `[n, n]` or `[B, n, n]`), -inf if none.

    The max constraint works on logits: sigmoid is monotone, so the max of the probabilities is the
    sigmoid of the max logit, and the loss can use the numerically safe BCE-with-logits.
    """
    return logits.unsqueeze(-2).masked_fill(~allowed, float("-inf")).amax(dim=-1)


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
        return torch.sigmoid(_max_logit(logits.float(), self.reach.bool()))

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
            z = logits.float()
            reach = self.reach.bool()
            # a negative class takes the max over its whole subtree; a positive one only over its
            # positive subtree, so a wrong sibling's score is not credited to the true parent (C-HMCNN)
            positive_reach = reach.unsqueeze(0) & y.bool().unsqueeze(1)  # [B, n, n]
            out = torch.where(y.bool(), _max_logit(z, positive_reach), _max_logit(z, reach))
            bce = F.binary_cross_entropy_with_logits(out, y, reduction="none")
            per_sample = (bce * known).sum(1) / known.sum(1).clamp(min=1.0)
        return per_sample, labelled
