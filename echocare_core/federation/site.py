"""One federated round at a site: take the global weights, train locally, return only what the job shares.

Plain functions, no Flower: the ClientApp calls `site_round`, and so can a test. Parameters the job
names site-local (`Job.local`, and a multi-task job's heads when they are local) are kept in the site's state
folder between rounds and never leave; the server need not send them. A site of a multi-task job with shared
heads receives and returns its task's head under the server's name for it (`heads.<index>.*`).
"""

from __future__ import annotations

import fnmatch
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from echocare_core.engine.training import (
    Recipe,
    check_dataset,
    device_batch,
    evaluate,
    shuffled_keys,
    split_datasets,
    task_loader,
    train_epoch,
)
from echocare_core.federation.job import (
    Job,
    check_job,
    job_hash,
    local_patterns,
    server_names,
    shared_names,
    task_for,
    task_jobs,
    task_view,
)
from echocare_core.federation.site_terms import SiteLimits
from echocare_core.files import write_atomic
from echocare_core.models.lora import apply_finetune_mode
from echocare_core.privacy.settings import SitePrivacy, steps_per_round
from echocare_core.tasks import get_task
from echocare_core.tasks.dataset import TaskDataset, split_rows
from echocare_core.tasks.model import EchoCareTaskModel
from echocare_core.weights import load_encoder_weights

__all__ = [
    "JobRefused",
    "RoundResult",
    "SharedEncoder",
    "build_job_model",
    "frozen_part",
    "local_layers_file",
    "site_round",
]

log = logging.getLogger(__name__)


class JobRefused(ValueError):
    """The site does not run this job; the message says why (keys and values of the job, never data)."""


@dataclass
class RoundResult:
    shared: dict[str, torch.Tensor]  # the parameters that leave the site
    samples: int  # training samples (the aggregation weight)
    metrics: dict[str, float]  # validation metrics of the received (global_*) and the trained (local_*) model


class SharedEncoder(torch.nn.Module):
    """What the server of a multi-task job holds: the encoder with the job's adapters, named as in every site's
    model (`encoder.*`), and with `heads: shared` one head per task (`heads.<index>.*`); local heads live at
    the sites."""

    def __init__(self, job: Job) -> None:
        super().__init__()
        models = [_task_model(j) for j in task_jobs(job)]
        self.encoder = models[0].encoder
        if job.heads == "shared":
            self.heads = torch.nn.ModuleList(m.head for m in models)


def _task_model(job: Job) -> EchoCareTaskModel:
    model = EchoCareTaskModel(
        job.encoder,
        job.task,
        job.num_outputs,
        job.feature_size,
        job.multi_label,
        report=job.report,
        decoder=job.decoder,
    )
    apply_finetune_mode(model, job.train.mode, job.train.lora_rank, job.train.lora_alpha)
    return model


def build_job_model(job: Job) -> EchoCareTaskModel | SharedEncoder:
    """The job's model with its fine-tuning mode applied (same parameter names at every site and the server);
    for a multi-task job, the shared encoder the server holds."""
    return SharedEncoder(job) if job.tasks else _task_model(job)


def frozen_part(job: Job, weights: str | Path) -> dict[str, torch.Tensor]:
    """What the coordinator's global model holds beyond the shared parameters, built at the site: the job's model
    with its encoder from `weights` (all of them), less what the job shares. It is the coordinator's frozen part
    when the job started from the same weights; the digest the coordinator names it by tells."""
    model = build_job_model(job)
    load_encoder_weights(model.encoder, weights)
    shared = set(shared_names(model, job))
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in shared}


def local_layers_file(state_dir: Path, job: str) -> Path:
    """Where a site keeps the site-local layers of the job with hash `job` between rounds."""
    return state_dir / "local_layers" / f"{job[:16]}.safetensors"


def _is_local(name: str, job: Job) -> bool:
    return any(fnmatch.fnmatchcase(name, pat) for pat in local_patterns(job))


def _save_local(model: EchoCareTaskModel, job: Job, path: Path, server_round: int) -> None:
    local = {n: t.detach().cpu().contiguous() for n, t in model.state_dict().items() if _is_local(n, job)}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: save_file(local, str(tmp), metadata={"round": str(server_round)}))  # they pair
    # with that round's global model


