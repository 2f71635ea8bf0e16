"""Image-quality measures of enhanced images that need a reference network, from maintained packages, with that
network's weights read from a local file: nothing downloads at run time (sites are offline).

- FID: torchmetrics' `FrechetInceptionDistance` (torch-fidelity's Inception-v3, 2048 features) between the
  enhanced images and their high-quality targets; weights file `weights-inception-2015-12-05-6726825d.pth`
  from the torch-fidelity releases.
- BRISQUE (no reference, lower is better): `piq.brisque`, whose SVM weights file is
  `brisque_svm_weights.pt` from the piq releases.

PSNR and SSIM need no weights (`echocare_core.engine.metrics.enhancement_metrics`). NIQE and PIQE are not
provided: the one maintained implementation (pyiqa) is licensed for non-commercial use only.
"""

from __future__ import annotations

import pickle
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["QualityWeights", "quality_metrics"]

_HUB = threading.Lock()  # torch.hub's folder is process-wide


@dataclass(frozen=True)
class QualityWeights:
    fid: str = ""  # torch-fidelity's Inception-v3 weights (weights-inception-2015-12-05-6726825d.pth); "": no FID
    brisque: str = ""  # piq's BRISQUE SVM (brisque_svm_weights.pt); "": no BRISQUE

    def check(self) -> None:
        """Raises FileNotFoundError naming the key and the file when a configured weights file is absent."""
        for key, path in (("fid", self.fid), ("brisque", self.brisque)):
            if path and not Path(path).is_file():
                raise FileNotFoundError(f"quality weights {key}: {path} is not a file (nothing is downloaded at run "
                                        f"time: copy the file there, or leave {key} empty to skip the metric)")


def _rgb(images: torch.Tensor) -> torch.Tensor:
    return images.float().clamp(0, 1).expand(-1, 3, -1, -1) if images.shape[1] == 1 else images.float().clamp(0, 1)


def _fid(pred: torch.Tensor, target: torch.Tensor, weights: str) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=weights)
    for start in range(0, len(pred), 32):
        fid.update(_rgb(target[start:start + 32]), real=True)
        fid.update(_rgb(pred[start:start + 32]), real=False)
    return float(fid.compute())


def _brisque(images: torch.Tensor, weights: str) -> float:
    """piq loads its SVM through torch.hub's cache; a private cache holding only the configured file keeps it
    from ever reaching for the network."""
    from piq import brisque

    with _HUB, tempfile.TemporaryDirectory(prefix="echocare_brisque_") as cache:
        (Path(cache) / "checkpoints").mkdir()
        shutil.copyfile(weights, Path(cache) / "checkpoints" / "brisque_svm_weights.pt")
        hub = torch.hub.get_dir()
        torch.hub.set_dir(cache)
        try:
            return float(brisque(images.float().clamp(0, 1), data_range=1.0))
        finally:
            torch.hub.set_dir(hub)


def quality_metrics(pred: torch.Tensor, target: torch.Tensor, weights: QualityWeights) -> dict[str, float]:
    """FID (enhanced vs target images) and BRISQUE (of the enhanced images), each when its weights are configured.

    Args:
        pred, target: `[N, C, H, W]` in [0, 1]. FID needs N >= 2 and is biased upwards for a few dozen images
            (2048 features): compare FIDs of equal N only.

    Raises:
        FileNotFoundError: a configured weights file is absent.
        ValueError: too few images for FID, or a weights file that does not load.
    """
    weights.check()
    if weights.fid and len(pred) < 2:
        raise ValueError(f"FID needs at least 2 images, got {len(pred)}")
    out = {}
    for key, path, measure in (("fid", weights.fid, lambda: _fid(pred, target, weights.fid)),
                               ("brisque", weights.brisque, lambda: _brisque(pred, weights.brisque))):
        if not path:
            continue
        try:
            out[key] = measure()
        except (RuntimeError, KeyError, EOFError, ValueError, pickle.UnpicklingError) as exc:  # not its file
            raise ValueError(f"quality weights {key}: {path} does not load as expected ({type(exc).__name__}: "
                             f"{str(exc)[:200]})") from exc
    return out
