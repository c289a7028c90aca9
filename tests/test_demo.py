"""``pstage demo --quick``: the whole flow (generate, train two runs, predict, leaderboard) from the CLI."""

import json

import pandas as pd

from tests.conftest import run_cli


def test_quick_demo_end_to_end(tmp_path):
    out = run_cli("demo", "--quick", "--out", str(tmp_path / "demo"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    runs = tmp_path / "demo" / "runs"
    names = sorted(p.name for p in runs.iterdir())
    assert names == ["resnet10t", "test-resnet"]
    for name in names:
        info = json.loads((runs / name / "run.json").read_text())
        assert info["status"] == "done"
        submission = pd.read_csv(runs / name / "submission.csv")
        info_csv = pd.read_csv(tmp_path / "demo" / "data" / "eval" / "info.csv")
        assert submission["ImageID"].tolist() == info_csv["ImageID"].tolist()
    # both runs share one split, so they can be compared and ensembled
    assert (runs / "resnet10t" / "folds.csv").read_text() == (runs / "test-resnet" / "folds.csv").read_text()
    assert "leaderboard" in out.stdout and "test macro F1" in out.stdout
    assert "re-created" in out.stdout and "Demo finished" in out.stdout
