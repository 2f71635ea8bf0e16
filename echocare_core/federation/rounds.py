"""The coordinator's side of a federated run, without Flower: the initial model, aggregation, and round
checkpoints that `echocare-evaluate` and `echocare-predict` load like any fine-tuned checkpoint. A multi-task
job's checkpoints hold the shared encoder and the shared heads (`model_kind` "shared_encoder"); `site_model`
gives a site its own model: a global checkpoint with its task's head and the layers the site kept (a local
head, the job's `local` layers)."""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from echocare_core.checkpoint import (
    latest_checkpoint,
    load_train_state,
    load_weights,
    prune_checkpoints,
    read_meta,
    save_checkpoint,
)
from echocare_core.config import from_dict, to_dict
from echocare_core.data.contract import DatasetSpec, load_spec
from echocare_core.federation.job import Job, job_hash, local_patterns, task_for, task_jobs, task_of, task_view
from echocare_core.federation.site import build_job_model, local_layers_file, site_round
from echocare_core.federation.site_terms import SiteLimits
from echocare_core.federation.strategies import StrategyConfig, aggregate_updates
from echocare_core.privacy.settings import DPSettings, steps_per_round
from echocare_core.tasks import get_task
from echocare_core.tasks.base import InputSpec, TaskHead
from echocare_core.tasks.model import FinetuneMode, TaskMeta
from echocare_core.weights import load_encoder_weights

__all__ = [
    "aggregate",
    "choose_sites",
    "initial_state",
    "outlier_reasons",
    "resume",
    "save_best",
    "save_round",
    "site_model",
]

ServerState = dict[str, torch.Tensor]

log = logging.getLogger(__name__)


def initial_state(job: Job, init: str | None, partial: bool = False) -> dict[str, torch.Tensor]:
    """The round-0 global model: random with the job's seed, the encoder from `init` when given (all of it,
    unless `partial`)."""
    torch.manual_seed(job.seed)
    model = build_job_model(job)
    if init:
        load_encoder_weights(model.encoder, init, partial)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def aggregate(
    state: dict[str, torch.Tensor],
    updates: list[tuple[dict[str, torch.Tensor], int]],
    job: Job,
    strategy: StrategyConfig = StrategyConfig(),
    server_state: ServerState | None = None,
) -> tuple[dict[str, torch.Tensor], ServerState]:
    """The next global state (the strategy's new shared parameters, the rest unchanged) and server state.

    The sites' local steps (for fednova) follow from `job` and each update's sample count: the coordinator
    knows them better than a site could report them. Under DP, fednova steps 1 unless `server_lr` says otherwise
    (`StrategyConfig.private`). A multi-task job's shared heads are aggregated over the
    sites of their task (a head no site of its task trained in this round stays as it was).
    """
    steps = [steps_per_round(job.local_epochs, job.local_steps, job.train.batch_size, n) for _, n in updates]
    new, server_state = {}, dict(server_state or {})
    strategy = strategy.private(job.train.privacy.on)
    groups: dict[int | None, list[int]] = {}
    for i, (update, _) in enumerate(updates):
        for index in {task_of(name) for name in update}:
            groups.setdefault(index, []).append(i)
    for index, members in groups.items():
        part = [({k: v for k, v in updates[i][0].items() if task_of(k) == index}, updates[i][1]) for i in members]
        shared, server_state = aggregate_updates(strategy, state, part, server_state, [steps[i] for i in members])
        new.update(shared)
    return {**state, **new}, server_state


def outlier_reasons(
    state: dict[str, torch.Tensor], updates: list[tuple[dict[str, torch.Tensor], int]], max_ratio: float
) -> list[str]:
    """Why each update is left out ("" to keep it): its distance from the global model is more than `max_ratio`
    times the median distance of the round's updates (a scaled or broken update). Needs 3 updates or more;
    `max_ratio` 0 turns it off."""
    dists = [math.sqrt(sum(float((u[n].double() - state[n].double()).pow(2).sum()) for n in u)) for u, _ in updates]
    if max_ratio <= 0 or len(dists) < 3:
        return [""] * len(dists)
    median = float(np.median(dists))
    return [
        f"its update norm {d:.3g} is {d / median:.1f} times the round's median {median:.3g} (limit {max_ratio:g})"
        if median > 0 and d > max_ratio * median
        else ""
        for d in dists
    ]