def _local_passes(job: Job, n: int, server_round: int) -> list[list[tuple[int, int]]]:
    """The (epoch, index) keys of each local pass: `local_epochs` shuffled epochs, or with `local_steps`
    one pass of exactly that many batches, cut from as many shuffled epochs as it takes."""
    batch = job.train.batch_size
    epochs = math.ceil(job.local_steps * batch / n) if job.local_steps else job.local_epochs
    passes = [shuffled_keys(n, [job.seed, server_round, e], server_round * 1000 + e) for e in range(epochs)]
    return [sum(passes, [])[: job.local_steps * batch]] if job.local_steps else passes


def _train_private(
    job: Job,
    model: EchoCareTaskModel,
    recipe: Recipe,
    loss_fn: Any,
    train_set: TaskDataset,
    server_round: int,
    steps: int,
    rounds: int,
    privacy: SitePrivacy,
    ledger_dir: Path | None,
    device: torch.device,
    num_workers: int,
    ledger_job: str,
    max_batch: int,
) -> tuple[list[float], int, dict]:
    """DP-SGD for one round, paid for in the site's ledger (under `ledger_job`, the federation's job hash)
    before it trains; returns the batch losses, the unreadable samples and the privacy metrics (the epsilon the
    dataset has spent so far)."""
    from echocare_core.privacy.ledger import BudgetExceeded, LedgerError, PrivacyLedger
    from echocare_core.privacy.passes import PrivatePasses

    if ledger_dir is None:
        raise JobRefused("the job asks for differential privacy and this site keeps no privacy ledger")
    t = job.train
    try:
        ledger = PrivacyLedger(ledger_dir, privacy.epsilon_budget, privacy.delta)
        private = PrivatePasses(
            model, recipe.optimizer, t.privacy, train_set, t.batch_size, steps, steps * rounds, ledger, ledger_job
        )
        loader, spend = private.next_pass(server_round, server_round * 1000, num_workers)
    except BudgetExceeded as exc:
        raise JobRefused(str(exc)) from exc
    except LedgerError as exc:  # names files: stays in the site's log
        log.error("%s", exc)
        raise JobRefused("the site's privacy ledger cannot be trusted (see the site's log)") from exc
    dp = private.training
    losses, unread = train_epoch(dp.module, loader, recipe, loss_fn, device, dp=dp, max_batch=max_batch)
    dp.module.remove_hooks()
    return (
        losses,
        unread,
        {
            "train_steps": float(spend.steps),  # an empty Poisson batch is a (noise) step without a loss
            "epsilon": spend.epsilon,
            "delta": spend.delta,
            "noise_multiplier": private.sigma,
            "sample_rate": private.sample_rate,
        },
    )


