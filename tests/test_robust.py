"""The default path never dies: finished trainings end ``done`` whatever their optional steps meet.

A config a user can write either trains to a done run (exit 0) or is refused with one ``error:``
line (exit 2); an optional step after training (person grouping, the final fit, publishing) that
fails is one line and a reason in run.json, never a traceback that loses the finished folds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from pstage.cli import app
from tests.conftest import FAST

EXAMPLES = int(os.environ.get("PSTAGE_PROPERTY_EXAMPLES", "10"))  # CI: 10 tiny trainings; raise it to hunt


def invoke(*args: str) -> tuple[int, str, str]:
    """``pstage ARGS`` in-process: (exit code, stdout, stderr); an uncaught exception fails the test."""
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def zero_backbone(path: Path, model: str = "test_resnet") -> Path:
    """A backbone state dict of zeros: every pooled feature is 0 and stays 0 (no gradient passes a
    ReLU at 0), the degenerate embedding that 32x24 real faces gave the default model."""
    import pstage.core.compat  # noqa: F401  (before timm, which imports torchvision)

    import timm
    import torch

    backbone = timm.create_model(model, num_classes=0)
    torch.save({k: torch.zeros_like(v) for k, v in backbone.state_dict().items()}, path)
    return path


def test_grouping_on_featureless_models_ends_done(demo_root, tmp_path):
    """Issue #21's crash: `linkage: The condensed distance matrix must contain only finite values`
    after every fold had trained. Now the run ends done and grouping leaves such photos alone."""
    weights = zero_backbone(tmp_path / "zeros.pth")
    code, out, err = invoke(
        "train", "--data", str(demo_root), "--runs", str(tmp_path / "runs"), "--name", "z",
        *FAST, "split.folds=2", "train.epochs=1", f"model.weights={weights}",
    )  # fmt: skip
    assert code == 0, out[-2000:] + err[-2000:]
    info = json.loads((tmp_path / "runs" / "z" / "run.json").read_text())
    assert info["status"] == "done"
    persons = info["persons"]
    assert "skipped" not in persons, persons  # handled, not merely survived
    assert persons["purity"]["groups"] == info["data"]["train_images"]  # every OOF photo alone: nothing to go on


def test_a_failing_optional_step_is_one_line_and_a_reason(demo_root, tmp_path, monkeypatch):
    """Fault injection: grouping and the final fit raise; the run still ends done with its folds'
    outputs, one line per step says what was skipped and why, and run.json keeps the reason."""
    import pstage.training.train as training

    def broken(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(training, "group_run", broken)
    monkeypatch.setattr(training, "fit_final", broken)
    code, out, err = invoke(
        "train", "--data", str(demo_root), "--runs", str(tmp_path), "--name", "f",
        *FAST, "split.folds=2", "train.epochs=1", "train.final_fit=alone",
    )  # fmt: skip
    assert code == 0, out[-2000:] + err[-2000:]
    assert "Traceback" not in out + err
    assert "persons: grouping skipped (RuntimeError: injected failure)" in out
    assert "final fit skipped (RuntimeError: injected failure)" in out
    info = json.loads((tmp_path / "f" / "run.json").read_text())
    assert info["status"] == "done"
    assert info["persons"] == {"group": "auto", "applied": False, "skipped": "RuntimeError: injected failure"}
    assert info["recipes"]["final_fit"]["skipped"] == "RuntimeError: injected failure"
    assert (tmp_path / "f" / "submission.csv").is_file() and not (tmp_path / "f" / "test_raw.csv").exists()


# --- the property: any valid config trains to a done run or is refused in one line ---------------

SIZES = ["[16,16]", "[24,32]", "[32,24]", "[40,40]"]
MODELS = ["test_resnet", "test_efficientnet", "test_byobnet", "test_convnext", "test_vit", "tf_efficientnet_lite0"]


@st.composite
def configs(draw: st.DrawFn) -> list[str]:
    """KEY=VALUE overrides a user might combine: sizes, models, heads, folds, recipes, precision."""
    folds = draw(st.sampled_from([2, 3]))
    head = draw(st.sampled_from(["linear", "multi"]))
    picks = {
        "data.image_size": draw(st.sampled_from(SIZES)),
        "model.name": draw(st.sampled_from(MODELS)),
        "model.head": head,
        "model.classifier": draw(st.sampled_from(["linear", "arcface"])),
        "model.age_head": draw(
            st.sampled_from(["classify", "ordinal", "regress"] if head == "multi" else ["classify"])
        ),
        "model.pool": draw(st.sampled_from(["avg", "gem"])),
        "split.folds": str(folds),
        "train.folds": draw(st.sampled_from(["null", "[0]", f"[{folds - 1}]"])),
        "train.epochs": str(draw(st.integers(1, 2))),
        "train.batch_size": draw(st.sampled_from(["8", "32", "64"])),
        "train.precision": draw(st.sampled_from(["32", "32-true", "bf16-mixed", "16-mixed", "auto"])),
        "train.final_fit": draw(st.sampled_from(["off", "off", "alone", "blend"])),
        "train.ema": draw(st.sampled_from(["false", "true"])),
        "train.sampler": draw(st.sampled_from(["none", "balanced"])),
        "augment.preset": draw(st.sampled_from(["none", "basic", "strong"])),
        "augment.device": draw(st.sampled_from(["auto", "true", "false"])),
        "augment.cutmix.p": draw(st.sampled_from(["0", "0.5"])),
        "augment.mixup.p": draw(st.sampled_from(["0", "0.3"])),
        "loss.name": draw(st.sampled_from(["ce", "focal", "f1"])),
        "loss.label_smoothing": draw(st.sampled_from(["0", "0.1"])),
        "data.borderline.years": draw(st.sampled_from(["0", "3"])),
        "tta.train": draw(st.sampled_from(["true", "false"])),
        "tta.scales": draw(st.sampled_from(["[1.0]", "[1.0,1.15]"])),
        "persons.group": draw(st.sampled_from(["auto", "on", "off"])),
    }
    return [f"{k}={v}" for k, v in picks.items()]


@pytest.fixture(scope="module")
def property_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("property")


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=os.environ.get("PSTAGE_PROPERTY_RANDOM") != "1",  # the same examples on every CI run
    database=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: each example is a training; the message names it
    suppress_health_check=list(HealthCheck),
)
@given(overrides=configs())
def test_any_valid_config_trains_to_done_or_is_one_line(overrides, demo_root, property_runs):
    name = f"p{len(list(property_runs.iterdir()))}"
    try:
        code, out, err = invoke(
            "train", "--data", str(demo_root), "--runs", str(property_runs), "--name", name,
            "train.progress=none", "optim.lr=0.01", *overrides,
        )  # fmt: skip
    except Exception as exc:  # a traceback: name the config that caused it
        raise AssertionError(f"pstage train {' '.join(overrides)} raised {type(exc).__name__}: {exc}") from exc
    assert "Traceback" not in out + err, overrides
    event(f"exit {code}" + (f": {err.strip()[:60]}" if code else ""))  # --hypothesis-show-statistics
    if code == 0:
        info = json.loads((property_runs / name / "run.json").read_text())
        assert info["status"] == "done", (overrides, info.get("error"))
        assert (property_runs / name / "submission.csv").is_file()
    else:
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), (overrides, code, out[-1500:], err)
