"""Multi-task jobs without Flower: sites with different tasks share the encoder's trained part; the sites of a task
share its head (heads: shared) or each keeps its own (heads: local)."""

import dataclasses
import json
import math

import pytest
import torch
from conftest import TINY_ENCODER
from safetensors import safe_open
from safetensors.torch import load_file

from echocare_core.checkpoint import build_from_checkpoint, load_weights, read_meta
from echocare_core.config import ConfigError, to_dict
from echocare_core.data.contract import load_spec
from echocare_core.engine.evaluate import evaluate_checkpoint
from echocare_core.engine.training import LocalTraining
from echocare_core.federation.job import JOB_SCHEMA, Job, TaskSpec, check_job, job_hash, shared_names, task_for
from echocare_core.federation.rounds import aggregate, initial_state, save_best, save_round, site_model
from echocare_core.federation.runtime.testbed import run_on_this_machine
from echocare_core.federation.site import JobRefused, build_job_model, local_layers_file, site_round
from echocare_core.federation.site_terms import SiteLimits
from echocare_core.federation.strategies import StrategyConfig
from echocare_core.models.swin import EncoderConfig
from echocare_core.privacy.ledger import PrivacyLedger
from echocare_core.privacy.settings import DPSettings
from echocare_core.synthetic.dataset import write_dataset

TASKS = (
    TaskSpec("segmentation", labels=(0, 1)),
    TaskSpec("classification", classes=("benign", "malignant")),
    TaskSpec("regression"),
)
JOB = Job(
    task="multitask",
    tasks=TASKS,
    encoder=EncoderConfig(**TINY_ENCODER),
    feature_size=8,
    frames=2,
    train=LocalTraining(mode="lora", lora_rank=2, batch_size=4),
)
LOCAL = dataclasses.replace(JOB, heads="local")
HEADS = ("head.",)


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    root = tmp_path_factory.mktemp("multitask")
    return [
        write_dataset(root / task, task, sites=1, per_site=8, size=64, seed=3)[0]
        for task in ("segmentation", "classification", "regression", "landmarks")
    ]


def test_a_multi_task_job_needs_two_different_tasks_and_something_to_share():
    for bad, match in (
        (dict(tasks=TASKS[:1]), "two or more different tasks"),
        (dict(tasks=(TASKS[0], TASKS[0])), "two or more different tasks"),
        (dict(tasks=(*TASKS, TaskSpec("segmentation", labels=(1, 0)))), "two or more different tasks"),
        (dict(task="segmentation"), "single-task job lists none"),
        (dict(train=LocalTraining(mode="frozen")), "nothing would be shared"),
        (dict(task="segmentation", tasks=(), heads="local"), "single-task job keeps its head at the sites"),
        (dict(heads="site"), "shared .among the sites of each task. or local"),
    ):
        with pytest.raises(ValueError, match=match):
            dataclasses.replace(JOB, **bad)
    with pytest.raises(ConfigError, match=r"job.tasks\[1\]: unknown task 'segmentaton'.*Did you mean 'segmentation'"):
        Job.from_json(
            f'{{"schema": {JOB_SCHEMA}, "task": "multitask", "tasks": [{{"task": "regression"}}, {{"task": "segmentaton"}}]}}'
        )
    assert Job.from_json(JOB.to_json()) == JOB
    assert json.loads(Job().to_json()) == {"schema": JOB_SCHEMA}  # values at their defaults leave the hash alone


def test_each_site_runs_the_task_its_dataset_declares_and_others_are_refused_with_the_tasks_named(sites):
    specs = [load_spec(folder) for folder in sites]
    assert [task_for(JOB, spec)[0] if task_for(JOB, spec) else None for spec in specs] == [0, 1, 2, None]
    assert [check_job(JOB, spec, SiteLimits()) for spec in specs[:3]] == [[], [], []]
    (reason,) = check_job(JOB, specs[3], SiteLimits())
    assert reason == (
        "none of the job's tasks (segmentation [0, 1]; classification ['benign', 'malignant']; "
        "regression) matches the site's dataset (landmarks 4)"
    )
    with pytest.raises(JobRefused, match="none of the job's tasks"):
        site_round(JOB, initial_state(JOB, None), sites[3], 1)
    private = dataclasses.replace(JOB, train=dataclasses.replace(JOB.train, privacy=DPSettings(epsilon=4.0)))
    assert check_job(private, specs[2], SiteLimits()) == []  # clips train with DP, a clip's frames as one sample
    ghost = dataclasses.replace(
        JOB, train=dataclasses.replace(JOB.train, privacy=DPSettings(epsilon=4.0, mode="ghost"))
    )
    assert check_job(ghost, specs[2], SiteLimits()) == [
        "job train.privacy.mode ghost cannot clip a clip's frames as one sample (use mode hooks)"
    ]


