"""The site's privacy ledger: every DP round a dataset took part in, and the epsilon it has spent in its lifetime.

It lives in the site's state folder (`privacy/ledger.json` and `privacy/ledger.key`) and outlives runs,
processes and restarts. Each round is recorded (written to a temporary file, fsynced, renamed) before
it trains, so a crash can waste budget but never hide it. The file carries an HMAC under a key made
at the first use; a ledger that was edited, or deleted while its key remains, makes the site refuse to
train instead of starting again from zero. (Someone who deletes both, or restores an older copy of
both, can reset it: the ledger guards against accidents and casual edits, not the site's own root.)
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from echocare_core.data.contract import load_spec, read_manifest
from echocare_core.files import write_atomic
from echocare_core.privacy.dp import epsilon
from echocare_core.privacy.settings import BudgetExceeded, LedgerError

__all__ = ["BudgetExceeded", "LedgerError", "PrivacyLedger", "Spend", "dataset_fingerprint"]


@dataclass(frozen=True)
class Spend:
    """One round of DP training on a dataset."""

    job: str  # the job's hash
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon: float  # the dataset's total after this round (PRV accountant)
    delta: float
    time: float


def dataset_fingerprint(folder: str | Path) -> str:
    """SHA-256 of the dataset's name and its sorted image list: the key of its budget."""
    _, rows = read_manifest(folder)
    text = json.dumps([load_spec(folder).name, sorted(r["image"] for r in rows)])
    return hashlib.sha256(text.encode()).hexdigest()


def _write_synced(path: Path, data: bytes, mode: int = 0o600) -> None:
    write_atomic(path, data, mode=mode, durable=True)


class PrivacyLedger:
    """Spends per dataset fingerprint, and the budget this site allows each dataset.

    Args:
        folder: where the ledger lives (the site's `state_dir/privacy`).
        budget: the most epsilon any dataset may spend in its lifetime (0: no cap, spends are still recorded).
        delta: the delta every epsilon is reported at; jobs asking for a larger delta are refused.

    Raises:
        LedgerError: the ledger was edited, or deleted while its key remains.
    """

    def __init__(self, folder: str | Path, budget: float = 0.0, delta: float = 1e-5) -> None:
        self.folder, self.budget, self.delta = Path(folder), budget, delta
        self.path, self.key_path = self.folder / "ledger.json", self.folder / "ledger.key"
        self.folder.mkdir(parents=True, exist_ok=True)
        if not self.key_path.exists() and not self.path.exists():  # first use at this site
            _write_synced(self.key_path, secrets.token_hex(32).encode())
            self._save({})
        self.datasets = self._load()

    def _mac(self, datasets: dict[str, Any]) -> str:
        key = bytes.fromhex(self.key_path.read_text().strip())
        return hmac.new(key, json.dumps(datasets, sort_keys=True).encode(), hashlib.sha256).hexdigest()

    def _load(self) -> dict[str, list[dict[str, Any]]]:
        if not self.key_path.exists():
            raise LedgerError(
                f"{self.key_path} is missing but the ledger exists: its spends cannot be checked; "
                f"restore the key from the site's backup"
            )
        if not self.path.exists():
            raise LedgerError(
                f"{self.path} is missing but its key exists: the privacy already spent is unknown; "
                f"restore the ledger from the site's backup (the site will not train without it)"
            )
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            ok = hmac.compare_digest(data["mac"], self._mac(data["datasets"]))
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise LedgerError(
                f"{self.path} does not match its key (edited or damaged): the privacy already spent "
                f"is unknown; restore it from the site's backup (the site will not train without it)"
            )
        return data["datasets"]

    def _save(self, datasets: dict[str, list[dict[str, Any]]]) -> None:
        text = json.dumps({"version": 1, "datasets": datasets, "mac": self._mac(datasets)}, indent=1, sort_keys=True)
        _write_synced(self.path, text.encode())

    def spends(self, dataset: str) -> list[Spend]:
        return [Spend(**s) for s in self.datasets.get(dataset, [])]

    def spent(self, dataset: str) -> float:
        """Epsilon the dataset has spent so far (at the ledger's delta)."""
        return epsilon([(s.noise_multiplier, s.sample_rate, s.steps) for s in self.spends(dataset)], self.delta)

    def epsilon_after(self, dataset: str, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Epsilon the dataset would have spent after one more round of `steps` steps."""
        history = [(s.noise_multiplier, s.sample_rate, s.steps) for s in self.spends(dataset)]
        return epsilon([*history, (noise_multiplier, sample_rate, steps)], self.delta)

    def record(
        self, dataset: str, job: str, server_round: int, noise_multiplier: float, sample_rate: float, steps: int
    ) -> Spend:
        """Record a round before it trains (synced to disk on return).

        Raises:
            BudgetExceeded: the round would take the dataset past the budget.
        """
        with open(self.folder / "ledger.lock", "w") as lock:  # echocare-client and echocare-finetune may share it
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.datasets = self._load()  # what another process recorded meanwhile counts too
            total = self.epsilon_after(dataset, noise_multiplier, sample_rate, steps)
            if self.budget and total > self.budget:
                raise BudgetExceeded(
                    f"privacy budget: this round would bring the dataset's epsilon to {total:.3f}, "
                    f"above the site's budget {self.budget:g} (spent so far {self.spent(dataset):.3f})"
                )
            spend = Spend(job, server_round, noise_multiplier, sample_rate, steps, total, self.delta, time.time())
            datasets = {**self.datasets, dataset: [*self.datasets.get(dataset, []), asdict(spend)]}
            self._save(datasets)
            self.datasets = datasets
        return spend
