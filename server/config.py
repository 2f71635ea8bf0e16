"""`federation.yaml`: the job the sites run, how many rounds, who must answer, and where results go."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from echocare_core.federation.coordinator import RoundSettings
from echocare_core.federation.job import Job, task_jobs
from echocare_core.federation.strategies import StrategyConfig
from echocare_core.tasks import get_task

__all__ = ["FederationConfig", "RoundSettings", "ServerSettings"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerSettings:
    host: str = (
        "127.0.0.1"  # the public address sites connect to (the Fleet-only proxy; the SuperLink stays on loopback)
    )
    port: int = 9092
    insecure: bool = False  # plain HTTP and no site keys: only on a trusted network or for the demo
    keys: str = ""  # an echocare-keys folder: ca.pem, server.pem, server.key and sites/NAME.pub
    allowed_sites: tuple[str, ...] = ()  # the sites that may connect, by the name of their key in keys/sites/

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"server.port={self.port}: choose 1-65535")
        if self.insecure:
            return
        if not self.keys or not self.allowed_sites:
            raise ValueError(
                "server.insecure is false: set server.keys to an echocare-keys folder and list "
                "server.allowed_sites (or insecure: true, on a trusted network or for the demo only)"
            )
        folder = Path(self.keys)
        missing = [
            str(f)
            for f in (
                folder / "ca.pem",
                folder / "server.pem",
                folder / "server.key",
                *(folder / "sites" / f"{n}.pub" for n in self.allowed_sites),
            )
            if not f.is_file()
        ]
        if missing:
            raise ValueError(
                f"server.keys: missing {', '.join(missing)}; make them with: echocare-keys --out "
                f"{self.keys} --server-name HOST --sites {' '.join(self.allowed_sites)}"
            )


@dataclass(frozen=True)
class FederationConfig:
    output: str = "runs/federation"  # checkpoints/round_N, metrics.jsonl, progress.jsonl, report.md, Flower's state
    init: str | None = None  # encoder for round 0: the EchoCare release .pth or a toolkit checkpoint; null = random
    init_partial: bool = False  # load only the tensors of `init` that fit (otherwise a mismatch stops the server)
    server: ServerSettings = field(default_factory=ServerSettings)
    rounds: RoundSettings = field(default_factory=RoundSettings)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    job: Job = field(default_factory=Job)

    def __post_init__(self) -> None:
        if (self.strategy.name == "fedprox") != (self.job.proximal_mu > 0):
            raise ValueError(
                f"strategy.name={self.strategy.name} with job.proximal_mu={self.job.proximal_mu}: "
                f"fedprox needs proximal_mu > 0, the other strategies need 0"
            )
        tasks = [j.task for j in task_jobs(self.job)]
        if "report" in tasks and not self.job.report.classifies:
            log.warning(
                "job.report has no findings (or findings_weight 0): the report model gets no findings "
                "classifier, and without one it learnt to write one report for every study in our benchmark "
                "(docs/benchmarks.md); list the findings the sites' reports state under job.report.findings"
            )
        if self.job.base and not self.init:
            raise ValueError(
                f"job.base={self.job.base} names base weights but init is empty: set init to the "
                f"weights file (the server computes job.base from it)"
            )
        if self.job.train.privacy.on and self.job.proximal_mu > 0:
            raise ValueError(
                f"job.train.privacy.epsilon={self.job.train.privacy.epsilon} with proximal_mu "
                f"{self.job.proximal_mu}: differential privacy does not support FedProx yet"
            )
        if (
            self.job.train.privacy.on
            and self.job.train.privacy.mode == "ghost"
            and any(get_task(t).sample_parts for t in tasks)
        ):
            parts = " or ".join(get_task(t).sample_parts for t in tasks if get_task(t).sample_parts)
            raise ValueError(
                f"job.train.privacy.mode ghost with task(s) {', '.join(tasks)}: ghost clipping keeps per-image "
                f"gradient norms, which do not add up to the norm of {parts}; use mode hooks"
            )