def test_the_sites_of_a_task_share_its_head_and_all_sites_the_encoder(sites):
    state = initial_state(JOB, None)
    assert {k.split(".")[1] for k in state if k.startswith("heads.")} == {"0", "1", "2"}  # one head per task
    seg, cls = (site_round(JOB, state, folder, 1) for folder in sites[:2])
    encoder = {k for k in seg.shared if k.startswith("encoder.")}
    assert encoder and all(".lora_" in k for k in encoder)
    assert set(seg.shared) - encoder == {k for k in state if k.startswith("heads.0.")}  # its task's trained head
    assert set(cls.shared) - encoder == {k for k in state if k.startswith("heads.1.")}
    moved = lambda r, k: not torch.equal(r.shared[k], state[k])  # noqa: E731
    assert any(moved(seg, k) for k in seg.shared if k.startswith("heads.0."))  # it trained the server's head
    other = {k: v + 1 for k, v in seg.shared.items()}  # a second segmentation site, with other values
    new, _ = aggregate(state, [(seg.shared, 3), (other, 1), (cls.shared, 2)], JOB, StrategyConfig("fedavg"))
    for k in encoder:  # the encoder over all three sites
        mean = (3 * seg.shared[k].double() + 1 * other[k].double() + 2 * cls.shared[k].double()) / 6
        torch.testing.assert_close(new[k].double(), mean)
    for k in (k for k in seg.shared if k.startswith("heads.0.")):  # the segmentation head over its two sites
        torch.testing.assert_close(new[k].double(), (3 * seg.shared[k].double() + other[k].double()) / 4)
    for k in (k for k in cls.shared if k.startswith("heads.1.")):
        torch.testing.assert_close(new[k], cls.shared[k])
    assert all(torch.equal(new[k], v) for k, v in state.items() if k.startswith("heads.2."))  # no regression site
    still = dataclasses.replace(JOB, train=dataclasses.replace(JOB.train, lr=1e-12))  # round 2 barely moves: it
    again = site_round(still, new, sites[0], 2, rounds=2)  # starts from the aggregated head
    for k in (k for k in again.shared if k.startswith("heads.0.")):
        torch.testing.assert_close(again.shared[k], new[k], rtol=0, atol=1e-6)


def test_with_local_heads_sites_send_only_the_shared_encoder_and_keep_their_heads_across_rounds(sites, tmp_path):
    state = initial_state(LOCAL, None)
    assert state and not any(k.startswith("head.") for k in state)  # the server holds no head
    local = [tmp_path / f"local_{i}.safetensors" for i in range(3)]
    results = [site_round(LOCAL, state, folder, 1, local_file=file) for folder, file in zip(sites, local)]
    names = [set(r.shared) for r in results]
    assert names[0] == names[1] == names[2] and all(".lora_" in n for n in names[0])
    assert not any(n.startswith(HEADS) for n in names[0])
    assert [r.metrics["task_index"] for r in results] == [0.0, 1.0, 2.0]
    heads = [load_file(str(f)) for f in local]  # each site's own head, at the site
    assert all(h and all(k.startswith(HEADS) for k in h) for h in heads)
    assert {k for k in heads[0] if k.startswith("head.")}.isdisjoint({k for k in heads[1] if k.startswith("head.")})
    new, _ = aggregate(state, [(r.shared, r.samples) for r in results], LOCAL, StrategyConfig("fedavg"))
    assert new.keys() == state.keys()  # heads were never part of the aggregation
    frozen = [k for k in state if k not in names[0]]
    assert frozen and all(torch.equal(new[k], state[k]) for k in frozen)
    weights = torch.tensor([float(r.samples) for r in results])
    for name in names[0]:
        mean = sum(w * r.shared[name].double() for w, r in zip(weights / weights.sum(), results))
        torch.testing.assert_close(new[name].double(), mean)
    still = dataclasses.replace(LOCAL, train=dataclasses.replace(LOCAL.train, lr=1e-12))  # round 2 barely moves: it
    site_round(still, new, sites[1], 2, local_file=local[1], rounds=2)  # must start from the site's own head
    kept = load_file(str(local[1]))
    assert kept.keys() == heads[1].keys()
    for k in kept:
        torch.testing.assert_close(kept[k], heads[1][k], rtol=0, atol=1e-6)


