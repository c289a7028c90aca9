"""The run configuration: pydantic sections, YAML files and dotted ``KEY=VALUE`` overrides.

- ``sections``: the schema (one section per stage) and its key introspection;
- ``loading``: files, overrides, their merge and one-line errors;
- ``migration``: the values an older run's saved config implies for keys it predates;
- ``render``: ``pstage config``'s annotated YAML and the docs' reference.

Everything a caller needs is importable from ``pstage.config`` itself.
"""

from __future__ import annotations

from pstage.config.loading import diff_configs, dump_config, load_config, merge, parse_overrides, read_yaml
from pstage.config.migration import load_run_config
from pstage.config.render import annotated_yaml, reference_markdown
from pstage.config.sections import (
    DEFAULT_BATCH,
    PRECISION_ALIASES,
    PRECISIONS,
    UNTUNABLE,
    AugmentConfig,
    BorderlineConfig,
    Config,
    CutMixConfig,
    DataConfig,
    DistillConfig,
    LogConfig,
    LossConfig,
    MixUpConfig,
    ModelConfig,
    OptimConfig,
    PersonsConfig,
    PseudoConfig,
    Section,
    SplitConfig,
    TrainConfig,
    TTAConfig,
    TuneConfig,
    TuneParam,
    all_keys,
    batch_of,
    parse_duration,
)

__all__ = [
    "DEFAULT_BATCH",
    "PRECISIONS",
    "PRECISION_ALIASES",
    "UNTUNABLE",
    "AugmentConfig",
    "BorderlineConfig",
    "Config",
    "CutMixConfig",
    "DataConfig",
    "DistillConfig",
    "LogConfig",
    "LossConfig",
    "MixUpConfig",
    "ModelConfig",
    "OptimConfig",
    "PersonsConfig",
    "PseudoConfig",
    "Section",
    "SplitConfig",
    "TTAConfig",
    "TrainConfig",
    "TuneConfig",
    "TuneParam",
    "all_keys",
    "annotated_yaml",
    "batch_of",
    "diff_configs",
    "dump_config",
    "load_config",
    "load_run_config",
    "merge",
    "parse_duration",
    "parse_overrides",
    "read_yaml",
    "reference_markdown",
]
