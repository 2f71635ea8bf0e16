"""What crosses a site's boundary and what both sides record: a run with a refused site and a rejected update,
read back from the coordinator's and the sites' audit logs, and every reply checked for what it may carry."""

import pytest
from flwr.supercore.task_identity import TaskIdentity
from in_process import InProcessGrid, federation_config, node_config
from safetensors import safe_open

from echocare_core.federation.audit import AuditLog
from echocare_core.federation.job import shared_names
from echocare_core.federation.site import build_job_model
from echocare_core.synthetic.dataset import write_dataset
from echocare_server.server_app import run_rounds

pytestmark = pytest.mark.slow
METRICS = {
    "num-examples",
    "compute_s",
    "clientapp_s",
    "train_loss",
    "train_steps",
    "train_unreadable",
    "lr",
    "val_samples",
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("audit")
    seg = write_dataset(tmp / "seg", "segmentation", sites=3, per_site=8, size=64, seed=9)
    cls = write_dataset(tmp / "cls", "classification", sites=1, per_site=8, size=64, seed=9)
    folders = {"site_a": seg[0], "site_b": seg[1], "site_nan": seg[2], "site_wrong_task": cls[0]}
    sites = {200 + i: node_config(name, f, tmp / "state") for i, (name, f) in enumerate(folders.items())}
    cfg = federation_config(tmp / "run")
    grid = InProcessGrid(sites, tamper={202: lambda sent, _: {k: v.fill_(float("nan")) for k, v in sent.items()}})
    with pytest.MonkeyPatch.context() as mp:
        for key in ("_run_id", "_task_id", "_node_id"):  # what Flower sets in its ServerApp process
            mp.setattr(TaskIdentity, key, 1)
        run_rounds(grid, cfg)
    return tmp, cfg, grid


def test_the_coordinator_audit_log_records_who_sent_what_and_what_was_refused_or_left_out(run):
    tmp, cfg, _ = run
    events = AuditLog(tmp / "run" / "audit.jsonl").read()
    names = set(shared_names(build_job_model(cfg.job), cfg.job))
    assert events[0]["event"] == "start" and len(events[0]["job_hash"]) == 64
    refused = [e for e in events if e["event"] == "refused"]
    assert len(refused) == 2 and all(
        "job task 'segmentation' but the site's dataset is 'classification'" in e["reason"] for e in refused
    )
    rejected = [e for e in events if e["event"] == "rejected"]
    assert [(e["round"], e["site"], e["reason"]) for e in rejected] == [
        (r, "site_nan", "non-finite values") for r in (1, 2)
    ]
    received = [e for e in events if e["event"] == "reply"]
    assert sorted((e["round"], e["site"]) for e in received) == [
        (1, "site_a"),
        (1, "site_b"),
        (2, "site_a"),
        (2, "site_b"),
    ]
    assert all(set(e["sent"]["tensors"]) == names and e["sent"]["bytes"] > 0 for e in received)
    assert [sorted(s["site"] for s in e["sites"]) for e in events if e["event"] == "round_end"] == [
        ["site_a", "site_b"]
    ] * 2


def test_each_site_audit_log_records_what_it_sent_or_why_not(run):
    tmp, *_ = run
    for site in ("site_a", "site_b"):
        lines = AuditLog(tmp / "state" / site / "audit.jsonl").read()
        assert [(e["event"], e["round"]) for e in lines] == [("trained", 1), ("trained", 2)]
        with safe_open(str(tmp / "state" / site / "sent" / "round_0002.safetensors"), "pt") as f:
            assert lines[-1]["sent"]["tensors"] == {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    refused = AuditLog(tmp / "state" / "site_wrong_task" / "audit.jsonl").read()
    assert [e["event"] for e in refused] == ["refused", "refused"] and "classification" in refused[0]["refused"]


def test_replies_carry_only_the_shared_tensors_the_sample_count_and_declared_metrics(run):
    tmp, cfg, grid = run
    names = set(shared_names(build_job_model(cfg.job), cfg.job))
    shapes = {n: list(t.shape) for n, t in build_job_model(cfg.job).state_dict().items() if n in names}
    assert len(grid.replies) == 8
    for reply in grid.replies:
        if reply.has_error():  # a reason naming job keys and declared labels: no path, no file content
            assert "site site_wrong_task refused the job" in reply.error.reason and "/" not in reply.error.reason
            continue
        assert set(reply.content.keys()) == {"arrays", "metrics", "site"}
        assert list(reply.content["site"].keys()) == ["name"]
        arrays = reply.content["arrays"]
        assert {k: list(a.shape) for k, a in arrays.items()} == shapes
        metrics = set(reply.content["metrics"].keys())
        assert metrics <= METRICS | {
            f"{when}_{m}"
            for when in ("global", "local")
            for m in ("dice", "dice_class1", "nsd", "nsd_class1", "hd95", "hd95_class1")
        }
