"""Local fine-tuning of the encoder + a task head on one site's dataset (the local-only baseline).

Each epoch trains, validates, keeps the best checkpoint by the task's main metric (`best/`) and the
resume state (`last/`); the run ends by testing the best checkpoint on the test split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, SSIMLoss
from torch.utils.data import DataLoader

from echocare_core.checkpoint import load_train_state, load_weights, read_meta, same_architecture, save_checkpoint
from echocare_core.config import from_dict, save_config, to_dict
from echocare_core.data.contract import DatasetSpec, load_spec, read_manifest, verify_dataset
from echocare_core.data.finetune import TaskDataset, collate_task, from_model_points, split_rows
from echocare_core.data.text import ReportTokenizer
from echocare_core.engine.distributed import init_distributed
from echocare_core.engine.finetune_config import FinetuneConfig
from echocare_core.engine.metrics import (LOWER_IS_BETTER, MAIN_METRIC, classification_metrics, detection_metrics,
                                          enhancement_metrics, landmark_metrics, multilabel_metrics,
                                          regression_metrics, segmentation_metrics)
from echocare_core.engine.text_metrics import report_metrics, stated
from echocare_core.engine.optim import build_optimizer, warmup_cosine
from echocare_core.engine.pretrain import NonFiniteLossError
from echocare_core.engine.report import read_metrics
from echocare_core.models.detection import detection_loss
from echocare_core.models.landmarks import heatmap_loss
from echocare_core.models.report import ReportHeadConfig
from echocare_core.models.swin import EncoderConfig
from echocare_core.models.task import EchoCareTaskModel, apply_finetune_mode, count_trainable
from echocare_core.privacy.settings import BudgetExceeded
from echocare_core.weights import load_encoder_weights

__all__ = ["DatasetInvalidError", "FinetuneResult", "check_dataset", "evaluate_model", "num_classes", "report_loss",
           "run_finetune", "task_loader", "task_loss", "tokenizer_for", "train_epoch", "write_json", "write_json_lines"]

log = logging.getLogger(__name__)
EpochCallback = Callable[[int, int, dict[str, float]], None]


class DatasetInvalidError(ValueError):
    """The dataset fails the verifier; the message lists the first problems."""


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


def num_classes(spec: DatasetSpec, tokenizer: ReportTokenizer | None = None) -> int:
    """Classes (classification, detection), declared mask values (segmentation), points (landmarks), the
    tokenizer's ids (report), 1 (regression, enhancement)."""
    if spec.task == "report":
        return tokenizer.vocab_size if tokenizer is not None else ReportTokenizer().vocab_size
    return {"classification": len(spec.classes), "detection": len(spec.classes), "segmentation": len(spec.labels),
            "landmarks": len(spec.landmark_names)}.get(spec.task, 1)


def tokenizer_for(cfg: FinetuneConfig, spec: DatasetSpec) -> ReportTokenizer | None:
    """The report tokenizer of the config (byte-level unless `model.tokenizer` names a file); None for other tasks.

    Raises:
        FileNotFoundError, ValueError: the tokenizer file is absent or unusable.
    """
    if spec.task != "report":
        return None
    m = cfg.model
    return ReportTokenizer.from_file(m.tokenizer, m.report.max_tokens) if m.tokenizer else \
        ReportTokenizer(max_tokens=m.report.max_tokens)


def target_stats(spec: DatasetSpec, rows: list[dict[str, str]]) -> tuple[float, float]:
    """Regression: mean and standard deviation of the training targets (the head predicts standardised values)."""
    if spec.task != "regression":
        return 0.0, 1.0
    values = np.array([float(r["target"]) for r in rows])
    std = float(values.std())
    return float(values.mean()), std if std > 1e-6 else 1.0


def _encoder_config(cfg: FinetuneConfig) -> EncoderConfig:
    """An EchoCare checkpoint brings its own encoder config; anything else uses `model.encoder`."""
    if cfg.model.init:
        try:
            return from_dict(EncoderConfig, read_meta(cfg.model.init)["encoder"], "encoder")
        except (ValueError, KeyError):  # foreign weights: no EchoCare metadata
            pass
    return cfg.model.encoder