def choose_sites(nodes: list[int], participation: float, minimum: int, seed: int, server_round: int) -> list[int]:
    """The sites asked in this round: a `participation` share of `nodes` (at least `minimum`, at most all),
    drawn from (seed, round) so that a resumed run asks the same sites."""
    count = min(len(nodes), max(minimum, math.ceil(participation * len(nodes))))
    picked = np.random.default_rng([seed, server_round]).choice(len(nodes), size=count, replace=False)
    return [sorted(nodes)[i] for i in sorted(picked)]


def _meta(job: Job, server_round: int, metrics: dict[str, Any], spec: DatasetSpec | None = None) -> dict[str, Any]:
    """A round checkpoint's metadata: a task model's (`TaskMeta`), or a multi-task job's shared encoder's. The
    names of the head's classes, mask values and points are the site's where `spec` is given (a site's own model),
    else unknown (the job declares mask values and a count of points only)."""
    common = {"epoch": server_round, "round": server_round, "metrics": metrics, "job_hash": job_hash(job)}
    mode = FinetuneMode(job.train.mode, job.train.lora_rank, job.train.lora_alpha)
    if job.tasks:  # one head per task, or none (local heads)
        return {
            "model_kind": "shared_encoder",
            "task": job.task,
            "encoder": to_dict(job.encoder),
            "job": to_dict(job),
            "finetune": to_dict(mode),
            "tasks": [to_dict(t) for t in job.tasks],
            **common,
        }
    report = job.task == "report"
    head = TaskHead(
        num_classes=job.num_outputs,
        feature_size=job.feature_size,
        decoder=job.decoder,
        multi_label=job.multi_label,
        classes=job.classes,
        labels={str(v): spec.labels.get(v, "") if spec else "" for v in job.labels},
        landmark_names=spec.landmark_names if spec else (),
        target_name=spec.target_name if spec else "target",
        report=job.report if report else None,
        tokenizer=job.tokenizer.to_str() if report else "",
        findings=spec.findings if spec and report else (),
    )
    return TaskMeta(
        task=job.task,
        encoder=job.encoder,
        head=head,
        finetune=mode,
        input=InputSpec(**job.encoder.input_spec, frames=job.frames),
        job=to_dict(job),
        **common,
    ).to_meta()


def save_round(
    out: Path,
    job: Job,
    state: dict[str, torch.Tensor],
    server_round: int,
    metrics: dict[str, Any],
    history: list[dict[str, Any]],
    server_state: ServerState | None = None,
    keep: int = 2,
) -> Path:
    """Checkpoint the global model, the strategy's state and the history after a round
    (`out/checkpoints/round_N`, the last `keep` kept)."""
    model = build_job_model(job)
    model.load_state_dict(state)
    path = save_checkpoint(
        out / "checkpoints" / f"round_{server_round:04d}",
        model,
        _meta(job, server_round, metrics),
        {"round": server_round, "history": history, "server_state": server_state or {}},
    )
    prune_checkpoints(out / "checkpoints", keep_last=keep, kind="round")
    return path


def _task_scores(job: Job, sites: list[dict[str, Any]]) -> dict[str, float]:
    """Per task of the job (by index): the mean of `global_<its main metric>` over its sites, weighted by their
    validation samples."""
    scores = {}
    for i, task in enumerate(task_jobs(job)):
        key = f"global_{get_task(task.task).main_metric}"
        scored = [
            (s[key], s.get("val_samples", 1.0))
            for s in sites
            if s.get("task_index", 0) == i and math.isfinite(s.get(key, math.nan))
        ]
        if sum(n for _, n in scored) > 0:
            scores[str(i)] = sum(v * n for v, n in scored) / sum(n for _, n in scored)
    return scores


def save_best(out: Path, job: Job, history: list[dict[str, Any]]) -> Path | None:
    """Make the previous round's global model `checkpoints/best` when it scored better than the one there.

    Its score (per task of a multi-task job) is the validation-sample-weighted mean of `global_<main metric>`,
    which the sites measured on their validation splits when they received that model in the round just
    finished (so the last round's model is scored only by a further round). It replaces the best model when it
    is at least as good on every task both were scored on and better on one: a multi-task model that gains on
    one task by losing on another does not. Returns the folder when it changed.
    """
    last = history[-1]
    scores, source = _task_scores(job, last["sites"]), out / "checkpoints" / f"round_{last['round'] - 1:04d}"
    if not scores or not source.is_dir():
        return None
    best = out / "checkpoints" / "best"
    if best.is_dir() and read_meta(best).get("job_hash") == job_hash(job):  # another job's best is replaced
        kept = read_meta(best)["metrics"]
        before = kept["scores"]
        lower = [get_task(t.task).lower_is_better for t in task_jobs(job)]
        gains = [
            before[t] - scores[t] if lower[int(t)] else scores[t] - before[t] for t in scores.keys() & before.keys()
        ]
        if not gains or min(gains) < 0 or max(gains) <= 0:
            return None
    model = build_job_model(job)
    model.load_state_dict(load_weights(source))
    meta = read_meta(source)
    return save_checkpoint(best, model, {**meta, "metrics": {**meta["metrics"], "scores": scores}})