def test_a_site_makes_its_own_model_from_the_shared_encoder_and_its_local_head(sites, tmp_path):
    state = initial_state(LOCAL, None)
    result = site_round(LOCAL, state, sites[1], 1, local_file=local_layers_file(tmp_path / "state", job_hash(LOCAL)))
    new, _ = aggregate(state, [(result.shared, result.samples)], LOCAL)
    path = save_round(tmp_path / "run", LOCAL, new, 1, {}, [])
    meta = read_meta(path)
    assert meta["model_kind"] == "shared_encoder" and [t["task"] for t in meta["tasks"]] == [t.task for t in TASKS]
    assert not any(k.startswith("head.") for k in load_weights(path))
    with pytest.raises(ValueError, match="echocare-client model --config site.yaml"):
        evaluate_checkpoint(path, sites[1], "val")
    with pytest.raises(ValueError, match="keeps no layers of that job"):
        site_model(path, sites[1], tmp_path / "other_state", tmp_path / "nothing")
    with pytest.raises(ValueError, match="matches none of the tasks"):
        site_model(path, sites[3], tmp_path / "state", tmp_path / "nothing")
    later = save_round(tmp_path / "run", LOCAL, new, 2, {}, [])
    with pytest.raises(ValueError, match="global model of round 2, but this site's layers are from round 1"):
        site_model(later, sites[1], tmp_path / "state", tmp_path / "nothing")
    mine, scores = site_model(path, sites[1], tmp_path / "state", tmp_path / "mine")
    assert scores == {}
    model, own = build_from_checkpoint(mine)
    weights = model.state_dict()
    head = load_file(str(local_layers_file(tmp_path / "state", job_hash(LOCAL))))
    assert own["task"] == "classification" and own["head"]["classes"] == ["benign", "malignant"]
    assert all(torch.equal(weights[k], v) for k, v in head.items())
    assert all(torch.equal(weights[k], v) for k, v in new.items() if k not in head)
    assert 0 <= evaluate_checkpoint(mine, sites[1], "val")["metrics"]["accuracy"] <= 1
    assert not (tmp_path / "nothing").exists()
    personal, scores = site_model(path, sites[1], tmp_path / "state", tmp_path / "personal", personalise=1)
    assert {"global_accuracy", "local_accuracy"} <= set(scores)  # the site's validation split, before and after
    tuned, meta = build_from_checkpoint(personal)
    assert meta["site_model_of"]["personalised_epochs"] == 1 and meta["metrics"].keys() == scores.keys()
    changed = [k for k, v in tuned.state_dict().items() if not torch.equal(v, weights[k])]
    assert any(k.startswith("head.") for k in changed) and any(".lora_" in k for k in changed)


def test_a_site_makes_its_own_model_from_a_checkpoint_with_shared_heads_alone(sites, tmp_path):
    state = initial_state(JOB, None)
    result = site_round(JOB, state, sites[1], 1)
    new, _ = aggregate(state, [(result.shared, result.samples)], JOB)
    path = save_round(tmp_path / "run", JOB, new, 1, {}, [])
    assert {k.split(".")[1] for k in load_weights(path) if k.startswith("heads.")} == {"0", "1", "2"}
    mine, _ = site_model(path, sites[1], tmp_path / "never_took_part", tmp_path / "mine")
    model, own = build_from_checkpoint(mine)
    weights = model.state_dict()
    assert own["task"] == "classification" and not any(k.startswith("heads.") for k in weights)
    assert all(
        torch.equal(weights[f"head.{k[len('heads.1.') :]}"], v) for k, v in new.items() if k.startswith("heads.1.")
    )
    assert 0 <= evaluate_checkpoint(mine, sites[1], "val")["metrics"]["accuracy"] <= 1


