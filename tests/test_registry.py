"""Registries by name: one-line errors listing the registered names and the closest, checked at each command's edge."""

import pytest

import pstage
from pstage.config import load_config
from pstage.core.errors import ConfigError
from pstage.core.registry import Registry, check_config


def test_register_create_and_names():
    shapes: Registry = Registry("shape", "demo.shape")

    @shapes.register("square")
    def square(side: float) -> float:
        return side * side

    shapes.register("circle", lambda r: 3.0 * r * r)
    assert shapes.names() == ["square", "circle"] and "circle" in shapes
    assert shapes.create("square", 3) == 9 and shapes.get("circle")(1) == 3.0
    with pytest.raises(ValueError, match="shape 'square' is registered twice"):
        shapes.register("square", square)
    with pytest.raises(ConfigError) as info:
        shapes.create("sqare", 3)
    assert str(info.value) == "demo.shape=sqare: expected one of square, circle; did you mean 'square'?"
    with pytest.raises(ConfigError, match=r"^--shape hexagon: expected one of square, circle$"):
        shapes.check("hexagon", "--shape")  # nothing close: no suggestion


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.head=mutli", "model.head=mutli: expected one of linear, multi; did you mean 'multi'?"),
        (
            "model.classifier=arcfce",
            "model.classifier=arcfce: expected one of linear, arcface; did you mean 'arcface'?",
        ),
        ("model.age_head=regres", "model.age_head=regres: expected one of classify, regress, ordinal; did you mean"),
        ("loss.name=focla", "loss.name=focla: expected one of ce, focal, f1; did you mean 'focal'?"),
        ("log.loggers=[csv,tensorbord]", "log.loggers=tensorbord: expected one of tensorboard, csv, wandb, mlflow;"),
    ],
)
def test_train_refuses_unknown_names_before_any_work(tmp_path, override, message):
    overrides = [override, "model.head=multi"] if override.startswith("model.age_head") else [override]
    with pytest.raises(ConfigError) as info:
        pstage.train(data=tmp_path, runs=tmp_path / "runs", name="bad", overrides=overrides)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    assert not (tmp_path / "runs").exists()


def test_every_registry_a_config_names_is_checked():
    """Each registry-picked key of the default config passes; a wrong one is caught by its registry."""
    from pstage.training.names import REGISTRIES
    from pstage.tuning.study import PRUNERS

    assert {r.key for r in REGISTRIES} == {
        "model.head",
        "model.classifier",
        "model.age_head",
        "loss.name",
        "log.loggers",
    }
    check_config(load_config(), [*REGISTRIES, PRUNERS])  # the defaults are registered names
    with pytest.raises(
        ConfigError,
        match="tune.pruner=medain: expected one of median, halving, hyperband, threshold, none; did you mean 'median'",
    ):
        check_config(load_config(None, ["tune.pruner=medain"]), [PRUNERS])


def test_tune_refuses_an_unknown_pruner_and_space_name(tmp_path):
    space = "tune.space={optim.lr: [0.001, 0.003]}"
    with pytest.raises(ConfigError, match=r"^tune.pruner=hyperbnd: .*did you mean 'hyperband'\?$"):
        pstage.tune(None, data=tmp_path, runs=tmp_path / "runs", trials=1, overrides=[space, "tune.pruner=hyperbnd"])
    with pytest.raises(
        ConfigError,
        match=r"^tune.space\[loss.name\]: 'nope' is not a valid value \(loss.name=nope: expected one of ce, focal, f1\)$",
    ):
        pstage.tune(
            None, data=tmp_path, runs=tmp_path / "runs", trials=1, overrides=["tune.space={loss.name: [ce, nope]}"]
        )
