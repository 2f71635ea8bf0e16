"""Report generation in a federation: two sites share the adapters and the decoder, in process and over the real
Flower runtime; the coordinator's checkpoint writes reports with the byte-level tokenizer; a report site in a
multi-task job."""

import dataclasses
import json

import pytest
from conftest import TINY_ENCODER

from echocare_core.checkpoint import read_meta
from echocare_core.cli.predict import main as predict_main
from echocare_core.config import to_dict
from echocare_core.data.contract import load_spec
from echocare_core.data.text import ReportTokenizer
from echocare_core.engine.evaluate import evaluate_checkpoint
from echocare_core.engine.training import LocalTraining
from echocare_core.federation.job import Job, TaskSpec, check_job, job_hash
from echocare_core.federation.rounds import aggregate, initial_state, save_round
from echocare_core.federation.runtime.testbed import run_on_this_machine
from echocare_core.federation.site import site_round
from echocare_core.federation.site_terms import SiteLimits
from echocare_core.models.report import ReportHeadConfig
from echocare_core.models.swin import EncoderConfig
from echocare_core.synthetic.dataset import write_dataset

pytestmark = pytest.mark.slow

FINDINGS = ("anechoic", "irregular margin")
JOB = Job(
    task="report",
    encoder=EncoderConfig(**TINY_ENCODER),
    report=ReportHeadConfig(width=32, depth=1, heads=4, max_tokens=48, findings=FINDINGS),
    train=LocalTraining(mode="lora", lora_rank=2, batch_size=4, lr=3e-3),
)


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("report"), "report", sites=2, per_site=10, size=64, seed=3)


def test_report_jobs_keep_other_jobs_hashes_and_round_trip():
    assert "report" not in json.loads(Job().to_json())  # a single-task job of another task keeps its hash
    assert Job.from_json(JOB.to_json()) == JOB and json.loads(JOB.to_json())["report"]["max_tokens"] == 48
    assert job_hash(JOB) != job_hash(dataclasses.replace(JOB, report=ReportHeadConfig(width=64, heads=4)))
    plain = dataclasses.replace(JOB, report=ReportHeadConfig(width=32, depth=1, heads=4, max_tokens=48))
    # a job's JSON (and hash) names only what differs from the defaults
    assert json.loads(plain.to_json())["report"] == {"width": 32, "depth": 1, "heads": 4, "max_tokens": 48}
    assert Job.from_json(plain.to_json()) == plain and json.loads(JOB.to_json())["report"]["findings"] == list(FINDINGS)


def test_the_coordinator_is_warned_of_a_report_job_without_findings(caplog):
    from server.config import FederationConfig, ServerSettings

    FederationConfig(server=ServerSettings(insecure=True), job=JOB)
    assert "findings" not in caplog.text
    FederationConfig(server=ServerSettings(insecure=True), job=dataclasses.replace(JOB, report=ReportHeadConfig()))
    assert "job.report has no findings" in caplog.text


def test_reports_train_with_differential_privacy_per_report_and_ghost_clipping_is_refused(sites, tmp_path):
    from echocare_core.config import load_config
    from echocare_core.engine.finetune import run_finetune
    from echocare_core.engine.finetune_config import FinetuneConfig
    from echocare_core.privacy.settings import DPSettings

    assert (
        check_job(
            dataclasses.replace(JOB, train=dataclasses.replace(JOB.train, privacy=DPSettings(epsilon=8.0))),
            load_spec(sites[0]),
            SiteLimits(),
        )
        == []
    )
    (reason,) = check_job(
        dataclasses.replace(JOB, train=dataclasses.replace(JOB.train, privacy=DPSettings(epsilon=8.0, mode="ghost"))),
        load_spec(sites[0]),
        SiteLimits(),
    )
    assert reason == "job train.privacy.mode ghost cannot clip a report's views as one sample (use mode hooks)"
    cfg = {
        "output": str(tmp_path / "run"),
        "device": "cpu",
        "data": {"folder": str(sites[0]), "num_workers": 0},
        "model": {"encoder": dict(TINY_ENCODER), "report": {"width": 32, "heads": 4, "depth": 1, "views": 2}},
        "epochs": 1,
        "train": {"batch_size": 4, "privacy": {"epsilon": 8.0}},
        "ledger": {"folder": str(tmp_path / "ledger")},
    }
    result = run_finetune(load_config(FinetuneConfig, None, [], base=cfg))  # every step checks per-report gradients
    assert result.status == "finished" and 0 < result.history[-1]["epsilon"] <= 8.0


