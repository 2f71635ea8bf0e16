"""Report generation in a federation, without Flower: two sites share the adapters and the decoder, the
coordinator's checkpoint writes reports with the byte-level tokenizer; a report site in a multi-task job."""

import dataclasses
import json

import pytest
from conftest import TINY_ENCODER

from echocare_core.data.contract import load_spec
from echocare_core.data.synthetic_dataset import write_dataset
from echocare_core.engine.evaluate import evaluate_checkpoint
from echocare_core.federation.job import Job, SiteLimits, TaskSpec, check_job, job_hash
from echocare_core.federation.rounds import aggregate, initial_state, save_round
from echocare_core.federation.site import site_round
from echocare_core.models.report import ReportHeadConfig
from echocare_core.models.swin import EncoderConfig

pytestmark = pytest.mark.slow

JOB = Job(task="report", encoder=EncoderConfig(**TINY_ENCODER), mode="lora", lora_rank=2, batch_size=4, lr=3e-3,
          report=ReportHeadConfig(width=32, depth=1, heads=4, max_tokens=48))


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("report"), "report", sites=2, per_site=10, size=64, seed=3)


def test_report_jobs_keep_other_jobs_hashes_and_round_trip():
    assert "report" not in json.loads(Job().to_json())  # a single-task job of another task keeps its hash
    assert Job.from_json(JOB.to_json()) == JOB and json.loads(JOB.to_json())["report"]["max_tokens"] == 48
    assert job_hash(JOB) != job_hash(dataclasses.replace(JOB, report=ReportHeadConfig(width=64, heads=4)))


def test_two_report_sites_train_a_federated_model_whose_checkpoint_writes_reports(sites, tmp_path):
    assert all(check_job(JOB, load_spec(f), SiteLimits()) == [] for f in sites)
    state = initial_state(JOB, None)
    results = [site_round(JOB, state, folder, 1) for folder in sites]
    shared = set(results[0].shared)
    assert shared == set(results[1].shared) and any(n.startswith("head.") for n in shared)
    assert any(".lora_" in n for n in shared) and not any(n.endswith("attn.qkv.weight") for n in shared)
    for r in results:
        assert r.metrics["train_loss"] > 0 and 0 <= r.metrics["local_bleu1"] <= 1
        assert 0 <= r.metrics["local_finding_accuracy"] <= 1  # the site's declared findings, scored at the site
    new, _ = aggregate(state, [(r.shared, r.samples) for r in results])
    ev = evaluate_checkpoint(save_round(tmp_path, JOB, new, 1, {}, []), sites[0], "val", rounds=20)
    assert ev["main_metric"] == "bleu4" and {"meteor", "rouge_l", "finding_f1"} <= set(ev["metrics"])


def test_a_report_site_joins_a_multi_task_federation(sites, tmp_path):
    seg = write_dataset(tmp_path / "seg", "segmentation", sites=1, per_site=8, size=64, seed=3)[0]
    job = dataclasses.replace(JOB, task="multitask", tasks=(TaskSpec("segmentation", labels=(0, 1)),
                                                            TaskSpec("report")), feature_size=8)
    state = initial_state(job, None)
    a, b = (site_round(job, state, f, 1, local_file=tmp_path / f"{i}.safetensors") for i, f in enumerate((seg, sites[0])))
    assert set(a.shared) == set(b.shared) and b.metrics["task_index"] == 1.0
    assert not any(n.startswith("head.") for n in b.shared) and "global_bleu4" in b.metrics
