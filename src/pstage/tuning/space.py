"""The search space: ``tune.space`` entries as Optuna distributions, sampled values as configs."""

from __future__ import annotations

from typing import Any, get_args

import optuna
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from pstage.config import Config, TuneParam, load_config, merge
from pstage.core.errors import ConfigError
from pstage.models.classifier import check_model_name
from pstage.training.names import check_names
from pstage.training.train import check_optimizer

PRIMITIVE = (type(None), bool, int, float, str)


# --------------------------------------------------------------------------------------------
# The search space


def _field_kind(key: str) -> str | None:
    """'int' or 'float' when the config key holds a plain (optional) number, else None."""
    model: Any = Config
    parts = key.split(".")
    for part in parts[:-1]:
        model = model.model_fields[part].annotation
    annotation = model.model_fields[parts[-1]].annotation
    kinds = {a for a in (get_args(annotation) or (annotation,)) if a is not type(None)}
    if kinds == {int}:
        return "int"
    if kinds == {float}:
        return "float"
    return None


def param_kind(key: str, param: TuneParam) -> str:
    """The distribution of a space entry: explicit type, categorical for choices, else the key's type."""
    if param.type:
        return param.type
    if param.choices is not None:
        return "categorical"
    kind = _field_kind(key)
    if kind is None:
        raise ConfigError(
            f"tune.space[{key}]: '{key}' is not a number; give choices: [...] (or type: int/float for a range)"
        )
    return kind


def _encoded(param: TuneParam) -> bool:
    """Optuna stores only None/bool/int/float/str choices: others (lists like image sizes) go as YAML text."""
    return any(not isinstance(c, PRIMITIVE) for c in param.choices or [])


def flow(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def suggest(trial: Any, key: str, param: TuneParam) -> Any:
    """Sample one config value for ``key`` from an Optuna trial (also Ray's define-by-run trials)."""
    kind = param_kind(key, param)
    if kind == "categorical":
        if _encoded(param):
            return yaml.safe_load(trial.suggest_categorical(key, [flow(c) for c in param.choices or []]))
        return trial.suggest_categorical(key, list(param.choices or []))
    assert param.low is not None and param.high is not None
    if kind == "int":
        return trial.suggest_int(key, int(param.low), int(param.high), step=int(param.step or 1), log=param.log)
    return trial.suggest_float(key, float(param.low), float(param.high), step=param.step, log=param.log)


def distributions(space: dict[str, TuneParam]) -> dict[str, optuna.distributions.BaseDistribution]:
    """The space as Optuna distributions (Ray's OptunaSearch, rebuilding trials from Ray results)."""
    out: dict[str, Any] = {}
    for key, param in space.items():
        kind = param_kind(key, param)
        if kind == "categorical":
            choices = [flow(c) for c in param.choices or []] if _encoded(param) else list(param.choices or [])
            out[key] = CategoricalDistribution(choices)
        elif kind == "int":
            out[key] = IntDistribution(
                int(param.low or 0), int(param.high or 0), step=int(param.step or 1), log=param.log
            )
        else:
            out[key] = FloatDistribution(float(param.low or 0), float(param.high or 0), step=param.step, log=param.log)
    return out


def decode(space: dict[str, TuneParam], params: dict[str, Any]) -> dict[str, Any]:
    """Stored trial params back to config values (YAML-encoded choices parsed)."""
    out = {}
    for key, value in params.items():
        param = space.get(key)
        out[key] = yaml.safe_load(value) if param is not None and _encoded(param) and isinstance(value, str) else value
    return out


def nested(values: dict[str, Any]) -> dict[str, Any]:
    """``{"optim.lr": 1e-3}`` -> ``{"optim": {"lr": 1e-3}}`` (config override form)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def trial_config(base: Config, values: dict[str, Any]) -> Config:
    """The config one trial trains: base + sampled values, on ``tune.folds``, without the tune section.

    The tune section is reset so a trial's run (and the best config) is a plain training config:
    re-training it never trips over search settings.
    """
    merged = merge(base.to_dict(), nested(values))
    merged["tune"] = {}
    if base.tune.folds is not None:
        merged["train"]["folds"] = list(base.tune.folds)
    return load_config(merged)


def check_space(base: Config) -> None:
    """Every bound and choice must be a valid value of its key (and model/optimizer names must exist)."""
    check_names(base)  # registry names (heads, loss, loggers): the config layer cannot check them
    for key, param in base.tune.space.items():
        kind = param_kind(key, param)
        candidates = list(param.choices or []) if kind == "categorical" else [param.low, param.high]
        if kind == "int":
            candidates = [int(c) for c in candidates]  # type: ignore[arg-type]
        for value in candidates:
            try:
                check_names(load_config(merge(base.to_dict(), nested({key: value}))))
            except ConfigError as exc:
                raise ConfigError(f"tune.space[{key}]: {value!r} is not a valid value ({exc})") from None
            try:
                if key == "model.name":
                    check_model_name(str(value))
                elif key == "optim.name":
                    check_optimizer(str(value))
            except ConfigError as exc:
                raise ConfigError(f"tune.space[{key}]: {exc}") from None


def check_single_process(cfg: Config) -> None:
    t = cfg.train
    if not t.single_process:
        raise ConfigError(
            f"pstage tune trains trials in-process on one device (train.devices={t.devices}, train.strategy={t.strategy}); "
            "run one worker per GPU instead (CUDA_VISIBLE_DEVICES=k pstage tune ... on the same storage)"
        )
