"""The site's privacy ledger: epsilon as Opacus' accountant computes it, the budget enforced before a round
trains, and a ledger that was edited or deleted refuses instead of starting again from zero."""

import json

import pytest
from opacus.accountants import PRVAccountant

from echocare_core.privacy.dp import epsilon, noise_multiplier
from echocare_core.privacy.ledger import BudgetExceeded, LedgerError, PrivacyLedger
from echocare_core.privacy.settings import DPSettings


def test_the_ledger_reports_what_opacus_accountant_computes(tmp_path):
    ledger = PrivacyLedger(tmp_path, budget=0.0, delta=1e-5)
    rounds = [(1.1, 0.05, 20), (1.1, 0.05, 20), (0.9, 0.04, 25)]
    for i, (sigma, q, steps) in enumerate(rounds, 1):
        ledger.record("ds", "job", i, sigma, q, steps)
    accountant = PRVAccountant()
    for sigma, q, steps in rounds:
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=q)
    assert ledger.spent("ds") == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    assert ledger.spends("ds")[-1].epsilon == pytest.approx(ledger.spent("ds"), rel=1e-9)
    assert PrivacyLedger(tmp_path).spent("ds") == pytest.approx(ledger.spent("ds"), rel=1e-9)  # survives a restart
    assert ledger.spent("other") == 0.0


def test_noise_for_the_whole_job_keeps_its_epsilon():
    settings = DPSettings(epsilon=3.0, delta=1e-5)
    sigma = noise_multiplier(settings, 0.05, 200)
    assert 2.7 < epsilon([(sigma, 0.05, 200)], 1e-5) <= 3.0  # RDP calibration, PRV report: at or below the target


def test_the_budget_stops_the_round_that_would_exceed_it(tmp_path):
    ledger = PrivacyLedger(tmp_path, budget=1.0)
    history = []
    for rnd in range(1, 50):
        if epsilon([*history, (1.5, 0.05, 10)], 1e-5) > 1.0:
            break
        ledger.record("ds", "job", rnd, 1.5, 0.05, 10)
        history.append((1.5, 0.05, 10))
    with pytest.raises(BudgetExceeded, match="above the site's budget 1"):
        ledger.record("ds", "job", rnd, 1.5, 0.05, 10)
    assert 1 < len(ledger.spends("ds")) == rnd - 1 and ledger.spent("ds") <= 1.0


def test_an_edited_or_deleted_ledger_is_refused(tmp_path):
    ledger = PrivacyLedger(tmp_path / "a")
    ledger.record("ds", "job", 1, 1.0, 0.1, 10)
    data = json.loads(ledger.path.read_text())
    data["datasets"]["ds"][0]["steps"] = 1  # someone lowers the spend
    ledger.path.write_text(json.dumps(data))
    with pytest.raises(LedgerError, match="does not match its key"):
        PrivacyLedger(tmp_path / "a")
    ledger.path.unlink()
    with pytest.raises(LedgerError, match="is missing but its key exists"):
        PrivacyLedger(tmp_path / "a")
    other = PrivacyLedger(tmp_path / "b")
    other.key_path.unlink()
    with pytest.raises(LedgerError, match="ledger.key is missing"):
        PrivacyLedger(tmp_path / "b")
    assert oct(PrivacyLedger(tmp_path / "c").key_path.stat().st_mode & 0o777) == "0o600"


def test_two_processes_recording_at_once_lose_no_spend(tmp_path):
    import subprocess
    import sys

    PrivacyLedger(tmp_path)
    script = (
        "import sys; from echocare_core.privacy.ledger import PrivacyLedger\n"
        "for r in range(10): PrivacyLedger(sys.argv[1]).record('ds', sys.argv[2], r, 1.5, 0.05, 10)"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), job]) for job in ("a", "b")]
    assert [p.wait() for p in procs] == [0, 0]
    spends = PrivacyLedger(tmp_path).spends("ds")
    assert sorted((s.job, s.round) for s in spends) == sorted((j, r) for j in "ab" for r in range(10))