def build_task_model(cfg: FinetuneConfig, spec: DatasetSpec, stats: tuple[float, float] = (0.0, 1.0),
                     tokenizer: ReportTokenizer | None = None) -> EchoCareTaskModel:
    enc = _encoder_config(cfg)
    model = EchoCareTaskModel(enc, spec.task, num_classes(spec, tokenizer), cfg.model.feature_size, spec.multi_label,
                              stats, cfg.model.report)
    if cfg.model.init:
        load_encoder_weights(model.encoder, cfg.model.init, cfg.model.init_partial)
    apply_finetune_mode(model, cfg.model.mode, cfg.model.lora_rank, cfg.model.lora_alpha)
    return model


def report_loss(tokenizer: ReportTokenizer, head: ReportHeadConfig | None = None
                ) -> Callable[[tuple[torch.Tensor, torch.Tensor], torch.Tensor], torch.Tensor]:
    """Per report, the next-token cross-entropy (mean over its tokens, padding left out) plus, where the head
    classifies findings, `findings_weight` times the findings' binary cross-entropy, labelled by whether the
    report's text (as far as its ids reach) states each; then the mean over reports."""
    findings, weight = (head.findings, head.findings_weight) if head and head.classifies else ((), 0.0)

    def loss(out: tuple[torch.Tensor, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:  # [B, L - 1, vocab], [B, F]
        logits, finding_logits = out
        target = ids[:, 1:]
        keep = (target != tokenizer.pad).float()
        ce = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")  # [B, L - 1]
        per_report = (ce * keep).sum(1) / keep.sum(1).clamp(min=1)
        if findings:
            labels = stated([tokenizer.decode(r) for r in ids], findings)
            bce = F.binary_cross_entropy_with_logits(finding_logits, torch.as_tensor(
                labels, dtype=finding_logits.dtype, device=ids.device), reduction="none")
            per_report = per_report + weight * bce.mean(1)
        return per_report.mean()
    return loss


def task_loss(spec: DatasetSpec, stats: tuple[float, float], tokenizer: ReportTokenizer | None = None,
              head: ReportHeadConfig | None = None) -> Callable[[Any, Any], torch.Tensor]:
    """The task's training loss, computed per sample and averaged (so DP can clip per sample); report generation
    needs its tokenizer and head config."""
    if spec.task == "classification":
        return F.binary_cross_entropy_with_logits if spec.multi_label else F.cross_entropy
    if spec.task == "segmentation":
        dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, batch=False)
        return lambda logits, target: dice_ce(logits, target[:, None])
    if spec.task == "landmarks":
        return heatmap_loss
    if spec.task == "detection":
        return detection_loss
    if spec.task == "report":
        if tokenizer is None:
            raise ValueError("report generation's loss needs the tokenizer")
        return report_loss(tokenizer, head)
    if spec.task == "enhancement":  # L1 + (1 - SSIM) on the enhanced image in [0, 1]
        ssim = SSIMLoss(spatial_dims=2, data_range=1.0)
        return lambda logits, target: F.l1_loss(logits.sigmoid(), target) + ssim(logits.sigmoid(), target)
    mean, std = stats
    return lambda pred, target: F.smooth_l1_loss(pred, (target - mean) / std)


def _to(target: torch.Tensor | list[torch.Tensor], device: torch.device) -> torch.Tensor | list[torch.Tensor]:
    return [t.to(device) for t in target] if isinstance(target, list) else target.to(device)


@torch.no_grad()
def predict_all(model: EchoCareTaskModel, loader: DataLoader, device: torch.device, beam: int = 1
                ) -> tuple[Any, Any, torch.Tensor] | None:
    """Predictions (`EchoCareTaskModel.decode`), targets and the dataset rows they belong to; None when
    nothing was readable. Landmarks come back in the images' own pixels, boxes in the model's grid
    (IoU does not change with scale); reports as texts written with beam search of width `beam`, next to
    the manifest's reports."""
    model.eval()
    preds, targets, rows = [], [], []
    for batch in loader:
        if "image" not in batch:
            continue
        if model.task == "report":
            tok, ds = loader.dataset.tokenizer, loader.dataset
            preds += [tok.decode(ids) for ids in model.generate(batch["image"].to(device), tok.bos, tok.eos, beam)]
            targets += [ds.rows[int(i)]["report"] for i in batch["row"]]
            rows.append(batch["row"])
            continue
        pred, true = model.decode(model(batch["image"].to(device)).float()), batch["target"]
        if model.task == "landmarks":
            size = batch["image"].shape[-1]
            pred, true = from_model_points(pred.cpu(), batch["size"], size), from_model_points(true, batch["size"], size)
        if model.task == "detection":
            preds += [d.cpu() for d in pred]
            targets += list(true)
        else:
            preds.append(pred.cpu())
            targets.append(true)
        rows.append(batch["row"])
    model.train()
    if not rows:
        return None
    return (preds, targets, torch.cat(rows)) if model.task in ("detection", "report") else \
        (torch.cat(preds), torch.cat(targets), torch.cat(rows))


def task_metrics(task: str, pred: Any, true: Any, k: int, threshold: float | None = None,
                 findings: tuple[str, ...] = ()) -> dict[str, float]:
    """The task's metrics; `threshold` fixes the binary operating point (else the Youden one of this data);
    `findings` are the report dataset's declared findings."""
    if task == "report":
        return report_metrics(pred, true, findings)
    if task == "segmentation":
        return segmentation_metrics(pred, true, k)
    if task == "landmarks":
        return landmark_metrics(pred, true)
    if task == "detection":
        return detection_metrics(pred, true, k)
    if task == "regression":
        return regression_metrics(pred, true)
    if task == "enhancement":
        return enhancement_metrics(pred, true)
    return multilabel_metrics(pred, true) if true.ndim == 2 else classification_metrics(pred, true, threshold)


def evaluate_model(model: EchoCareTaskModel, loader: DataLoader, device: torch.device, k: int,
                   threshold: float | None = None, beam: int = 1) -> dict[str, float]:
    """Main and secondary metrics of `model` over `loader` (a `TaskDataset`'s)."""
    out = predict_all(model, loader, device, beam)
    findings = loader.dataset.spec.findings if model.task == "report" else ()
    return task_metrics(model.task, out[0], out[1], k, threshold, findings) if out is not None else {}


def task_loader(ds: TaskDataset, keys: list[tuple[int, int]], batch: int, workers: int) -> DataLoader:
    return DataLoader(ds, batch_size=batch, sampler=keys, num_workers=workers, collate_fn=collate_task)


def _score(metrics: dict[str, float], task: str) -> float:
    """The main metric as "higher is better"; -inf when it is undefined."""
    value = metrics.get(MAIN_METRIC[task], float("nan"))
    if not math.isfinite(value):
        return float("-inf")
    return -value if MAIN_METRIC[task] in LOWER_IS_BETTER else value


def _meta(cfg: FinetuneConfig, spec: DatasetSpec, model: EchoCareTaskModel, epoch: int,
          metrics: dict[str, float], tokenizer: ReportTokenizer | None) -> dict[str, Any]:
    enc = model.encoder.cfg
    report = {"report": to_dict(cfg.model.report), "tokenizer": tokenizer.to_str(), "findings": list(spec.findings),
              "beam": cfg.model.beam} if tokenizer is not None else {}
    return {"model_kind": "task", "task": spec.task, "encoder": to_dict(enc), "epoch": epoch, "metrics": metrics,
            "head": {"num_classes": num_classes(spec, tokenizer), "feature_size": cfg.model.feature_size, **report,
                     "multi_label": spec.multi_label, "classes": list(spec.classes),
                     "labels": {str(k): v for k, v in spec.labels.items()},
                     "landmark_names": list(spec.landmark_names), "target_name": spec.target_name,
                     "target_stats": list(model.target_stats)},
            "finetune": {"mode": cfg.model.mode, "lora_rank": cfg.model.lora_rank, "lora_alpha": cfg.model.lora_alpha},
            "input": {**enc.input_spec, "frames": cfg.model.frames},
            "dataset": spec.name, "config": to_dict(cfg)}


def _resume(cfg: FinetuneConfig, out: Path, model: EchoCareTaskModel, head: dict[str, Any],
            optimizer: torch.optim.Optimizer, scheduler: Any, device: torch.device) -> dict[str, Any]:
    """Training state of `out/last`, loaded into model and optimizer; empty when starting afresh."""
    last = out / "last"
    if not (last / "meta.json").is_file():
        return {}
    meta = read_meta(last)
    def weights(h: dict[str, Any]) -> dict[str, Any]:  # without the report settings that leave the weights alone
        kept = {k: v for k, v in h.items() if k not in ("beam", "findings")}
        if "report" in kept:  # the findings' loss weight; their phrases only matter where there is a classifier
            r = from_dict(ReportHeadConfig, kept["report"], "head.report")
            kept["report"] = replace(r, findings_weight=1.0, findings=r.findings if r.classifies else ())
        return kept

    if ((meta["finetune"]["mode"], meta["task"], weights(meta["head"])) != (cfg.model.mode, model.task,
                                                                           weights(head))
            or not same_architecture(meta["encoder"], to_dict(model.encoder.cfg))):
        raise ValueError(f"{last} belongs to another task, mode, head or encoder; choose a new output folder")
    state = load_train_state(last)
    model.load_state_dict(load_weights(last, device))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
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
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_plain(data), indent=2), encoding="utf-8")
    os.replace(tmp, path)


