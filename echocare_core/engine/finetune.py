"""Local fine-tuning of the encoder + a task head on one site's dataset (the local-only baseline).

Each epoch trains, validates, keeps the best checkpoint by the task's main metric (`best/`) and the
resume state (`last/`); the run ends by testing the best checkpoint on the test split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from echocare_core.checkpoint import load_train_state, load_weights, read_meta, same_architecture, save_checkpoint
from echocare_core.config import from_dict, save_config, to_dict
from echocare_core.data.contract import DatasetSpec
from echocare_core.data.text import ReportTokenizer
from echocare_core.engine.distributed import init_distributed
from echocare_core.engine.finetune_config import FinetuneConfig
from echocare_core.engine.run_report import read_metrics
from echocare_core.engine.training import (
    Recipe,
    check_dataset,
    device_batch,
    evaluate,
    num_classes,
    shuffled_keys,
    split_datasets,
    steps_per_epoch,
    target_stats,
    task_loader,
    train_epoch,
)
from echocare_core.files import write_atomic
from echocare_core.models.lora import apply_finetune_mode, count_trainable
from echocare_core.models.swin import EncoderConfig
from echocare_core.privacy.settings import BudgetExceeded
from echocare_core.tasks import get_task
from echocare_core.tasks.base import InputSpec, TaskHead
from echocare_core.tasks.dataset import TaskDataset, split_rows
from echocare_core.tasks.model import EchoCareTaskModel, FinetuneMode, TaskMeta
from echocare_core.weights import load_encoder_weights

__all__ = ["FinetuneResult", "build_task_model", "run_finetune", "tokenizer_for", "write_json", "write_json_lines"]

log = logging.getLogger(__name__)
EpochCallback = Callable[[int, int, dict[str, float]], None]


@dataclass
class FinetuneResult:
    status: str
    epoch: int
    best: dict[str, float]
    test: dict[str, float]
    trainable: int
    total: int
    output: Path
    skipped: int = 0
    history: list[dict] = field(default_factory=list)


def tokenizer_for(cfg: FinetuneConfig, spec: DatasetSpec) -> ReportTokenizer | None:
    """The report tokenizer of the config (byte-level unless `model.tokenizer` names a file); None for other tasks.

    Raises:
        FileNotFoundError, ValueError: the tokenizer file is absent or unusable.
    """
    if spec.task != "report":
        return None
    m = cfg.model
    return (
        ReportTokenizer.from_file(m.tokenizer, m.report.max_tokens)
        if m.tokenizer
        else ReportTokenizer(max_tokens=m.report.max_tokens)
    )


def _encoder_config(cfg: FinetuneConfig) -> EncoderConfig:
    """An EchoCare checkpoint brings its own encoder config; anything else uses `model.encoder`.

    Raises:
        FileNotFoundError: `model.init` names nothing that exists.
    """
    if cfg.model.init and not Path(cfg.model.init).exists():
        raise FileNotFoundError(
            f"model.init: nothing at {cfg.model.init} (the EchoCare release .pth, see the README's \"Start from "
            f'EchoCare", or a toolkit checkpoint; null: random weights)'
        )
    if cfg.model.init:
        try:
            return from_dict(EncoderConfig, read_meta(cfg.model.init)["encoder"], "encoder")
        except (ValueError, KeyError):  # foreign weights: no EchoCare metadata
            pass
    return cfg.model.encoder


def build_task_model(
    cfg: FinetuneConfig,
    spec: DatasetSpec,
    stats: tuple[float, float] = (0.0, 1.0),
    tokenizer: ReportTokenizer | None = None,
) -> EchoCareTaskModel:
    enc = _encoder_config(cfg)
    model = EchoCareTaskModel(
        enc,
        spec.task,
        num_classes(spec, tokenizer),
        cfg.model.feature_size,
        spec.multi_label,
        stats,
        cfg.model.report,
        cfg.model.decoder,
    )
    if cfg.model.init:
        load_encoder_weights(model.encoder, cfg.model.init, cfg.model.init_partial)
    apply_finetune_mode(model, cfg.train.mode, cfg.train.lora_rank, cfg.train.lora_alpha)
    return model


def _meta(
    cfg: FinetuneConfig,
    spec: DatasetSpec,
    model: EchoCareTaskModel,
    epoch: int,
    metrics: dict[str, float],
    tokenizer: ReportTokenizer | None,
) -> TaskMeta:
    enc, report = model.encoder.cfg, tokenizer is not None
    return TaskMeta(
        task=spec.task,
        encoder=enc,
        head=TaskHead(
            num_classes=num_classes(spec, tokenizer),
            feature_size=cfg.model.feature_size,
            decoder=cfg.model.decoder,
            multi_label=spec.multi_label,
            classes=spec.classes,
            labels={str(k): v for k, v in spec.labels.items()},
            landmark_names=spec.landmark_names,
            target_name=spec.target_name,
            target_stats=model.target_stats,
            report=cfg.model.report if report else None,
            tokenizer=tokenizer.to_str() if report else "",
            findings=spec.findings if report else (),
            beam=cfg.model.beam,
        ),
        finetune=FinetuneMode(cfg.train.mode, cfg.train.lora_rank, cfg.train.lora_alpha),
        input=InputSpec(**enc.input_spec, frames=cfg.model.frames),
        epoch=epoch,
        metrics=metrics,
        dataset=spec.name,
        config=to_dict(cfg),
    )


def _same_weights(head: TaskHead) -> TaskHead:
    """The head without the settings that leave its weights alone (beam, findings' phrases and loss weight where the
    head has no findings classifier)."""
    r = head.report
    if r is not None:
        r = replace(r, findings_weight=1.0, findings=r.findings if r.classifies else ())
    return replace(head, beam=1, findings=(), report=r)


def _resume(
    cfg: FinetuneConfig, out: Path, model: EchoCareTaskModel, head: TaskHead, recipe: Recipe, device: torch.device
) -> dict[str, Any]:
    """Training state of `out/last`, loaded into model and optimizer; empty when starting afresh."""
    last = out / "last"
    if not (last / "meta.json").is_file():
        return {}
    meta = TaskMeta.parse(read_meta(last), f"{last} meta.json")
    if (meta.finetune.mode, meta.task, _same_weights(meta.head)) != (
        cfg.train.mode,
        model.task,
        _same_weights(head),
    ) or not same_architecture(to_dict(meta.encoder), to_dict(model.encoder.cfg)):
        raise ValueError(f"{last} belongs to another task, mode, head or encoder; choose a new output folder")
    state = load_train_state(last)
    model.load_state_dict(load_weights(last, device))
    recipe.optimizer.load_state_dict(state["optimizer"])
    recipe.scheduler.load_state_dict(state["scheduler"])
    log.info("resumed from %s after epoch %d", last, state["epoch"])
    return state


def _plain(value: Any) -> Any:
    """NaN and infinity become null: JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def write_json(path: Path, data: dict) -> None:
    """Write strict JSON atomically."""
    write_atomic(path, json.dumps(_plain(data), indent=2))


