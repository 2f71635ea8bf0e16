"""DP in local fine-tuning (`echocare-finetune`): each epoch paid for in the site's ledger, stopping when the
budget would be passed, with the spend in the metrics and the checkpoints."""

import json

from conftest import TINY_ENCODER

from echocare_core.checkpoint import read_meta
from echocare_core.config import load_config
from echocare_core.engine.finetune import run_finetune
from echocare_core.engine.finetune_config import FinetuneConfig
from echocare_core.privacy.dp import epsilon, noise_multiplier
from echocare_core.privacy.ledger import PrivacyLedger
from echocare_core.privacy.settings import DPSettings
from echocare_core.synthetic.dataset import write_dataset
from echocare_core.tasks.dataset import split_rows


def test_private_finetuning_spends_per_epoch_and_stops_at_the_budget(tmp_path):
    folder = write_dataset(tmp_path / "data", "segmentation", sites=1, per_site=16, size=64, seed=2)[0]
    n, batch, epochs = len(split_rows(folder, "train")), 8, 4
    steps = -(-n // batch)
    q = batch / n
    sigma = noise_multiplier(DPSettings(epsilon=6.0), q, steps * epochs)
    budget = (epsilon([(sigma, q, steps)] * 2, 1e-5) + epsilon([(sigma, q, steps)] * 3, 1e-5)) / 2  # 2 epochs fit
    cfg = load_config(
        FinetuneConfig,
        None,
        [],
        base={
            "output": str(tmp_path / "run"),
            "device": "cpu",
            "data": {"folder": str(folder), "num_workers": 0},
            "model": {"encoder": dict(TINY_ENCODER), "feature_size": 8},
            "epochs": epochs,
            "train": {"mode": "lora", "lr": 1e-3, "batch_size": batch, "warmup_epochs": 0, "privacy": {"epsilon": 6.0}},
            "ledger": {"folder": str(tmp_path / "ledger"), "epsilon_budget": budget},
        },
    )
    result = run_finetune(cfg)
    assert result.status == "privacy budget spent" and result.epoch == 2 and result.test
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epsilon"] for r in rows] == [epsilon([(sigma, q, steps)] * e, 1e-5) for e in (1, 2)] and all(
        r["delta"] == 1e-5 for r in rows
    )
    (spends,) = PrivacyLedger(tmp_path / "ledger").datasets.values()
    assert [s["round"] for s in spends] == [1, 2] and spends[0]["job"].startswith("finetune:")
    assert read_meta(tmp_path / "run" / "last")["metrics"]["epsilon"] == rows[-1]["epsilon"]