def test_two_report_sites_train_a_federated_model_whose_checkpoint_writes_reports(sites, tmp_path):
    assert all(check_job(JOB, load_spec(f), SiteLimits()) == [] for f in sites)
    state = initial_state(JOB, None)
    results = [site_round(JOB, state, folder, 1) for folder in sites]
    shared = set(results[0].shared)
    assert shared == set(results[1].shared) and "head.findings.weight" in shared  # the job's findings classifier
    assert any(".lora_" in n for n in shared) and not any(n.endswith("attn.qkv.weight") for n in shared)
    for r in results:
        assert r.metrics["train_loss"] > 0 and 0 <= r.metrics["local_bleu1"] <= 1
        assert 0 <= r.metrics["local_finding_accuracy"] <= 1  # the site's declared findings, scored at the site
    new, _ = aggregate(state, [(r.shared, r.samples) for r in results], JOB)
    ev = evaluate_checkpoint(save_round(tmp_path, JOB, new, 1, {}, []), sites[0], "val", rounds=20)
    assert ev["main_metric"] == "bleu4" and {"meteor", "rouge_l", "finding_f1"} <= set(ev["metrics"])


def test_a_report_site_joins_a_multi_task_federation(sites, tmp_path):
    seg = write_dataset(tmp_path / "seg", "segmentation", sites=1, per_site=8, size=64, seed=3)[0]
    job = dataclasses.replace(
        JOB, task="multitask", tasks=(TaskSpec("segmentation", labels=(0, 1)), TaskSpec("report")), feature_size=8
    )
    state = initial_state(job, None)
    a, b = (
        site_round(job, state, f, 1, local_file=tmp_path / f"{i}.safetensors") for i, f in enumerate((seg, sites[0]))
    )
    encoder = {n for n in a.shared if n.startswith("encoder.")}
    assert encoder == {n for n in b.shared if n.startswith("encoder.")} and b.metrics["task_index"] == 1.0
    assert set(b.shared) - encoder == {n for n in state if n.startswith("heads.1.")}  # the report decoder, shared
    assert "global_bleu4" in b.metrics


def test_two_report_sites_over_the_real_runtime(sites, tmp_path):
    fed = {
        "output": str(tmp_path / "run"),
        "server": {"insecure": True},
        "rounds": {"rounds": 1, "min_sites": 2, "wait_for_sites": 300, "deadline": 600},
        "job": to_dict(JOB),
    }
    assert run_on_this_machine(tmp_path, {"a": sites[0], "b": sites[1]}, fed, show_server=False) == 0
    (rnd,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {s["site"]: s["metric"] for s in rnd["sites"]} == {"a": "bleu4", "b": "bleu4"}
    assert all(0 <= s["local_bleu4"] <= 1 and "local_finding_f1" in s for s in rnd["sites"])
    checkpoint = tmp_path / "run" / "checkpoints" / "round_0001"
    assert read_meta(checkpoint)["head"]["tokenizer"] == ReportTokenizer().to_str()
    assert "bleu4" in (tmp_path / "run" / "report.md").read_text()
    assert (
        predict_main(
            [
                "--checkpoint",
                str(checkpoint),
                "--input",
                str(sites[0] / "images"),
                "--out",
                str(tmp_path / "reports"),
                "--beam",
                "1",
            ]
        )
        == 0
    )