def check_dataset(folder: Path) -> DatasetSpec:
    """The dataset's spec once it passes the verifier (landmarks named `point1..K` when dataset.yaml names none).

    Raises:
        DatasetInvalidError: naming the first problem by file, row and column.
    """
    report = verify_dataset(folder)
    if not report.ok:
        raise DatasetInvalidError(f"{folder} fails the dataset check with {report.describe(1)}. "
                                  f"See all with: echocare-data verify {folder}")
    spec = load_spec(folder)
    if spec.task == "landmarks" and not spec.landmark_names:
        _, rows = read_manifest(folder)
        count = len(json.loads(rows[0]["landmarks"])) if rows else 0
        spec = replace(spec, landmark_names=tuple(f"point{i + 1}" for i in range(count)))
    return spec


def train_epoch(model: EchoCareTaskModel, loader: DataLoader, optimizer: torch.optim.Optimizer, scheduler: Any,
                loss_fn: Callable, device: torch.device, bf16: bool, clip: float, dp: Any = None,
                teacher: bool = False) -> tuple[list[float], int]:
    """One pass over the training data; returns the batch losses and the number of unreadable samples.

    Args:
        teacher: the model reads the target too (report generation's teacher forcing).
        dp: a `DPTraining` whose module, optimizer and Poisson loader these are: per-sample clipping and noise
            replace `clip`, every batch is checked to be per sample, and an empty batch is still a (noise) step.

    Raises:
        NonFiniteLossError: the loss became NaN or infinite.
        PrivacyError: under DP, a per-sample gradient that is not per sample.
    """
    losses, skipped = [], 0
    for batch in loader:
        skipped += batch["skipped"]
        if "image" not in batch:
            if dp is not None:
                dp.empty_batch()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
            continue
        target = _to(batch["target"], device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(batch["image"].to(device), *([target] if teacher else []))
        out = tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()  # report: tokens, findings
        loss = loss_fn(out, target) if dp is None else dp.loss(loss_fn, out, target)
        value = loss.item()
        if not math.isfinite(value):
            raise NonFiniteLossError(f"non-finite loss after {len(losses)} batches of this epoch; lower optim.lr "
                                     f"or use precision: fp32")
        loss.backward()
        if dp is None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip or float("inf"))
        else:
            dp.check(len(batch["image"]))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        losses.append(value)
    return losses, skipped