def _private(cfg: FinetuneConfig, model: EchoCareTaskModel, recipe: Recipe, train_set: TaskDataset) -> Any:
    """DP-SGD over all epochs, each paid for in the site's ledger (`ledger`) before it trains.

    Raises:
        ValueError: a ledger that cannot be trusted.
    """
    from echocare_core.privacy.ledger import LedgerError, PrivacyLedger
    from echocare_core.privacy.passes import PrivatePasses  # Opacus: imported only for DP runs

    t, steps = cfg.train, steps_per_epoch(len(train_set), cfg.train.batch_size)
    try:
        ledger = PrivacyLedger(cfg.ledger.folder, cfg.ledger.epsilon_budget, t.privacy.delta)
    except LedgerError as exc:
        raise ValueError(str(exc)) from exc
    job = "finetune:" + hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()
    return PrivatePasses(
        model, recipe.optimizer, t.privacy, train_set, t.batch_size, steps, steps * cfg.epochs, ledger, job
    )


def run_finetune(
    cfg: FinetuneConfig, on_epoch: EpochCallback | None = None, stop: Callable[[], bool] = lambda: False
) -> FinetuneResult:
    """Fine-tune on the site's dataset, resume from `output/last` if it is there, then test the best epoch.

    Raises:
        DatasetInvalidError: the dataset fails the verifier.
        NonFiniteLossError: the loss became NaN or infinite.
        ValueError: the config, checkpoint or data do not fit together.
    """
    dist = init_distributed(cfg.device)
    if dist.world > 1:
        raise ValueError("echocare-finetune runs in one process (a site's GPU); start it without torchrun")
    device = dist.device
    folder, out, t = Path(cfg.data.folder), Path(cfg.output), cfg.train
    spec = check_dataset(folder)
    if spec.task == "report" and not cfg.model.report.findings and cfg.model.report.findings_weight > 0:
        # the findings classifier learns the dataset's declared findings
        cfg = replace(cfg, model=replace(cfg.model, report=replace(cfg.model.report, findings=spec.findings)))
    rows = {s: split_rows(folder, s, cfg.data.split_seed) for s in ("train", "val", "test")}
    if not rows["train"] or not rows["val"]:
        raise ValueError(f"{folder}: need train and val samples (found {len(rows['train'])} and {len(rows['val'])})")
    torch.manual_seed(cfg.seed)
    stats, tok = target_stats(spec, rows["train"]), tokenizer_for(cfg, spec)
    model = build_task_model(cfg, spec, stats, tok).to(device)
    trainable, total = count_trainable(model)
    log.info(
        "%s, mode %s: %d of %d parameters train (%.2f%%)", spec.task, t.mode, trainable, total, 100 * trainable / total
    )
    enc, k, workers = model.encoder.cfg, num_classes(spec, tok), cfg.data.num_workers
    physical = device_batch(t.batch_size, cfg.max_batch_size)
    sets = split_datasets(folder, spec, rows, enc, cfg.seed, cfg.model.frames, tok, cfg.model.report.views)
    n = len(sets["train"])
    recipe = Recipe.build(model, t, n, steps_per_epoch(n, t.batch_size) * cfg.epochs)
    state = _resume(cfg, out, model, _meta(cfg, spec, model, 0, {}, tok).head, recipe, device)
    start, best, best_metrics, skipped = (
        state.get("epoch", 0),
        state.get("best"),
        state.get("best_metrics", {}),
        state.get("skipped", 0),
    )
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    history = [r for r in read_metrics(out / "metrics.jsonl") if r["epoch"] <= start]
    write_json_lines(out / "metrics.jsonl", history)
    task = get_task(spec.task)
    loss_fn = task.loss(spec, stats, tok, cfg.model.report)
    status, epoch = "finished", start
    private = _private(cfg, model, recipe, sets["train"]) if t.privacy.on else None
    for epoch in range(start + 1, cfg.epochs + 1):
        torch.manual_seed(hash((cfg.seed, epoch)) & 0x7FFFFFFF)
        t0 = time.perf_counter()
        if private is None:
            loader = task_loader(sets["train"], shuffled_keys(n, [cfg.seed, epoch], epoch), t.batch_size, workers)
            losses, unread = train_epoch(model, loader, recipe, loss_fn, device, max_batch=cfg.max_batch_size)
            spent = {}
        else:
            try:
                loader, spend = private.next_pass(epoch, epoch, workers)
            except BudgetExceeded as exc:
                log.warning("%s; stopping before epoch %d", exc, epoch)
                status, epoch = "privacy budget spent", epoch - 1
                break
            dp = private.training
            losses, unread = train_epoch(
                dp.module, loader, recipe, loss_fn, device, dp=dp, max_batch=cfg.max_batch_size
            )
            spent = {"epsilon": spend.epsilon, "delta": spend.delta}
        skipped += unread
        val = evaluate(model, sets["val"], device, k, physical, workers, beam=cfg.model.beam)
        row = {
            "epoch": epoch,
            "train_loss": float(np.mean(losses)) if losses else float("nan"),
            **{f"val_{n}": v for n, v in val.items()},
            "lr": recipe.optimizer.param_groups[0]["lr"],
            "seconds": time.perf_counter() - t0,
            **spent,
        }
        history.append(row)
        write_json_lines(out / "metrics.jsonl", history)
        if best is None or task.score(val) > best:  # the first epoch is best until one beats it
            best, best_metrics = task.score(val), val
            save_checkpoint(out / "best", model, _meta(cfg, spec, model, epoch, {**val, **spent}, tok).to_meta())
        save_checkpoint(
            out / "last",
            model,
            _meta(cfg, spec, model, epoch, {**val, **spent}, tok).to_meta(),
            {
                "optimizer": recipe.optimizer.state_dict(),
                "scheduler": recipe.scheduler.state_dict(),
                "epoch": epoch,
                "best": best,
                "best_metrics": best_metrics,
                "skipped": skipped,
            },
        )
        if on_epoch is not None:
            on_epoch(epoch, cfg.epochs, row)
        if stop():
            status = "stopped"
            break
    test = {}
    if status != "stopped" and rows["test"] and (out / "best" / "meta.json").is_file():
        model.load_state_dict(load_weights(out / "best", device))
        # the binary operating point chosen on validation, not on the test split itself
        test = evaluate(
            model, sets["test"], device, k, physical, workers, best_metrics.get("youden_threshold"), cfg.model.beam
        )
        write_json(out / "test_metrics.json", {"split": "test", "samples": len(rows["test"]), **test})
    return FinetuneResult(status, epoch, best_metrics, test, trainable, total, out, skipped, history)


def write_json_lines(path: Path, rows: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(_plain(r)) + "\n" for r in rows))