@pytest.mark.slow
def test_a_two_site_multi_task_federation_over_the_real_runtime_shares_each_head_with_its_task_only(sites, tmp_path):
    job = dataclasses.replace(JOB, tasks=TASKS[:2], train=dataclasses.replace(JOB.train, lora_rank=2))
    fed = {
        "output": str(tmp_path / "run"),
        "server": {"insecure": True},
        "rounds": {"rounds": 2, "min_sites": 2, "wait_for_sites": 300, "deadline": 600},
        "job": to_dict(job),
    }
    assert run_on_this_machine(tmp_path, {"seg": sites[0], "cls": sites[1]}, fed, show_server=False) == 0
    shared = set(shared_names(build_job_model(job), job))
    encoder = {k for k in shared if k.startswith("encoder.")}
    own = {
        "seg": encoder | {k for k in shared if k.startswith("heads.0.")},
        "cls": encoder | {k for k in shared if k.startswith("heads.1.")},
    }
    assert encoder and own["seg"] != encoder != own["cls"]
    for site in ("seg", "cls"):  # what left each site: the encoder's adapters and its task's head, in bf16 deltas
        for rnd in (1, 2):
            with safe_open(str(tmp_path / "site_state" / site / "sent" / f"round_{rnd:04d}.safetensors"), "pt") as f:
                assert set(f.keys()) == own[site]
        assert not (tmp_path / "site_state" / site / "local_layers").exists()  # nothing of the job kept apart
    audit = [json.loads(line) for line in (tmp_path / "run" / "audit.jsonl").read_text().splitlines()]
    received = [(e["site"], set(e["sent"]["tensors"])) for e in audit if e["event"] == "reply"]
    assert len(received) == 4 and all(names == own[site] for site, names in received)
    assert shared <= set(load_weights(tmp_path / "run" / "checkpoints" / "round_0002"))
    rounds = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [{s["site"]: (s["task"], s["metric"]) for s in r["sites"]} for r in rounds] == [
        {"seg": ("segmentation", "dice"), "cls": ("classification", "auc")}
    ] * 2
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| seg | segmentation |" in report and "| cls | classification |" in report


def test_a_private_multi_task_round_is_paid_under_the_federations_job_hash(sites, tmp_path):
    job = dataclasses.replace(
        JOB, tasks=TASKS[:2], train=dataclasses.replace(JOB.train, privacy=DPSettings(epsilon=8.0))
    )
    result = site_round(job, initial_state(job, None), sites[1], 1, ledger_dir=tmp_path / "privacy", rounds=2)
    assert 0 < result.metrics["epsilon"] < 8.0 and all(k.startswith(("encoder.", "heads.1.")) for k in result.shared)
    (spends,) = PrivacyLedger(tmp_path / "privacy").datasets.values()
    assert [s["job"] for s in spends] == [job_hash(job)]


def test_the_best_multi_task_model_is_better_on_one_task_and_worse_on_none(tmp_path):
    job = dataclasses.replace(JOB, tasks=TASKS[:2])
    state = initial_state(job, None)
    for rnd in (1, 2, 3, 4):
        save_round(tmp_path, job, state, rnd, {}, [], keep=10)

    def scored(rnd, dice, auc):  # round `rnd` scores the model of round rnd - 1
        sites = [
            {"task_index": 0.0, "global_dice": dice, "val_samples": 3.0},
            {"task_index": 1.0, "global_auc": auc, "val_samples": 2.0},
            {"task_index": 1.0, "global_auc": math.nan, "val_samples": 9.0},
        ]
        return save_best(tmp_path, job, [{"round": rnd, "sites": sites}])

    assert scored(2, 0.5, 0.6) is not None
    assert scored(3, 0.7, 0.55) is None  # better Dice, worse AUC: not better
    assert scored(4, 0.5, 0.65) is not None  # as good on one, better on the other
    meta = read_meta(tmp_path / "checkpoints" / "best")
    assert meta["round"] == 3 and meta["metrics"]["scores"] == {"0": 0.5, "1": 0.65}


def test_an_enhancement_site_joins_a_multi_task_federation(sites, tmp_path):
    enhance = write_dataset(tmp_path / "enh", "enhancement", sites=1, per_site=8, size=64, seed=3)[0]
    job = dataclasses.replace(JOB, tasks=(TASKS[0], TaskSpec("enhancement")))
    state = initial_state(job, None)
    seg, enh = (
        site_round(job, state, f, 1, local_file=tmp_path / f"{i}.safetensors")
        for i, f in enumerate((sites[0], enhance))
    )
    assert {k for k in seg.shared if k.startswith("encoder.")} == {k for k in enh.shared if k.startswith("encoder.")}
    assert enh.metrics["task_index"] == 1.0 and any(k.startswith("heads.1.") for k in enh.shared)
    assert -1 <= enh.metrics["global_ssim"] <= 1 and enh.metrics["local_psnr"] > 0  # SSIM of a random head may be < 0
