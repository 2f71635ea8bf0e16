"""Bad input at a site: each gets a clear message naming the file or key and what is allowed, at the site;
what the coordinator gets back names the problem's kind, never a path, a value or file contents."""

import dataclasses
import json

import pytest
import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from in_process import TINY_JOB, node_config, with_site
from PIL import Image

from echocare_client.cli import main as client_main
from echocare_client.client_app import train
from echocare_core import __version__
from echocare_core.data.contract import read_manifest
from echocare_core.engine.training import LocalTraining
from echocare_core.federation.job import Job, shared_names
from echocare_core.federation.rounds import initial_state
from echocare_core.federation.site import build_job_model
from echocare_core.federation.transport import digest
from echocare_core.synthetic.dataset import write_dataset

JOB = TINY_JOB


@pytest.fixture
def never_connects(monkeypatch):
    """A tripwire: these inputs must stop echocare-client before it starts a SuperNode (which would wait for
    a coordinator forever)."""

    def started(*_):
        raise AssertionError("echocare-client accepted the input and started its SuperNode")

    monkeypatch.setattr("echocare_client.cli._supervise", started)


def _first(folder, column):
    return folder / read_manifest(folder)[1][0][column]


def _corrupt_png(folder):
    _first(folder, "image").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image")


def _truncated_dicom(folder):
    clip = _first(folder, "image")
    clip.write_bytes(clip.read_bytes()[:-2000])


def _small_mask(folder):
    Image.new("L", (16, 16)).save(_first(folder, "mask"))


def _unknown_label(folder):
    manifest = folder / "manifest.csv"
    header, *rows = manifest.read_text().splitlines()
    rows[0] = rows[0].replace("malignant", "suspicious").replace("benign", "suspicious")
    manifest.write_text("\n".join([header, *rows]) + "\n")


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
@pytest.mark.parametrize(
    "task, damage, says",
    [
        ("segmentation", _corrupt_png, "row 2 column image: a PNG/JPG/BMP/TIFF/DICOM image that decodes"),
        ("regression", _truncated_dicom, "row 2 column image: a PNG/JPG/BMP/TIFF/DICOM image that decodes"),
        ("segmentation", _small_mask, "row 2 column mask: the image's size"),
        ("classification", _unknown_label, "row 2 column label: one of the classes"),
    ],
)
def test_echocare_client_names_the_bad_file_and_what_is_allowed(tmp_path, capsys, never_connects, task, damage, says):
    folder = write_dataset(tmp_path / "data", task, sites=1, per_site=6, size=32, seed=1)[0]
    damage(folder)
    site = {"name": "site_x", "insecure": True, "data": str(folder), "state_dir": str(tmp_path / "state")}
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(site))
    assert client_main(["--config", str(tmp_path / "site.yaml")]) == 2
    err = capsys.readouterr().err.replace("\n", "")
    assert "fails the dataset check with 1 problem(s), all: manifest.csv " + says in err
    assert f"echocare-data verify {folder}" in err
    assert not (tmp_path / "state").exists()  # nothing started, nothing written


@pytest.mark.parametrize(
    "text, says",
    [
        ("privcy: {required: true}", "unknown key 'privcy'"),
        ("device: gpu", "device"),
        ("limits: {max_batch_size: -4}", "max_batch_size"),
        ("name: [site, x]", "name"),
    ],
)
def test_a_site_yaml_mistake_is_named_with_its_file_and_key(tmp_path, capsys, never_connects, text, says):
    config = tmp_path / "site.yaml"
    config.write_text(f"name: site_x\ninsecure: true\ndata: {tmp_path}\n" + text + "\n")
    assert client_main(["--config", str(config)]) == 2
    err = capsys.readouterr().err.replace("\n", "")
    assert str(config) in err and says in err


@pytest.fixture
def site(tmp_path):
    folder = write_dataset(tmp_path / "data", "segmentation", sites=1, per_site=8, size=64, seed=4)[0]
    return folder, node_config("site_x", folder, tmp_path / "state")


def _round(node, state, job=JOB, send_frozen=True, name=None, toolkit=__version__):
    """The round as the server sends it: the job's shared parameters, and the frozen rest with its digest."""
    names = set(shared_names(build_job_model(job), job))
    frozen = {k: v for k, v in state.items() if k not in names}
    msg = Message(
        RecordDict(
            {
                "arrays": ArrayRecord({k: v for k, v in state.items() if k in names}),
                **({"frozen": ArrayRecord(frozen)} if send_frozen else {}),
                "config": ConfigRecord(
                    {
                        "round": 1,
                        "rounds": 1,
                        "job": job.to_json(),
                        "toolkit": toolkit,
                        "frozen": name or digest({k: v.numpy() for k, v in frozen.items()}),
                    }
                ),
            }
        ),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )
    return train(msg, Context(1, 1, node, RecordDict(), {}))


