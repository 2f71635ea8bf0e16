"""echocare-demo refuses settings it cannot run, before it writes anything (the demo itself runs for minutes)."""

import pytest

from echocare_core.cli.demo import main


@pytest.mark.parametrize("args", [["--pretrain-steps", "-1"], ["--sites", "1"], ["--rounds", "0"]])
def test_the_demo_refuses_settings_it_cannot_run(args, tmp_path, capsys):
    assert main(["--out", str(tmp_path / "demo"), *args]) == 2
    assert "pretrain steps >= 0" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "demo").exists()
