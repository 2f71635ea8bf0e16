"""Self-describing checkpoints and the one loading path for foreign weights.

A checkpoint is a folder written atomically (temp folder, then rename):

    step_000100/
      model.safetensors        weights; its header also carries the JSON metadata
      meta.json                format version, toolkit version, model config, ontology, input spec, step, metrics
      train_state.safetensors  optimizer/scheduler tensors (resume only)
      train_state.json         the rest of the training state, tensors replaced by references

Nothing here unpickles anything: safetensors and JSON only. Weights from elsewhere (the EchoCare release, MONAI
checkpoints) come in through `echocare_core.weights`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from echocare_core import __version__
from echocare_core.config import from_dict
from echocare_core.data.ontology import Ontology
from echocare_core.files import fsync
from echocare_core.models.pretrain import EchoCarePretrainModel
from echocare_core.models.swin import EncoderConfig
from echocare_core.tasks.model import EchoCareTaskModel, TaskMeta

__all__ = [
    "FORMAT_VERSION",
    "MODEL_FILE",
    "CheckpointFormatError",
    "save_checkpoint",
    "read_meta",
    "load_weights",
    "load_train_state",
    "latest_checkpoint",
    "checkpoints_newest_first",
    "prune_checkpoints",
    "same_architecture",
    "build_from_checkpoint",
    "load_task_model",
    "unwrap",
    "fsync",
]

FORMAT_VERSION = 2  # 2: EchoCare's released encoder layout (MONAI's SwinTransformer v2); 1: the former timm-style Swin
MODEL_FILE, META_FILE = "model.safetensors", "meta.json"
STATE_FILE, STATE_JSON = "train_state.safetensors", "train_state.json"
_NUMBERED = re.compile(r"^(step|round)_(\d+)$")  # pretraining steps, federated rounds


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP, torch.compile and Opacus wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None) or getattr(model, "_module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON skeleton of `obj` with tensors moved into `tensors` (dict keys may be ints)."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _flatten(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _unflatten(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict) and "__dict__" in obj:
        return {k: _unflatten(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def save_checkpoint(
    directory: str | os.PathLike, model: nn.Module, meta: dict[str, Any], train_state: dict[str, Any] | None = None
) -> Path:
    """Write a checkpoint folder atomically; an existing folder of that name is replaced.

    Args:
        directory: the checkpoint folder to create, e.g. `run/checkpoints/step_000100`.
        model: the model (wrappers are removed first).
        meta: JSON-able description: model config, ontology, step, metrics, ...
        train_state: optimizer/scheduler/progress state for resuming; tensors allowed anywhere.

    Returns:
        The folder.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    meta = {
        "format_version": FORMAT_VERSION,
        "toolkit_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **meta,
    }
    text = json.dumps(meta, indent=2, sort_keys=True)
    state = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    save_file(state, str(tmp / MODEL_FILE), metadata={"echocare": text})
    if train_state is not None:
        tensors: dict[str, torch.Tensor] = {}
        skeleton = _flatten(train_state, "s", tensors)
        save_file(tensors, str(tmp / STATE_FILE))
        (tmp / STATE_JSON).write_text(json.dumps(skeleton), encoding="utf-8")
    (tmp / META_FILE).write_text(text, encoding="utf-8")
    for item in [*tmp.iterdir(), tmp]:  # on disk before the rename makes the checkpoint visible
        fsync(item)
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, directory)
    fsync(directory.parent)
    return directory


def _model_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    file = path / MODEL_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (expected a checkpoint folder or a .safetensors file)")
    return file


class CheckpointFormatError(ValueError):
    """A checkpoint of another format than this toolkit's: never skipped over as if it were damaged."""


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """Metadata of a checkpoint folder or of a bare `model.safetensors` (its header carries it).

    Raises:
        FileNotFoundError: nothing there.
        ValueError: the file is not an EchoCare checkpoint.
        CheckpointFormatError: the checkpoint is of another format (newer, or the former encoder layout).
    """
    file = _model_file(path)
    with _readable(file), safe_open(str(file), framework="pt") as f:
        text = (f.metadata() or {}).get("echocare")
    if text is None:
        raise ValueError(
            f"{file} has no EchoCare metadata; load encoder weights with echocare_core.weights.load_encoder_weights()"
        )
    meta = json.loads(text)
    version = meta.get("format_version", 0)
    if version > FORMAT_VERSION:
        raise CheckpointFormatError(
            f"{file} has checkpoint format {version}; this toolkit ({__version__}) reads up to "
            f"{FORMAT_VERSION}: upgrade echocare"
        )
    if version < FORMAT_VERSION:
        raise CheckpointFormatError(
            f"{file} was written by echocare {meta.get('toolkit_version', '?')} with the former Swin layout (checkpoint "
            f"format {version}); this toolkit's encoder is EchoCare's released one (format {FORMAT_VERSION}) and cannot "
            f"read it: train again from the EchoCare release (model.init) or a checkpoint of this version, in a new "
            f"output folder"
        )
    return meta


