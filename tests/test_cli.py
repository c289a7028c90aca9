"""The ``pstage`` command end to end: train + predict, and one-line errors for bad input."""

import subprocess
import sys
import time

import pandas as pd
import pytest

from tests.conftest import FAST, run_cli


def test_help_is_fast_and_imports_no_torch():
    code = "import sys; from pstage.cli import app; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
    started = time.perf_counter()
    out = run_cli("--help")
    assert out.returncode == 0 and "train" in out.stdout and "predict" in out.stdout
    assert time.perf_counter() - started < 5


def test_train_then_predict(learned, learn_root, tmp_path):
    """``pstage train`` (the shared learned run, see conftest) then ``pstage predict`` by run name."""
    run, out = learned
    assert "CV macro F1" in out.stdout and "submission.csv" in out.stdout and "per task macro F1" in out.stdout
    predicted = run_cli(
        "predict", "base", "--runs", str(run.parent), "--data", str(learn_root), "--out", str(tmp_path / "sub.csv")
    )
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert "submission: 42 images" in predicted.stdout
    assert pd.read_csv(tmp_path / "sub.csv").equals(pd.read_csv(run / "submission.csv"))


def _one_line_error(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 2, (out.stdout[-2000:], out.stderr[-2000:])
    assert "Traceback" not in out.stderr + out.stdout
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train.epoch=2"], "unknown config key 'train.epoch'; did you mean 'train.epochs'?"),
        (["train.epochs=two"], "config key 'train.epochs': Input should be a valid integer"),
        (["model.name=resnet1"], "timm has no model 'resnet1'"),
    ],
)
def test_config_errors(demo_root, tmp_path, args, message):
    line = _one_line_error(run_cli("train", "--data", str(demo_root), "--runs", str(tmp_path), *args))
    assert line.startswith("error: ") and message in line


def test_data_errors_are_one_line_and_no_run_is_marked_done(demo_copy, tmp_path):
    (demo_copy / "eval" / "info.csv").unlink()
    line = _one_line_error(run_cli("train", "--data", str(demo_copy), "--runs", str(tmp_path), "--name", "bad", *FAST))
    assert "eval/info.csv not found" in line
    info = pd.read_json(tmp_path / "bad" / "run.json", typ="series")
    assert info["status"] == "failed" and "info.csv" in info["error"]


def test_unreadable_image_error_then_skip(demo_copy, tmp_path):
    person = pd.read_csv(demo_copy / "train" / "train.csv")["path"][0]
    broken = next((demo_copy / "train" / "images" / person).glob("mask2.*"))
    broken.write_bytes(broken.read_bytes()[:300])
    line = _one_line_error(run_cli("train", "--data", str(demo_copy), "--runs", str(tmp_path), "--name", "b1", *FAST))
    assert str(broken) in line and "on_bad_image=skip" in line
    out = run_cli(
        "train",
        "--data",
        str(demo_copy),
        "--runs",
        str(tmp_path),
        "--name",
        "b2",
        *FAST,
        "train.folds=[0]",
        "data.on_bad_image=skip",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "skipped 1 unreadable train image" in out.stdout
    info = pd.read_json(tmp_path / "b2" / "run.json", typ="series")
    assert any(str(broken) in s for s in info["skipped"])
    oof = pd.read_csv(tmp_path / "b2" / "oof.csv")
    assert f"{person}/mask2" not in set(oof["image_id"])


def test_predict_errors(tmp_path):
    line = _one_line_error(run_cli("predict", "nope", "--runs", str(tmp_path)))
    assert "run 'nope' not found" in line


def test_missing_data_leaves_no_run_behind(tmp_path):
    line = _one_line_error(run_cli("train", "--runs", str(tmp_path), "--name", "x"))
    assert "no data given: pass --data DIR" in line
    line = _one_line_error(run_cli("train", "--data", str(tmp_path / "nope"), "--runs", str(tmp_path), "--name", "x"))
    assert "nope does not exist" in line
    assert not (tmp_path / "x").exists()


def _cli_without(module: str, *args: str) -> subprocess.CompletedProcess:
    """``pstage ARGS`` in a process where ``import module`` fails, as without the extra that brings it."""
    code = f"import sys; sys.modules[{module!r}] = None; from pstage.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


def test_error_lines_keep_square_brackets(tmp_path):
    """Rich markup is escaped in the one error funnel: `pstage serve` without the serve extra names
    `pip install 'pstage[serve]'` in full (it used to print as `pip install 'pstage'`)."""
    run = tmp_path / "r"
    run.mkdir()
    (run / "run.json").write_text('{"name": "r", "status": "done"}')
    line = _one_line_error(_cli_without("multipart", "serve", str(run)))
    assert line == "error: multipart not installed: pip install 'pstage[serve]'"


def test_tune_errors_go_through_the_same_funnel(tmp_path):
    """`pstage tune` has no error handling of its own: its errors are one escaped line, exit 2."""
    out = _cli_without("ray", "tune", "--backend", "ray", "--runs", str(tmp_path / "runs"), "--trials", "1")
    assert _one_line_error(out) == "error: --backend ray needs Ray Tune: pip install 'pstage[ray]'"
