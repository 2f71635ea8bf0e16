"""Encoder weights in and out: the one loading path, and the way back to the EchoCare release layout.

`load_encoder_weights` reads the EchoCare release `.pth` (MONAI's `SwinTransformer(spatial_dims=2, use_v2=True)`
state dict with `mask_token`), MONAI SwinUNETR checkpoints (`swinViT.`) and the toolkit's own checkpoints
(`encoder.`, LoRA adapters merged), through one filter (`filter_state_dict`); any tensor that does not fit
stops the load unless partial loading is asked for. `.pth` files are read with `torch.load(weights_only=True)`:
a file with pickled code in it is refused. `export_release` writes any toolkit checkpoint's encoder back in the
release layout; `weights_digest` names weights files in federation jobs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from echocare_core.checkpoint import MODEL_FILE, CheckpointFormatError, load_weights, read_meta
from echocare_core.config import from_dict
from echocare_core.files import write_atomic
from echocare_core.models.swin import EncoderConfig, SwinEncoder

__all__ = [
    "LoadReport",
    "WeightsMismatch",
    "export_release",
    "filter_state_dict",
    "load_encoder_weights",
    "merged_encoder",
    "weights_digest",
]

log = logging.getLogger(__name__)
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_module.")  # DDP, torch.compile, Opacus
ENCODER_PREFIXES = ("swinViT.", "encoder.")  # MONAI SwinUNETR; the toolkit's models and SimMIM


def weights_digest(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a weights file, or of a checkpoint folder's `model.safetensors`: how a federation job
    names the weights its encoder starts from.

    Raises:
        FileNotFoundError: nothing there.
    """
    path = Path(path)
    file = path / MODEL_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"weights not found: {path}")
    h = hashlib.sha256()
    with file.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class WeightsMismatch(ValueError):
    """Weights that fit the encoder only in part, loaded without the user asking for partial loading."""


@dataclass
class LoadReport:
    """What an encoder-weights load found: tensors that fit, that the encoder lacks or has of another shape."""

    total: int = 0  # the encoder's tensors
    matched: int = 0
    missing: list[str] = field(default_factory=list)  # encoder tensors the file does not have
    unexpected: list[str] = field(default_factory=list)  # encoder-part tensors the encoder does not have
    reshaped: list[str] = field(default_factory=list)  # "key: file shape, encoder shape"
    adapted: list[str] = field(default_factory=list)  # exact adaptations (3 colour channels summed to 1)
    other: list[str] = field(default_factory=list)  # tensors of other parts (heads, decoders), not loaded
    mask_token: torch.Tensor | None = None  # MIM's learned mask embedding, when the file has one

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.reshaped)

    def summary(self) -> str:
        parts = [f"{self.matched} of the encoder's {self.total} tensors loaded"]
        for items, what in (
            (self.missing, "missing"),
            (self.unexpected, "unexpected"),
            (self.reshaped, "of another shape"),
        ):
            if items:
                parts.append(f"{len(items)} {what} (first: {', '.join(items[:3])})")
        if self.adapted:
            parts.append(f"adapted {', '.join(self.adapted)}")
        if self.other:
            parts.append(f"{len(self.other)} tensors of other parts not loaded")
        return "; ".join(parts)