@contextlib.contextmanager
def _readable(file: Path) -> Iterator[None]:
    """Turn safetensors' own error (a truncated or foreign file) into a ValueError naming the file."""
    try:
        yield
    except (SafetensorError, json.JSONDecodeError) as exc:
        raise ValueError(f"{file} is not a readable checkpoint file ({exc})") from None


def load_weights(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint folder or `.safetensors` file.

    Raises:
        FileNotFoundError: nothing there.
        ValueError: the file is cut short or not safetensors.
    """
    file = _model_file(path)
    with _readable(file):
        return load_file(str(file), device=str(device))


def load_train_state(directory: str | os.PathLike) -> dict[str, Any]:
    """The resume state saved with a checkpoint (tensors on the CPU).

    Raises:
        FileNotFoundError: the checkpoint was saved without training state.
    """
    directory = Path(directory)
    if not (directory / STATE_JSON).is_file():
        raise FileNotFoundError(f"{directory} holds no training state (it is a weights-only checkpoint)")
    with _readable(directory / STATE_FILE):
        tensors = load_file(str(directory / STATE_FILE))
        return _unflatten(json.loads((directory / STATE_JSON).read_text("utf-8")), tensors)


def checkpoints_newest_first(root: str | os.PathLike, kind: str = "step") -> list[Path]:
    """The complete `step_N` (or `round_N`) folders under `root`, highest N first."""
    root = Path(root)
    found = (
        [
            (int(m.group(2)), p)
            for p in root.glob(f"{kind}_*")
            if (m := _NUMBERED.match(p.name)) and (p / META_FILE).is_file()
        ]
        if root.is_dir()
        else []
    )
    return [p for _, p in sorted(found, reverse=True)]


def latest_checkpoint(root: str | os.PathLike, kind: str = "step") -> Path | None:
    """The complete `step_N` (or `round_N`) folder with the highest N under `root`, or None."""
    found = checkpoints_newest_first(root, kind)
    return found[0] if found else None


def prune_checkpoints(root: str | os.PathLike, keep_last: int, kind: str = "step") -> None:
    """Delete all but the newest `keep_last` `step_N` (or `round_N`) folders (and stale temp folders)."""
    root = Path(root)
    steps = sorted((int(m.group(2)), p) for p in root.glob(f"{kind}_*") if (m := _NUMBERED.match(p.name)))
    for _, p in steps[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    for p in [*root.glob(f".{kind}_*.tmp-*"), *root.glob(f".{kind}_*.old-*")]:
        shutil.rmtree(p, ignore_errors=True)


def build_from_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model a checkpoint describes and load its weights, from the checkpoint alone.

    Raises:
        ValueError: the checkpoint describes a model kind this toolkit version cannot build.
    """
    meta = read_meta(path)
    kind = meta.get("model_kind")
    cfg = from_dict(EncoderConfig, meta.get("encoder", {}), "encoder")
    if kind == "pretrain":
        model: nn.Module = EchoCarePretrainModel(cfg, Ontology.from_tree(meta["ontology"], f"{path} ontology"))
    elif kind == TaskMeta.KIND:
        model = TaskMeta.parse(meta, f"{path} meta.json").build()
    elif kind == "shared_encoder":
        raise ValueError(
            f"{path} is a multi-task federation's shared encoder (model_kind 'shared_encoder'), without "
            f"heads: each site makes its own model from it with echocare-client model --config "
            f"site.yaml --checkpoint {path} --out DIR"
        )
    else:
        raise ValueError(f"{path}: model_kind {kind!r} is not buildable here (known: 'pretrain', 'task')")
    model.load_state_dict(load_weights(path), strict=True)
    return model.to(device), meta


def load_task_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[EchoCareTaskModel, TaskMeta]:
    """A fine-tuned checkpoint's model, with its weights, and its typed metadata.

    Raises:
        ValueError: not a fine-tuned checkpoint (a pretraining checkpoint, a shared encoder).
    """
    if read_meta(path).get("model_kind") == "pretrain":
        raise ValueError(
            f"{path} is a pretraining checkpoint, not a fine-tuned one (echocare-finetune writes them to OUTPUT/best)"
        )
    model, meta = build_from_checkpoint(path, device)  # a shared encoder is refused with how to make a site's model
    return model, TaskMeta.parse(meta, f"{path} meta.json")


RUNTIME_ONLY = ("grad_checkpointing", "fused_attn")  # how the encoder runs, not what it is


def same_architecture(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two stored encoder configs describe the same weights (runtime switches aside)."""
    return {k: v for k, v in a.items() if k not in RUNTIME_ONLY} == {
        k: v for k, v in b.items() if k not in RUNTIME_ONLY
    }