def test_the_frozen_part_is_named_by_its_digest_and_kept_only_for_approved_jobs(site, tmp_path, flower_task):
    _, node = site
    state = initial_state(JOB, None)
    cache = tmp_path / "state" / "site_x" / "frozen"
    assert _round(node, state, toolkit="9.9.9").error.code == 1001 and not cache.exists()  # refused first
    for bad in ("../local_layers/x", "/etc/passwd", "ab" * 40):  # never a path outside the cache
        reply = _round(node, state, send_frozen=False, name=bad)
        assert reply.error.reason == "site site_x failed: the frozen part of the model is not named by a digest"
    assert _round(node, state, send_frozen=False).error.code == 1003  # NEED_FROZEN: it holds none yet
    first = _round(node, state)
    assert not first.has_error() and len(list(cache.glob("*.safetensors"))) == 1
    assert not _round(node, state, send_frozen=False).has_error()  # from its copy
    other = dict(state)  # the same job and shared part with another frozen encoder (another init): trains anew
    other["encoder.patch_embed.proj.weight"] = other["encoder.patch_embed.proj.weight"] + 1.0
    _round(node, other)
    events = [json.loads(line)["event"] for line in (tmp_path / "state" / "site_x" / "audit.jsonl").open()]
    assert events == ["refused", "trained", "resent", "trained"]


def test_round_errors_reach_the_coordinator_without_paths_or_values(site, flower_task):
    folder, node = site
    state = initial_state(JOB, None)
    other = initial_state(
        Job(
            task="segmentation",
            labels=(0, 1, 2),
            encoder=JOB.encoder,
            feature_size=8,
            train=LocalTraining(mode="lora", lora_rank=2),
        ),
        None,
    )
    reply = _round(node, other)  # the weights of another model
    assert (
        reply.error.reason.startswith("site site_x refused the job: the global weights do not fit the job's model (")
        and "of another shape" in reply.error.reason
    )
    _small_mask(folder)  # the data changed after the site started
    reply = _round(node, state)
    assert reply.error.reason == (
        "site site_x refused the job: the site's dataset fails its check (see echocare-data verify at the site)"
    )
    (folder / "manifest.csv").write_bytes(b"\xff\xfe broken")
    reply = _round(node, state)
    assert reply.has_error() and str(folder) not in reply.error.reason and "broken" not in reply.error.reason


def test_site_local_layers_are_kept_per_job(site, tmp_path, flower_task):
    _, node = site
    job = dataclasses.replace(JOB, local=("head.*",))
    assert not _round(node, initial_state(job, None), job).has_error()
    other = dataclasses.replace(
        job, train=dataclasses.replace(job.train, lora_rank=4)
    )  # another job with a head of the same shape: its own copy
    assert not _round(node, initial_state(other, None), other).has_error()
    assert len(list((tmp_path / "state" / "site_x" / "local_layers").glob("*.safetensors"))) == 2


def test_a_site_with_its_own_copy_of_the_base_weights_never_downloads_the_frozen_part(site, tmp_path, flower_task):
    from models.test_swin import monai_twin

    from echocare_core.weights import weights_digest

    _, node = site
    torch.manual_seed(5)
    base = tmp_path / "echocare_encoder.pth"
    torch.save({**monai_twin(JOB.encoder).state_dict(), "mask_token": torch.zeros(1, 1, 16)}, base)
    job = dataclasses.replace(JOB, base=weights_digest(base))
    state = initial_state(job, str(base))
    assert _round(node, state, job, send_frozen=False).error.code == 1003  # no base_weights at the site: NEED_FROZEN
    other = tmp_path / "other.pth"
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in torch.load(base).items()}, other)
    assert _round(with_site(node, base_weights=str(other)), state, job, send_frozen=False).error.code == 1003
    reply = _round(with_site(node, base_weights=str(base)), state, job, send_frozen=False)
    assert not reply.has_error()  # built from its own copy: the coordinator sent the shared part only
    (kept,) = (tmp_path / "state" / "site_x" / "frozen").glob("*.safetensors")
    names = set(shared_names(build_job_model(job), job))
    assert kept.stem == digest({k: v.numpy() for k, v in state.items() if k not in names})
    assert not list((tmp_path / "state" / "site_x" / "inbox").glob("*"))  # nothing left behind