def _read_foreign(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise FileNotFoundError(f"weights not found: {path}")
    if path.is_dir() or path.suffix == ".safetensors":  # a toolkit checkpoint: its encoder, adapters merged
        weights = load_weights(path)
        try:
            meta = read_meta(path)
        except CheckpointFormatError:
            raise
        except ValueError:  # safetensors without the toolkit's metadata
            return weights
        return merged_encoder(weights, _lora_scale(meta))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # what weights_only=True raises for anything beyond tensors and containers
        raise ValueError(
            f"{path} holds pickled code or objects, not only tensors; EchoCare FL never runs code "
            f"from a weights file: ask for a plain state dict (torch.save(model.state_dict())) or "
            f"safetensors"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:  # zip central directory missing, file ends early
        raise ValueError(
            f"{path} is cut short or damaged ({str(exc).splitlines()[0][:120]}): copy it again and "
            f"compare its SHA-256 with the published one"
        ) from None
    for key in ("model", "state_dict", "module"):  # training scripts nest the weights
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a mapping of parameter names to tensors, found {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _encoder_part(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The encoder's tensors under their own names, and the names of everything else.

    Wrapper prefixes go first (DDP `module.`, `torch.compile` `_orig_mod.`, Opacus `_module.`, in any order);
    then the encoder is what sits under MONAI SwinUNETR's `swinViT.` or the toolkit's and SimMIM's `encoder.`,
    or the whole file (the EchoCare release, MONAI's `SwinTransformer`).
    """
    items = dict(state)
    while prefix := next((p for p in WRAPPER_PREFIXES if items and all(k.startswith(p) for k in items)), None):
        items = {k[len(prefix) :]: v for k, v in items.items()}
    for prefix in ENCODER_PREFIXES:
        if any(k.startswith(prefix) for k in items):
            return (
                {k[len(prefix) :]: v for k, v in items.items() if k.startswith(prefix)},
                [k for k in items if not k.startswith(prefix)],
            )
    return items, []


def filter_state_dict(
    state: Mapping[str, torch.Tensor], encoder: SwinEncoder
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Map a state dict onto `encoder`'s names and shapes (pure: the encoder is not changed).

    Reads the EchoCare release (MONAI `SwinTransformer(spatial_dims=2, use_v2=True)`, with its `mask_token`),
    MONAI SwinUNETR checkpoints (`swinViT.`), and the toolkit's own checkpoints (`encoder.`), under any wrapper
    prefix. The only adaptation is exact: 3-channel patch weights summed for a 1-channel encoder (a gray image is
    R = G = B), spread evenly the other way.
    """
    items, other = _encoder_part(state)
    report = LoadReport(other=[k for k in other if k.rsplit(".", 1)[-1] != "mask_token"])
    token = next((v for k, v in [*state.items(), *items.items()] if k.rsplit(".", 1)[-1] == "mask_token"), None)
    if token is not None and token.numel() == encoder.embed_dim:
        report.mask_token = token.reshape(-1)
    # LoRA adapters are the fine-tuning's own: they start anew and are never in a pretrained file
    target = {k: v for k, v in encoder.state_dict().items() if ".lora_" not in k}
    out: dict[str, torch.Tensor] = {}
    for key, value in items.items():
        if key == "mask_token":
            continue
        if key not in target:
            report.unexpected.append(key)
            continue
        want = target[key].shape
        if (
            key == "patch_embed.proj.weight"
            and value.ndim == 4
            and value.shape[1] != want[1]
            and value.shape[2:] == want[2:]
            and {value.shape[1], want[1]} == {1, 3}
        ):
            value = value.sum(1, keepdim=True) if want[1] == 1 else value.repeat(1, 3, 1, 1) / 3
            report.adapted.append(f"{key} ({items[key].shape[1]} -> {want[1]} channels)")
        if value.shape != want:
            report.reshaped.append(f"{key}: file {tuple(value.shape)}, encoder {tuple(want)}")
            continue
        out[key] = value.to(target[key].dtype)
    report.total, report.matched = len(target), len(out)
    report.missing = [k for k in target if k not in items]
    return out, report


def load_encoder_weights(
    encoder: SwinEncoder, source: str | os.PathLike | Mapping[str, torch.Tensor], partial: bool = False
) -> LoadReport:
    """Load encoder weights through `filter_state_dict`; all of them, unless `partial` is asked for.

    Args:
        encoder: the target encoder.
        source: the EchoCare release `.pth`, a MONAI SwinUNETR checkpoint, a toolkit checkpoint folder or
            `.safetensors`, or a state dict.
        partial: load what fits and leave the rest as it is (the user asked for it explicitly).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file holds code, is damaged, or holds no tensor of this encoder.
        WeightsMismatch: an encoder tensor is missing, unexpected or of another shape, and `partial` is off.
    """
    name = "the state dict" if isinstance(source, Mapping) else str(source)
    state = dict(source) if isinstance(source, Mapping) else _read_foreign(Path(source))
    filtered, report = filter_state_dict(state, encoder)
    cfg = encoder.cfg
    if not filtered:
        raise ValueError(
            f"{name} holds no weights of an EchoCare (MONAI SwinTransformer v2) encoder: none of its "
            f"{len(state)} tensors fits variant '{cfg.variant}' (e.g. {sorted(state)[:3]})"
        )
    if not report.complete and not partial:
        raise WeightsMismatch(
            f"{name} does not fit the encoder (variant '{cfg.variant}', {cfg.in_chans} channels, patch "
            f"{cfg.patch_size}, window {cfg.window_size}): {report.summary()}. Pick the encoder settings the "
            f"weights were made with, or set init_partial: true to load only the tensors that fit"
        )
    encoder.load_state_dict(filtered, strict=False)
    (log.warning if not report.complete else log.info)("encoder weights from %s: %s", name, report.summary())
    return report


def _lora_scale(meta: Mapping[str, Any]) -> float:
    ft = meta.get("finetune", {})
    return ft["lora_alpha"] / ft["lora_rank"] if ft.get("mode") == "lora" else 0.0


def merged_encoder(state: Mapping[str, torch.Tensor], lora_scale: float = 0.0) -> dict[str, torch.Tensor]:
    """The encoder of a toolkit state dict under MONAI's names, LoRA adapters merged into the weights they
    adapt (`W + lora_scale * B A`, what the adapted layer computes), with `mask_token` when it has one."""
    encoder, _ = _encoder_part(state)
    out = {k: v.detach().cpu().clone() for k, v in encoder.items() if ".lora_" not in k}
    for key in [k for k in encoder if k.endswith(".lora_A.weight")]:
        base = key[: -len(".lora_A.weight")]
        delta = encoder[f"{base}.lora_B.weight"].double() @ encoder[key].double()
        out[f"{base}.weight"] = (out[f"{base}.weight"].double() + lora_scale * delta).to(out[f"{base}.weight"].dtype)
    if "mask_token" in state:
        out["mask_token"] = state["mask_token"].detach().cpu().clone()
    return out


def export_release(checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write a checkpoint's encoder as a `.pth` state dict in the EchoCare release layout, atomically: the keys
    of MONAI's `SwinTransformer(spatial_dims=2, use_v2=True)`, LoRA merged (`merged_encoder`), plus `mask_token`
    `[1, 1, embed_dim]` (the pretraining model's, zeros for a fine-tuned one). `torch.load` it and pop
    `mask_token` to load it into MONAI's class with `strict=True`, as the authors load the release.

    Raises:
        FileNotFoundError: no checkpoint there.
        ValueError: the checkpoint is not the toolkit's, or its encoder does not come out whole.
    """
    meta, out = read_meta(checkpoint), Path(out)
    state = merged_encoder(load_weights(checkpoint), _lora_scale(meta))
    encoder = SwinEncoder(from_dict(EncoderConfig, meta["encoder"], "encoder"))
    state["mask_token"] = state.get("mask_token", torch.zeros(encoder.embed_dim)).reshape(1, 1, -1)
    try:  # the layout check: exactly the encoder's tensors
        encoder.load_state_dict({k: v for k, v in state.items() if k != "mask_token"}, strict=True)
    except RuntimeError as exc:
        raise ValueError(
            f"{checkpoint}: its encoder does not come out in the release layout ({str(exc).splitlines()[0]})"
        ) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(out, lambda tmp: torch.save(state, tmp), durable=True)
