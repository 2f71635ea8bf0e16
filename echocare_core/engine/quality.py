"""Image-quality measures of enhanced images. Those that need reference data read it from a local file named in
`QualityWeights`: nothing downloads at run time (sites are offline).

- FID: torchmetrics' `FrechetInceptionDistance` (torch-fidelity's Inception-v3, 2048 features) between the
  enhanced images and their high-quality targets; weights file `weights-inception-2015-12-05-6726825d.pth`
  from the torch-fidelity releases.
- BRISQUE (no reference, lower is better): `piq.brisque`, whose SVM weights file is
  `brisque_svm_weights.pt` from the piq releases.
- NIQE (no reference, lower is better): written here (`echocare_core.engine.nr_quality`, after Mittal et al. 2013
  and the authors' MATLAB code; within 1e-5 of BasicSR's port), against a pristine model read from a local
  .npz / .mat: BasicSR's `niqe_pris_params.npz`, the MATLAB release's `modelparameters.mat`, or one fitted on a
  site's own high-quality images with `nr_quality.fit_niqe_params` (ultrasound is far from the natural images of
  the published model).
- PIQE (no reference, lower is better, 0-100): written here (`nr_quality`, after Venkatanath et al. 2015 and
  MATLAB's `piqe`); it needs no data, so it is always computed.

No package is used for NIQE and PIQE: pyiqa, which has both, is licensed for non-commercial use only, and the
others are unmaintained, heavy or broken on current numpy/scipy (`nr_quality` says which). PSNR and SSIM need no
weights (`echocare_core.tasks.enhancement.enhancement_metrics`).
"""

from __future__ import annotations

import pickle
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from echocare_core.engine.nr_quality import load_niqe_params, niqe, piqe

__all__ = ["QualityWeights", "quality_metrics"]

_HUB = threading.Lock()  # torch.hub's folder is process-wide


@dataclass(frozen=True)
class QualityWeights:
    fid: str = ""  # torch-fidelity's Inception-v3 weights (weights-inception-2015-12-05-6726825d.pth); "": no FID
    brisque: str = ""  # piq's BRISQUE SVM (brisque_svm_weights.pt); "": no BRISQUE
    niqe: str = ""  # NIQE's pristine model (.npz with mu_pris_param / cov_pris_param, or .mat); "": no NIQE

    def configured(self) -> list[str]:
        """Keys of the metrics whose files are set."""
        return [key for key in ("fid", "brisque", "niqe") if getattr(self, key)]

    def check(self) -> None:
        """Raises FileNotFoundError naming the key and the file when a configured weights file is absent."""
        for key, path in (("fid", self.fid), ("brisque", self.brisque), ("niqe", self.niqe)):
            if path and not Path(path).is_file():
                raise FileNotFoundError(
                    f"quality weights {key}: {path} is not a file (nothing is downloaded at run "
                    f"time: copy the file there, or leave {key} empty to skip the metric)"
                )


def _rgb(images: torch.Tensor) -> torch.Tensor:
    return images.float().clamp(0, 1).expand(-1, 3, -1, -1) if images.shape[1] == 1 else images.float().clamp(0, 1)


def _fid(pred: torch.Tensor, target: torch.Tensor, weights: str) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=weights)
    for start in range(0, len(pred), 32):
        fid.update(_rgb(target[start : start + 32]), real=True)
        fid.update(_rgb(pred[start : start + 32]), real=False)
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


def _loaded(key: str, path: str, measure: Callable[[], Any]) -> Any:
    """Runs `measure`, naming the key and the file when the file turns out not to be what the metric needs."""
    try:
        return measure()
    except (RuntimeError, KeyError, EOFError, ValueError, pickle.UnpicklingError) as exc:  # not its file
        raise ValueError(
            f"quality weights {key}: {path} does not load as expected ({type(exc).__name__}: {str(exc)[:200]})"
        ) from exc


def quality_metrics(pred: torch.Tensor, target: torch.Tensor, weights: QualityWeights) -> dict[str, float]:
    """PIQE of the enhanced images always; FID (enhanced vs target images), BRISQUE and NIQE (of the enhanced
    images) when their files are configured. NIQE and PIQE are means over the images.

    Args:
        pred, target: `[N, C, H, W]` in [0, 1]. FID needs N >= 2 and is biased upwards for a few dozen images
            (2048 features): compare FIDs of equal N only. NIQE needs two whole blocks of its model's size (96
            pixels for the published model) per image.

    Raises:
        FileNotFoundError: a configured weights file is absent.
        ValueError: too few images for FID, images too small for NIQE, or a weights file that does not load.
    """
    weights.check()
    if weights.fid and len(pred) < 2:
        raise ValueError(f"FID needs at least 2 images, got {len(pred)}")
    out = {}
    if weights.fid:
        out["fid"] = _loaded("fid", weights.fid, lambda: _fid(pred, target, weights.fid))
    if weights.brisque:
        out["brisque"] = _loaded("brisque", weights.brisque, lambda: _brisque(pred, weights.brisque))
    if weights.niqe:
        params = _loaded("niqe", weights.niqe, lambda: load_niqe_params(weights.niqe))
        out["niqe"] = float(np.nanmean(niqe(pred, params)))  # a flat image has no score
    out["piqe"] = float(piqe(pred).mean())
    return out
