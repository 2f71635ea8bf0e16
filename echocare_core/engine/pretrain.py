"""The pretraining loop: MIM + hierarchy, AdamW/cosine, accumulation, DDP, checkpoint and exact resume.

Randomness is a function of the saved state: data randomness of (seed, epoch, sample index),
model randomness (drop-path) of (seed, step, rank), re-seeded at every optimizer step. A resumed run
therefore continues the very loss curve an uninterrupted run would have produced.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from echocare_core.checkpoint import (
    CheckpointFormatError,
    checkpoints_newest_first,
    load_train_state,
    load_weights,
    prune_checkpoints,
    read_meta,
    same_architecture,
    save_checkpoint,
)
from echocare_core.config import save_config, to_dict
from echocare_core.data.ontology import load_ontology
from echocare_core.data.pretrain import (
    MaskGenerator,
    PretrainDataset,
    ShardedSampler,
    build_index,
    collate_skipping,
    write_skip_log,
)
from echocare_core.engine.distributed import DistInfo, all_reduce_sum, init_distributed, rank_fingerprints, shutdown
from echocare_core.engine.optim import build_optimizer, warmup_cosine
from echocare_core.engine.pretrain_config import PretrainConfig
from echocare_core.engine.run_report import read_metrics, write_pretrain_report
from echocare_core.files import write_atomic
from echocare_core.models.pretrain import EchoCarePretrainModel
from echocare_core.weights import load_encoder_weights

__all__ = ["run_pretraining", "NonFiniteLossError", "PretrainResult"]

log = logging.getLogger(__name__)
StepCallback = Callable[[int, int, dict[str, float]], None]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


@dataclass
class PretrainResult:
    status: str  # "finished" or "stopped"
    step: int
    resumed_from: int
    output: Path
    skipped: dict[str, int] = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past the checkpoint we resume from, so the curve continues cleanly."""
    if not path.exists():
        return
    keep = [row for row in read_metrics(path) if row["step"] <= step]
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in keep))