def resume(out: Path, job: Job) -> tuple[dict[str, torch.Tensor], int, list[dict[str, Any]], ServerState] | None:
    """The global state, last round, history and strategy state of the newest round checkpoint under `out`.

    Raises:
        ValueError: the checkpoint belongs to another job (a different job hash).
    """
    last = latest_checkpoint(out / "checkpoints", kind="round")
    if last is None:
        return None
    if read_meta(last).get("job_hash") != job_hash(job):
        raise ValueError(
            f"{last} belongs to another job (its job hash differs); choose a new output folder or "
            f"restore that job's federation.yaml"
        )
    state = load_train_state(last)
    return load_weights(last), int(state["round"]), list(state["history"]), dict(state.get("server_state", {}))


PERSONAL_LR = 0.3  # personalisation trains at this share of the job's learning rate (bench/federated_quality.py)


def site_model(
    checkpoint: Path,
    data: Path,
    state_dir: Path,
    out: Path,
    personalise: int = 0,
    split_seed: int = 0,
    limits: SiteLimits = SiteLimits(),
) -> tuple[Path, dict[str, float]]:
    """Write this site's own model: the federation's global checkpoint with the layers the site kept for that job
    (its task's head in a multi-task job with local heads, the job's `local` layers), as a fine-tuned checkpoint for
    `echocare-evaluate` and `echocare-predict`; returns its path and, when personalised, the validation metrics
    of the global (`global_*`) and the personalised model (`local_*`).

    The site keeps its layers of the last round it took part in, which fit that round's global checkpoint only.
    `personalise` > 0: that many epochs of the job's recipe on the site's training split (at `PERSONAL_LR` of
    its learning rate, a cosine over those epochs, every trainable layer its own, in batches the site's `limits`
    hold). Without the job's DP: the model stays at the site.

    Raises:
        ValueError: not a federation checkpoint, the site's dataset matches none of the job's tasks, or the site
            holds no local layers of the job (it never took part in a round) or those of another round.
    """
    from safetensors import safe_open

    meta = read_meta(checkpoint)
    if not meta.get("job_hash") or not meta.get("job"):
        raise ValueError(f"{checkpoint} is not a checkpoint of a federated run (no job in its metadata)")
    job = from_dict(Job, meta["job"], f"{checkpoint} job")
    spec = load_spec(data)
    match = task_for(job, spec)
    if match is None:
        raise ValueError(
            f"the dataset {data} matches none of the tasks of the job of {checkpoint} "
            f"({'; '.join(j.task for j in task_jobs(job))})"
        )
    site_job, local = match[1], {}
    if local_patterns(job):
        file = local_layers_file(state_dir, job_hash(job))
        if not file.is_file():
            raise ValueError(
                f"{file} does not exist: this site keeps no layers of that job (it has not taken part "
                f"in one of its rounds with this state_dir)"
            )
        with safe_open(str(file), "pt") as f:
            kept = (f.metadata() or {}).get("round", "")
            local = {k: f.get_tensor(k) for k in f.keys()}
        if kept != str(meta["round"]):
            raise ValueError(
                f"{checkpoint} is the global model of round {meta['round']}, but this site's layers are "
                f"from round {kept or '(not recorded)'}: use the coordinator's checkpoint of that round"
            )
    state, scores = {**task_view(load_weights(checkpoint), match[0]), **local}, {}
    if personalise > 0:
        t = site_job.train
        own = replace(
            site_job,
            train=replace(t, lr=t.lr * PERSONAL_LR, warmup_epochs=0, privacy=DPSettings()),
            local=(),
            local_epochs=personalise,
            local_steps=0,
            proximal_mu=0.0,
        )
        result = site_round(own, state, data, 1, limits, split_seed=split_seed)
        state = {**state, **result.shared}
        scores = {k: v for k, v in result.metrics.items() if k.startswith(("global_", "local_"))}
    model = build_job_model(site_job)
    model.load_state_dict(state)
    path = save_checkpoint(
        out,
        model,
        {
            **_meta(site_job, meta["round"], scores or meta["metrics"], spec),
            "site_model_of": {
                "checkpoint_job_hash": meta["job_hash"],
                "round": meta["round"],
                "personalised_epochs": personalise,
            },
        },
    )
    return path, scores
