"""Private training passes over a site's dataset, shared by a federated round and local fine-tuning.

Noise is calibrated once for the planned total of steps; each pass is recorded in the site's ledger
before it trains (so a crash can waste budget, never hide it) and draws its batches by Poisson
sampling from a generator no one else can predict.
"""

from __future__ import annotations

from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from echocare_core.privacy.dp import DPTraining, noise_multiplier, poisson_batches, secret_generator
from echocare_core.privacy.ledger import PrivacyLedger, Spend, dataset_fingerprint
from echocare_core.privacy.settings import DPSettings
from echocare_core.tasks.dataset import TaskDataset, collate_task

__all__ = ["PrivatePasses"]


class PrivatePasses:
    """A model trained with DP-SGD in passes of `steps` Poisson batches, each pass paid for in `ledger`.

    Args:
        total_steps: all the steps the job plans (every round or epoch): the noise keeps (epsilon, delta) for them.
        job: what the ledger records as the job (a job hash).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optimizer,
        settings: DPSettings,
        train_set: TaskDataset,
        batch_size: int,
        steps: int,
        total_steps: int,
        ledger: PrivacyLedger,
        job: str,
    ) -> None:
        self.train_set, self.steps, self.ledger, self.job = train_set, steps, ledger, job
        self.sample_rate = min(1.0, batch_size / len(train_set))
        self.sigma = noise_multiplier(settings, self.sample_rate, total_steps)
        self.dataset = dataset_fingerprint(train_set.folder)
        self.training = DPTraining(model, optimizer, settings, self.sigma, batch_size, train_set.images_per_sample)

    def next_pass(self, index: int, key: int, num_workers: int = 0) -> tuple[DataLoader, Spend]:
        """Record pass `index` (a round or an epoch) in the ledger, then give its Poisson batches.

        Args:
            key: the data key of this pass (seeds each sample's flip augmentation).

        Raises:
            BudgetExceeded: the pass would take the dataset past the site's budget (nothing was recorded).
        """
        spend = self.ledger.record(self.dataset, self.job, index, self.sigma, self.sample_rate, self.steps)
        n = len(self.train_set)
        batches = [[(key, i) for i in b] for b in poisson_batches(n, self.sample_rate, self.steps, secret_generator())]
        return DataLoader(
            self.train_set, batch_sampler=batches, collate_fn=collate_task, num_workers=num_workers
        ), spend