def _private(cfg: FinetuneConfig, model: EchoCareTaskModel, optimizer: torch.optim.Optimizer,
             train_set: TaskDataset) -> Any:
    """DP-SGD over all epochs, each paid for in the site's ledger (`privacy.ledger`) before it trains.

    Raises:
        ValueError: a ledger that cannot be trusted, or ghost clipping for clips or reports.
    """
    from echocare_core.privacy.ledger import LedgerError, PrivacyLedger
    from echocare_core.privacy.passes import PrivatePasses  # Opacus: imported only for DP runs

    p, steps = cfg.privacy, math.ceil(len(train_set) / cfg.optim.batch_size)
    try:
        ledger = PrivacyLedger(p.ledger, p.epsilon_budget, p.delta)
    except LedgerError as exc:
        raise ValueError(str(exc)) from exc
    job = "finetune:" + hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()
    return PrivatePasses(model, optimizer, p.settings, train_set, cfg.optim.batch_size, steps, steps * cfg.optim.epochs,
                         ledger, job)


def run_finetune(cfg: FinetuneConfig, on_epoch: EpochCallback | None = None,
                 stop: Callable[[], bool] = lambda: False) -> FinetuneResult:
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
    folder, out = Path(cfg.data.folder), Path(cfg.output)
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
    log.info("%s, mode %s: %d of %d parameters train (%.2f%%)", spec.task, cfg.model.mode, trainable, total,
             100 * trainable / total)
    o, enc, k = cfg.optim, model.encoder.cfg, num_classes(spec, tok)
    sets = {s: TaskDataset(folder, spec, r, enc.img_size, enc.in_chans, s == "train", enc.scale, seed=cfg.seed,
                           frames=cfg.model.frames, tokenizer=tok, views=cfg.model.report.views)
            for s, r in rows.items()}
    steps = math.ceil(len(sets["train"]) / o.batch_size)
    optimizer = build_optimizer(model, o.lr, o.weight_decay, (0.9, 0.999))
    scheduler = warmup_cosine(optimizer, o.warmup_epochs * steps, o.epochs * steps, 0.01)
    state = _resume(cfg, out, model, _meta(cfg, spec, model, 0, {}, tok)["head"], optimizer, scheduler, device)
    start, best, best_metrics, skipped = (state.get("epoch", 0), state.get("best"),
                                          state.get("best_metrics", {}), state.get("skipped", 0))
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    history = [r for r in read_metrics(out / "metrics.jsonl") if r["epoch"] <= start]
    write_json_lines(out / "metrics.jsonl", history)
    loss_fn = task_loss(spec, stats, tok, cfg.model.report)
    bf16 = o.precision == "bf16" or (o.precision == "auto" and device.type == "cuda")
    val_keys = [(0, i) for i in range(len(sets["val"]))]
    status, epoch = "finished", start
    private = _private(cfg, model, optimizer, sets["train"]) if cfg.privacy.epsilon > 0 else None
    for epoch in range(start + 1, o.epochs + 1):
        torch.manual_seed(hash((cfg.seed, epoch)) & 0x7FFFFFFF)
        t0 = time.perf_counter()
        if private is None:
            keys = [(epoch, int(i)) for i in np.random.default_rng([cfg.seed, epoch]).permutation(len(sets["train"]))]
            losses, unread = train_epoch(model, task_loader(sets["train"], keys, o.batch_size, cfg.data.num_workers),
                                          optimizer, scheduler, loss_fn, device, bf16, o.clip_grad,
                                          teacher=tok is not None)
            spent = {}
        else:
            try:
                loader, spend = private.next_pass(epoch, epoch, cfg.data.num_workers)
            except BudgetExceeded as exc:
                log.warning("%s; stopping before epoch %d", exc, epoch)
                status, epoch = "privacy budget spent", epoch - 1
                break
            dp = private.training
            losses, unread = train_epoch(dp.module, loader, dp.optimizer, scheduler, loss_fn, device, False, 0.0, dp=dp,
                                          teacher=tok is not None)
            spent = {"epsilon": spend.epsilon, "delta": spend.delta}
        skipped += unread
        val = evaluate_model(model, task_loader(sets["val"], val_keys, o.batch_size, cfg.data.num_workers), device, k,
                             beam=cfg.model.beam)
        row = {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else float("nan"),
               **{f"val_{n}": v for n, v in val.items()}, "lr": optimizer.param_groups[0]["lr"],
               "seconds": time.perf_counter() - t0, **spent}
        history.append(row)
        write_json_lines(out / "metrics.jsonl", history)
        if best is None or _score(val, spec.task) > best:  # the first epoch is best until one beats it
            best, best_metrics = _score(val, spec.task), val
            save_checkpoint(out / "best", model, _meta(cfg, spec, model, epoch, {**val, **spent}, tok))
        save_checkpoint(out / "last", model, _meta(cfg, spec, model, epoch, {**val, **spent}, tok),
                        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch,
                         "best": best, "best_metrics": best_metrics, "skipped": skipped})
        if on_epoch is not None:
            on_epoch(epoch, o.epochs, row)
        if stop():
            status = "stopped"
            break
    test = {}
    if status != "stopped" and rows["test"] and (out / "best" / "meta.json").is_file():
        model.load_state_dict(load_weights(out / "best", device))
        test_keys = [(0, i) for i in range(len(sets["test"]))]
        # the binary operating point chosen on validation, not on the test split itself
        test = evaluate_model(model, task_loader(sets["test"], test_keys, o.batch_size, cfg.data.num_workers), device, k,
                              best_metrics.get("youden_threshold"), cfg.model.beam)
        write_json(out / "test_metrics.json", {"split": "test", "samples": len(rows["test"]), **test})
    return FinetuneResult(status, epoch, best_metrics, test, trainable, total, out, skipped, history)


def write_json_lines(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(_plain(r)) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)
