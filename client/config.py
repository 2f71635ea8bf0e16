"""`site.yaml` for `echocare-client`: where the server is, the site's dataset, device, limits and state folder.

It imports nothing heavy: the ClientApp, a fresh process for every round, reads it too. `echocare-client` writes
the resolved config (absolute paths) to `state_dir/site.yaml`, and the SuperNode's node config names that file,
so the ClientApp and the site worker read the same typed settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from echocare_core.config import check_ranges
from echocare_core.federation.site_terms import SiteLimits
from echocare_core.privacy.settings import SitePrivacy

__all__ = ["SiteConfig"]


@dataclass(frozen=True)
class SiteConfig:
    name: str = ""  # how this site appears in the federation's tables and logs (no patient data)
    server: str = "127.0.0.1:9092"  # the coordinator's host:port
    insecure: bool = False  # plain HTTP and no site key: only on a trusted network or for the demo
    root_certificates: str = ""  # the federation's ca.pem, from the coordinator
    private_key: str = ""  # this site's private key (echocare-keys: sites/NAME.key; its .pub goes to the coordinator)
    data: str = ""  # the dataset folder (dataset.yaml + manifest.csv); checked before connecting
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_workers: int = 1  # DataLoader worker processes (as echocare-finetune's data.num_workers)
    split_seed: int = 0  # patient-grouped split when the manifest has no split column (as data.split_seed)
    state_dir: str = "echocare_site"  # Flower's state, site-local layers, a copy of everything sent, logs
    limits: SiteLimits = field(default_factory=SiteLimits)
    privacy: SitePrivacy = field(default_factory=SitePrivacy)
    base_weights: str = ""  # this site's copy of the weights federation jobs start from (e.g. the EchoCare release
    # .pth): a job whose base is this file's SHA-256 never sends the frozen part of its model here
    approved_jobs: tuple[str, ...] = ()  # job hashes the site runs (the server shows each job's); empty: any job
    # that fits the dataset, limits and privacy terms
    server_versions: tuple[str, ...] = ()  # coordinator toolkit versions accepted; empty: only this site's own
    max_restarts: int = 20  # restarts in a row of Flower's SuperNode when it exits on its own (e.g. the coordinator
    # is unreachable: its SuperNode stops trying to activate after about 4 s); waits 2, 4, ... 60 s between: ~17 min

    def __post_init__(self) -> None:
        if not self.name or not self.data:
            raise ValueError("name and data are required: the site's name and its dataset folder")
        if not self.insecure and not (self.root_certificates and self.private_key):
            raise ValueError(
                "insecure is false: set root_certificates (the federation's ca.pem) and private_key "
                "(this site's key from echocare-keys), or insecure: true on a trusted network or for "
                "the demo only"
            )
        for key in ("root_certificates", "private_key"):
            if not self.insecure and not Path(getattr(self, key)).is_file():
                raise ValueError(f"{key}: {getattr(self, key)} is not a file")
        if self.base_weights and not Path(self.base_weights).exists():
            raise ValueError(
                f"base_weights: {self.base_weights} does not exist (a weights file such as the EchoCare "
                f"release, or a checkpoint folder)"
            )
        check_ranges(
            self, {"max_restarts": (self.max_restarts >= 0, ">= 0"), "num_workers": (self.num_workers >= 0, ">= 0")}
        )