def _mismatch(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> str:
    """How `given` differs from the names and shapes of `expected` ("" when it fits)."""
    missing, unexpected = expected.keys() - given.keys(), given.keys() - expected.keys()
    shapes = [k for k in expected.keys() & given.keys() if expected[k].shape != given[k].shape]
    parts = [
        f"{len(v)} {what}"
        for v, what in ((missing, "missing"), (unexpected, "unexpected"), (shapes, "of another shape"))
        if v
    ]
    return ", ".join(parts) + (f", e.g. {sorted([*missing, *unexpected, *shapes])[0]}" if parts else "")


def site_round(
    job: Job,
    global_state: dict[str, torch.Tensor],
    folder: str | Path,
    server_round: int,
    limits: SiteLimits = SiteLimits(),
    device: str = "cpu",
    local_file: Path | None = None,
    num_workers: int = 0,
    privacy: SitePrivacy = SitePrivacy(),
    ledger_dir: Path | None = None,
    rounds: int = 1,
    split_seed: int = 0,
) -> RoundResult:
    """Evaluate the global model on the local validation split, train (`job.local_epochs` or `local_steps`)
    with the job's recipe (`job.train`, its schedule at round `server_round` of `rounds`), evaluate again.

    Args:
        global_state: the server's full model state (shared and frozen parameters).
        server_round: the round number (seeds the local data order; where the round is in the schedule).
        privacy: the site's privacy terms (DP required, delta, budget per dataset).
        ledger_dir: the site's privacy ledger (needed by jobs with differential privacy).
        rounds: the rounds the job plans (the schedule and the DP noise cover all of them).
        local_file: where the site keeps its site-local parameters between rounds.
        num_workers, split_seed: the site's data loading and its split (as in echocare-finetune's `data`).

    Raises:
        JobRefused: the job does not fit the site's dataset or limits.
        DatasetInvalidError: the dataset fails the verifier.
    """
    folder = Path(folder)
    spec = check_dataset(folder)
    rows = {s: split_rows(folder, s, split_seed) for s in ("train", "val")}
    reasons = check_job(job, spec, limits, len(rows["train"]), privacy)
    if reasons:
        raise JobRefused("; ".join(reasons))
    if not 1 <= server_round <= rounds:
        raise JobRefused(f"round {server_round} of a job of {rounds} rounds")
    federation_job = job_hash(job)  # what the site's ledger and the coordinator know the job by
    task = task_for(job, spec) if job.tasks else None  # (index, this site's single-task job)
    heads_local = bool(task) and job.heads == "local"
    if task:
        job, global_state = task[1], task_view(global_state, task[0])
    if not rows["train"] or not rows["val"]:
        raise JobRefused(f"the site needs train and val samples (has {len(rows['train'])} and {len(rows['val'])})")
    torch.manual_seed(hash((job.seed, server_round)) & 0x7FFFFFFF)
    model = _task_model(job)
    own = model.state_dict()
    expected = {k: v for k, v in own.items() if not (heads_local and k.startswith("head."))}  # local heads: not sent
    mismatch = _mismatch(expected, global_state)
    if mismatch:
        raise JobRefused(f"the global weights do not fit the job's model ({mismatch})")
    model.load_state_dict(global_state, strict=False)  # checked above: only a local head is missing
    if local_file is not None and local_file.is_file():
        kept = load_file(str(local_file))
        if _mismatch({k: v for k, v in own.items() if _is_local(k, job)}, kept):
            raise JobRefused(
                f"the layers this site kept for the job do not fit its model (did its dataset change?); "
                f"remove {local_file.name} from state_dir/local_layers to start them anew"
            )
        model.load_state_dict(kept, strict=False)
    elif heads_local:
        log.info("round %d: no kept layers of this job at the site: its %s head starts anew", server_round, job.task)
    model.to(device)
    enc, tok, t, dev = job.encoder, job.tokenizer, job.train, torch.device(device)
    physical = device_batch(t.batch_size, limits.max_batch_size)
    sets = split_datasets(folder, spec, rows, enc, job.seed, job.frames, tok, job.report.views)
    before = evaluate(model, sets["val"], dev, job.num_outputs, physical, num_workers)
    n = len(sets["train"])
    steps = steps_per_round(job.local_epochs, job.local_steps, t.batch_size, n)
    recipe = Recipe.build(model, t, n, steps * rounds, steps * (server_round - 1))  # the job's schedule, this round
    base_loss = get_task(job.task).loss(spec, (0.0, 1.0), tok, job.report)
    anchor = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = base_loss(out, target)
        if job.proximal_mu > 0:  # FedProx: stay near the global model
            prox = sum((p - anchor[n]).pow(2).sum() for n, p in model.named_parameters() if p.requires_grad)
            loss = loss + job.proximal_mu / 2 * prox
        return loss

    if t.privacy.on:
        losses, unread, spent = _train_private(
            job,
            model,
            recipe,
            loss_fn,
            sets["train"],
            server_round,
            steps,
            rounds,
            privacy,
            ledger_dir,
            dev,
            num_workers,
            federation_job,
            limits.max_batch_size,
        )
    else:
        losses, unread, spent = [], 0, {}
        for keys in _local_passes(job, n, server_round):
            batch_losses, skipped = train_epoch(
                model,
                task_loader(sets["train"], keys, t.batch_size, num_workers),
                recipe,
                loss_fn,
                dev,
                max_batch=limits.max_batch_size,
            )
            losses, unread = losses + batch_losses, unread + skipped
    if unread:
        log.warning(
            "round %d: %d training samples could not be read (echocare-data verify names them)", server_round, unread
        )
    after = evaluate(model, sets["val"], dev, job.num_outputs, physical, num_workers)
    if local_file is not None and job.local:
        _save_local(model, job, local_file, server_round)
    state = model.state_dict()
    shared = {n: state[n].detach().cpu() for n in shared_names(model, job)}
    if task:
        shared = server_names(shared, task[0])
    metrics = {
        "train_loss": float(np.mean(losses)) if losses else float("nan"),
        "train_steps": float(len(losses)),  # a DP round's `spent` says instead how many steps its ledger paid for
        "train_unreadable": float(unread),
        "lr": recipe.optimizer.param_groups[0]["lr"],
        "val_samples": float(len(rows["val"])),
        **({"task_index": float(task[0])} if task else {}),
        **spent,
        **{f"global_{k}": v for k, v in before.items()},
        **{f"local_{k}": v for k, v in after.items()},
    }
    log.info("round %d: trained on %d samples, %d shared tensors", server_round, len(rows["train"]), len(shared))
    return RoundResult(shared, len(rows["train"]), metrics)
