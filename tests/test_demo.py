"""``pstage demo --quick``: the whole flow (generate, train two runs, TTA, ensemble, board) from the CLI."""

import json

import pandas as pd

from tests.conftest import run_cli


def test_quick_demo_end_to_end(tmp_path):
    out = run_cli("demo", "--quick", "--out", str(tmp_path / "demo"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    runs = tmp_path / "demo" / "runs"
    names = sorted(p.name for p in runs.iterdir() if p.is_dir())
    assert names == ["ensemble", "resnet10t", "test-resnet"]
    for name in ["ensemble", "resnet10t", "test-resnet"]:
        info = json.loads((runs / name / "run.json").read_text())
        assert info["status"] == "done"
        submission = pd.read_csv(runs / name / "submission.csv")
        info_csv = pd.read_csv(tmp_path / "demo" / "data" / "eval" / "info.csv")
        assert submission["ImageID"].tolist() == info_csv["ImageID"].tolist()
    # both runs share one split, so they can be compared and ensembled
    assert (runs / "resnet10t" / "folds.csv").read_text() == (runs / "test-resnet" / "folds.csv").read_text()
    # the ensemble is a run like the others, and hill climbing never scores below its best member
    ensemble = json.loads((runs / "ensemble" / "run.json").read_text())
    members = [json.loads((runs / n / "run.json").read_text())["cv"]["macro_f1"] for n in ("resnet10t", "test-resnet")]
    assert ensemble["kind"] == "ensemble" and ensemble["cv"]["macro_f1"] >= max(members)
    assert "board" in out.stdout and "test macro F1" in out.stdout and "3 finished run(s)" in out.stdout
    assert "with TTA" in out.stdout and "ensemble CV macro F1" in out.stdout
    assert "re-created" in out.stdout and "Demo finished" in out.stdout