class _Run:
    """State of one pretraining run in one process."""

    def __init__(self, cfg: PretrainConfig, dist: DistInfo, stop: Callable[[], bool]) -> None:
        self.cfg, self.dist, self.stop = cfg, dist, stop
        self.out = Path(cfg.output)
        self.ckpt_dir = self.out / "checkpoints"
        self.ontology = load_ontology(cfg.data.ontology)
        index = build_index(cfg.data.sources, self.ontology, cfg.data.frame_step)
        masks = MaskGenerator(cfg.model.img_size, cfg.mim.mask_patch_size, cfg.model.patch_size, cfg.mim.mask_ratio)
        self.dataset = PretrainDataset(
            index,
            cfg.model.img_size,
            cfg.model.in_chans,
            masks,
            cfg.data.augment,
            cfg.model.scale,
            cfg.data.frame_step,
            cfg.data.min_nonzero,
            cfg.seed,
        )
        self.sampler = ShardedSampler(len(index), dist.rank, dist.world, cfg.seed)
        o = cfg.optim
        if o.batch_size % (o.micro_batch * dist.world):
            raise ValueError(
                f"optim.batch_size={o.batch_size} must be a multiple of micro_batch x processes "
                f"= {o.micro_batch} x {dist.world}"
            )
        self.accum = o.batch_size // (o.micro_batch * dist.world)
        if self.sampler.per_rank < o.micro_batch * self.accum:
            raise ValueError(
                f"{len(index)} images are fewer than one batch of {o.batch_size}; lower optim.batch_size or add data"
            )
        self.loader = DataLoader(
            self.dataset,
            batch_size=o.micro_batch,
            sampler=self.sampler,
            drop_last=True,
            num_workers=cfg.data.num_workers,
            collate_fn=collate_skipping,
            worker_init_fn=_worker_init,
            pin_memory=dist.device.type == "cuda",
            persistent_workers=cfg.data.num_workers > 0,
        )
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank and every run
        self.model = EchoCarePretrainModel(cfg.model, self.ontology).to(dist.device)
        self.optimizer = build_optimizer(self.model, o.lr, o.weight_decay, o.betas)
        self.scheduler = warmup_cosine(self.optimizer, o.warmup_steps, o.steps, o.min_lr / o.lr)
        self.bf16 = o.precision == "bf16" or (o.precision == "auto" and dist.device.type == "cuda")
        self.step = 0
        self.skipped = {"unreadable": 0, "near-empty": 0}
        self.last_metrics: dict[str, float] = {}
        self.window: dict[str, float] = {}  # loss sums since the last metrics line (saved: exact curve on resume)
        self.resumed_from = self._resume_or_init()
        forward = torch.compile(self.model) if cfg.compile else self.model  # checkpoints keep the plain model
        # the model's buffers are constants (masks, indices, ontology tables): nothing to re-broadcast
        self.ddp = (
            DistributedDataParallel(
                forward, device_ids=None if dist.device.index is None else [dist.device.index], broadcast_buffers=False
            )
            if dist.world > 1
            else forward
        )

    def _resume_or_init(self) -> int:
        for ckpt in checkpoints_newest_first(self.ckpt_dir):
            try:
                meta, state = read_meta(ckpt), load_train_state(ckpt)
                weights = load_weights(ckpt, self.dist.device)
            except CheckpointFormatError:  # another encoder layout: starting over would mix two runs in one folder
                raise
            except (OSError, ValueError, KeyError) as exc:  # e.g. a file cut short by a power loss
                log.warning("checkpoint %s is unreadable (%s); trying the one before", ckpt, type(exc).__name__)
                continue
            self._check_resumable(ckpt, meta, state)
            self.model.load_state_dict(weights)
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.step = int(state["step"])
            self.skipped = dict(state["skipped"])
            self.last_metrics = dict(meta.get("metrics", {}))
            self.window = dict(state["window"])
            log.info("resumed from %s at step %d", ckpt, self.step)
            return self.step
        if self.cfg.init_weights:
            report = load_encoder_weights(self.model.encoder, self.cfg.init_weights, self.cfg.init_partial)
            if report.mask_token is not None:  # the release's MIM mask embedding: continued pretraining keeps it
                with torch.no_grad():
                    self.model.mask_token.copy_(report.mask_token)
        return 0

    def _check_resumable(self, ckpt: Path, meta: dict[str, Any], state: dict[str, Any]) -> None:
        if not same_architecture(meta.get("encoder", {}), to_dict(self.cfg.model)):
            raise ValueError(
                f"{ckpt} was made with another model config; resume needs the same `model:` "
                f"section, or choose a new output folder"
            )
        if (state["world"], state["micro_batch"]) != (self.dist.world, self.cfg.optim.micro_batch):
            raise ValueError(
                f"{ckpt} was made by {state['world']} process(es) with micro_batch "
                f"{state['micro_batch']}; resume with the same (now {self.dist.world} and "
                f"{self.cfg.optim.micro_batch}) so every image is seen once per epoch, "
                f"or choose a new output folder"
            )

    def _micro_step(self, batch: dict[str, Any], sync: bool) -> dict[str, torch.Tensor]:
        dev = self.dist.device
        ctx = contextlib.nullcontext() if sync or self.dist.world == 1 else self.ddp.no_sync()
        n = 0 if batch["image"] is None else batch["image"].shape[0]
        if n == 0:  # every image of the micro-batch was skipped: a blank stand-in with weight 0 keeps ranks in step
            size, chans = self.cfg.model.img_size, self.cfg.model.in_chans
            patches = size // self.cfg.model.patch_size
            batch = {
                "image": torch.zeros(1, chans, size, size),
                "token_mask": torch.zeros(1, patches, patches),
                "anatomy": torch.full((1,), -1, dtype=torch.long),
                "skipped": batch["skipped"],
            }
        with ctx:
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.bf16):
                loss, parts, _ = self.ddp(
                    batch["image"].to(dev, non_blocking=True),
                    batch["token_mask"].to(dev, non_blocking=True),
                    batch["anatomy"].to(dev, non_blocking=True),
                    self.cfg.hie_weight,
                )
            if n == 0:
                loss, parts = loss * 0.0, {k: v * 0.0 for k, v in parts.items()}
            (loss / self.accum).backward()
        kinds = [k for k, _, _ in batch["skipped"]]
        return {
            "loss": loss.detach(),
            **parts,
            "images": torch.tensor(float(n), device=dev),
            "unreadable": torch.tensor(float(kinds.count("unreadable")), device=dev),
            "near-empty": torch.tensor(float(kinds.count("near-empty")), device=dev),
        }

    def _optimizer_step(self, batches: list[dict[str, Any]]) -> dict[str, float]:
        torch.manual_seed(hash((self.cfg.seed, self.step, self.dist.rank)) & 0x7FFFFFFF)
        sums: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(batches):
            for k, v in self._micro_step(batch, sync=i == len(batches) - 1).items():
                sums[k] = sums.get(k, 0.0) + v
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad or float("inf"))
        keys = ("loss", "loss_mim", "loss_hie", "labelled", "images", "unreadable", "near-empty")
        packed = all_reduce_sum(torch.stack([sums[k].float() for k in keys] + [grad_norm.float()]))
        scale = torch.tensor([self.accum * self.dist.world] * 3 + [1.0] * 4 + [self.dist.world], device=packed.device)
        loss, mim, hie, labelled, images, unreadable, empty, gnorm = (packed / scale).tolist()
        self.skipped["unreadable"] += int(unreadable)
        self.skipped["near-empty"] += int(empty)
        if not (math.isfinite(loss) and math.isfinite(gnorm)):
            raise NonFiniteLossError(
                f"non-finite {'gradient' if math.isfinite(loss) else 'loss'} at step "
                f"{self.step + 1} (loss_mim={mim}, loss_hie={hie}, grad_norm={gnorm}); the last good checkpoint "
                f"is kept in {self.ckpt_dir}. Lower optim.lr, raise optim.warmup_steps or use precision: fp32"
            )
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
        if images > 0:
            self.optimizer.step()
        else:  # momentum and weight decay must not move the weights on a batch of nothing
            log.warning("step %d: no readable image in the whole batch; weights unchanged", self.step + 1)
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # the schedule follows steps, taken or not: torch's warning is moot
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            self.scheduler.step()
        self.step += 1
        return {
            "loss": loss,
            "loss_mim": mim,
            "loss_hie": hie,
            "grad_norm": gnorm,
            "labelled_frac": labelled / max(images, 1.0),
            "images": images,
            "lr": lr,
        }

    def save(self, metrics: dict[str, float]) -> None:
        fingerprints = rank_fingerprints(self.model)
        if max(fingerprints) - min(fingerprints) > 1e-6 * max(1.0, abs(fingerprints[0])):
            raise RuntimeError(f"ranks disagree on the weights at step {self.step}: {fingerprints}")
        if not self.dist.is_main:
            return
        meta = {
            "model_kind": "pretrain",
            "encoder": to_dict(self.cfg.model),
            "ontology": self.ontology.to_tree(),
            "step": self.step,
            "epoch": self.step * self.cfg.optim.micro_batch * self.accum / self.sampler.per_rank,
            "metrics": metrics,
            "input": self.cfg.model.input_spec,
            "rank_fingerprints": fingerprints,
            "config": to_dict(self.cfg),
        }
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "skipped": self.skipped,
            "world": self.dist.world,
            "micro_batch": self.cfg.optim.micro_batch,
            "window": self.window,
        }
        save_checkpoint(self.ckpt_dir / f"step_{self.step:06d}", self.model, meta, state)
        prune_checkpoints(self.ckpt_dir, self.cfg.checkpoint.keep_last)

    def train(self, on_step: StepCallback | None) -> PretrainResult:
        cfg, o = self.cfg, self.cfg.optim
        metrics_file = self.out / "metrics.jsonl"
        skip_file = self.out / (
            "skipped_files.csv" if self.dist.world == 1 else f"skipped_files.rank{self.dist.rank}.csv"
        )
        if self.dist.is_main:
            _truncate_metrics(metrics_file, self.step)
        last = self.last_metrics
        status = "finished"
        t_wait = t_other = 0.0
        t_window, images_window = time.perf_counter(), 0.0
        per_step = o.micro_batch * self.accum  # images per optimizer step in this process
        self.sampler.start_at(self.step * per_step)
        batches = iter(self.loader)
        while self.step < o.steps:
            t0 = time.perf_counter()
            group = [next(batches) for _ in range(self.accum)]
            t_wait += time.perf_counter() - t0
            last = self._optimizer_step(group)
            images_window += last["images"]
            for key in ("loss", "loss_mim", "loss_hie"):
                self.window[key] = self.window.get(key, 0.0) + last[key]
            self.window["n"] = self.window.get("n", 0) + 1
            t1 = time.perf_counter()
            skipped_rows = [row for b in group for row in b["skipped"]]
            if skipped_rows:
                write_skip_log(skip_file, skipped_rows)
                for kind, _, reason in skipped_rows:
                    log.warning("skipped %s image: %s", kind, reason)
            if self.step % cfg.log_every == 0 or self.step == o.steps:
                elapsed = time.perf_counter() - t_window
                # losses are averaged over the steps since the last line: a smoother, honest curve
                last.update(
                    {k: v / self.window["n"] for k, v in self.window.items() if k != "n"},
                    epoch=self.step * per_step / self.sampler.per_rank,
                    images_per_s=images_window / elapsed,
                    outside_share=(t_wait + t_other) / elapsed,
                )
                t_wait = t_other = 0.0
                t_window, images_window = time.perf_counter(), 0.0
                self.window = {}
                if self.dist.is_main:
                    with metrics_file.open("a", encoding="utf-8") as f:
                        f.write(json.dumps({"step": self.step, **last}) + "\n")
            stop = self._stop_requested()
            if self.step % cfg.checkpoint.every_steps == 0 or self.step == o.steps or stop:
                self.save(last)
            if on_step is not None and self.dist.is_main:
                on_step(self.step, o.steps, last)
            t_other += time.perf_counter() - t1
            if stop:
                status = "stopped"
                break
        return PretrainResult(status, self.step, self.resumed_from, self.out, dict(self.skipped), last)

    def _stop_requested(self) -> bool:
        flag = torch.tensor([1.0 if self.stop() else 0.0], device=self.dist.device)
        return all_reduce_sum(flag).item() > 0


def run_pretraining(
    cfg: PretrainConfig, on_step: StepCallback | None = None, stop: Callable[[], bool] = lambda: False
) -> PretrainResult:
    """Pretrain (or resume pretraining) as `cfg` says, in this process or as one rank under torchrun.

    Args:
        cfg: the resolved config.
        on_step: called on rank 0 after every optimizer step with `(step, total, last_metrics)`.
        stop: polled after every optimizer step; when it returns True (e.g. after Ctrl-C) the run
            saves a checkpoint and returns with status "stopped".

    Raises:
        NonFiniteLossError: the loss or gradient became NaN/inf.
        ValueError, FileNotFoundError: bad data or config.
    """
    dist = init_distributed(cfg.device)
    try:
        out = Path(cfg.output)
        run = _Run(cfg, dist, stop)  # checks data, config and any checkpoint to resume before writing
        if dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, out / "config.yaml")
        result = run.train(on_step)
        if dist.is_main:
            write_pretrain_report(out, result.skipped)
        return result
    finally:
        shutdown()
