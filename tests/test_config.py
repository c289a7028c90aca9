import re
from pathlib import Path

import pytest
import yaml

from pstage.config import Config, TuneParam, all_keys, annotated_yaml, diff_configs, load_config, parse_overrides
from pstage.config.sections import section_type
from pstage.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_overrides_parse_as_yaml_values():
    cfg = load_config(
        None,
        ["train.epochs=3", "data.image_size=[64,48]", "optim.lr=3e-4", "train.folds=[0, 2]", "model.pretrained=true"],
    )
    assert cfg.train.epochs == 3
    assert cfg.data.image_size == (64, 48)  # the override, not the default
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.train.folds == [0, 2]
    assert cfg.model.pretrained is True


def test_file_then_overrides(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("model:\n  name: resnet34\ntrain:\n  epochs: 7\n")
    cfg = load_config(path, ["train.epochs=2"])
    assert (cfg.model.name, cfg.train.epochs) == ("resnet34", 2)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epoch=3", "unknown config key 'train.epoch'; did you mean 'train.epochs'?"),
        ("train.lr=0.1", "unknown config key 'train.lr'; did you mean 'optim.lr'?"),
        ("data.imagesize=[64,48]", "did you mean 'data.image_size'?"),
        ("train.epochs=ten", "config key 'train.epochs': Input should be a valid integer"),
        ("data.image_size=[64]", "config key 'data.image_size': expected two integers like [128, 96]"),
        ("data.on_bad_image=maybe", "config key 'data.on_bad_image': Input should be 'error' or 'skip' (got 'maybe')"),
        ("train.folds=[5]", "train.folds: fold 5 does not exist with split.folds=5"),
        ("model=resnet18", "config key 'model' is a section"),
        ("epochs", "override 'epochs' is not KEY=VALUE"),
    ],
)
def test_bad_keys_and_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_yaml_file_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochs: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+: invalid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


DEFAULT_YAML = ROOT / "src" / "pstage" / "configs" / "default.yaml"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
# a measurement in a description: a score next to a metric name (CV 0.632, F1 .684, ARI 0.99), a speed
# ratio (1.27x the time), a percentage (99.5%); those belong in benchmarks/RESULTS.md
MEASUREMENT = re.compile(
    r"(?i)\b(cv|f1|ari|eval|acc\.?|accuracy|gender|age|mask)\b[^;:]{0,40}?\d?\.\d{2,}|\d(\.\d+)?x the\b|\d(\.\d+)?\s?%"
)


def descriptions() -> dict[str, str]:
    """Every dotted key's description, tune.space's dimension fields included."""
    out = {}
    for key in all_keys():
        model, *parts = key.split(".")
        field = Config.model_fields[model]
        for part in parts:
            field = section_type(field.annotation).model_fields[part]
        out[key] = field.description or ""
    out.update({f"tune.space.*.{name}": f.description or "" for name, f in TuneParam.model_fields.items()})
    return out


def test_default_yaml_matches_the_code_defaults():
    """configs/default.yaml documents every default; it must not drift from the pydantic models,
    and its comments are the schema's descriptions, word for word (help lives once)."""
    shipped = yaml.safe_load(DEFAULT_YAML.read_text())
    assert diff_configs(shipped, Config().to_dict()) == []
    assert load_config(DEFAULT_YAML) == Config()
    assert DEFAULT_YAML.read_text() == annotated_yaml(), (
        "regenerate it: pstage config > src/pstage/configs/default.yaml"
    )


def test_every_key_is_documented():
    text = DEFAULT_YAML.read_text()
    for key, description in descriptions().items():
        assert description.strip(), f"{key} has no description"
    for key in all_keys():
        assert f"{key.rsplit('.', 1)[-1]}:" in text, key


def test_descriptions_are_short_and_hold_no_measurements():
    """One or two lines each; a number measured on some data goes to benchmarks/RESULTS.md, linked."""
    for key, description in descriptions().items():
        assert len(description) <= 240, f"{key}: {len(description)} characters (at most 240)"
        found = MEASUREMENT.search(description)
        assert found is None, f"{key}: '{found[0]}' looks like a measurement: move it to benchmarks/RESULTS.md"


@pytest.mark.parametrize(
    "text",
    [
        "On facemask 128x128 CV 0.677 / eval macro F1 0.685",
        "finds 99.5% of masked faces",
        "at 1.27x the wall time",
        "gender acc. .812",
    ],
)
def test_the_measurement_heuristic_catches_history(text):
    assert MEASUREMENT.search(text)


def test_results_links_in_descriptions_resolve():
    """Each benchmarks/RESULTS.md#anchor a description names is a heading there (GitHub's and mkdocs' slug)."""
    slugs = {
        re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in RESULTS.read_text().splitlines()
        if line.startswith("#")
    }
    linked = {
        (key, anchor)
        for key, description in descriptions().items()
        for anchor in re.findall(r"benchmarks/RESULTS\.md#([a-z0-9-]+)", description)
    }
    assert len(linked) >= 10  # the defaults that rest on a measurement say where
    for key, anchor in linked:
        assert anchor in slugs, f"{key} links to benchmarks/RESULTS.md#{anchor}, which has no such heading"


def test_parse_overrides_nests():
    assert parse_overrides(["a.b=1", "a.c=x"]) == {"a": {"b": 1, "c": "x"}}


def test_runs_saved_without_tta_train_stay_single_view(tmp_path):
    """A run whose config predates tta.train predicted single-view: re-predicting or exporting it must not add TTA."""
    from pstage.config import load_run_config

    path = tmp_path / "config.yaml"
    path.write_text("tta:\n  hflip: true\n")
    assert load_run_config(path).tta.train is False
    path.write_text("tta:\n  train: true\n  hflip: true\n")
    assert load_run_config(path).tta.train is True


def test_runs_saved_without_face_detector_crop_with_haar(tmp_path):
    """The implied values fill only what a saved config lacks; a new run's defaults are untouched."""
    from pstage.config import load_run_config

    path = tmp_path / "config.yaml"
    path.write_text("data:\n  face_crop: true\ntta:\n  hflip: false\n")
    cfg = load_run_config(path)
    assert (cfg.data.face_detector, cfg.data.face_crop, cfg.tta.train, cfg.tta.hflip) == ("haar", True, False, False)
    path.write_text("data:\n  face_detector: retinaface\n")
    assert load_run_config(path).data.face_detector == "retinaface"
    assert load_config(None).data.face_detector == "retinaface"


@pytest.mark.parametrize(
    ("value", "canonical"),
    [
        ("32", "32-true"),
        ("16", "16-mixed"),
        ("bf16", "bf16-mixed"),
        ("64", "64-true"),
        ("'32'", "32-true"),
        ("bf16-mixed", "bf16-mixed"),
        ("32-true", "32-true"),
        ("auto", "auto"),
    ],
)
def test_precision_takes_what_lightning_takes_in_its_canonical_spelling(value, canonical):
    """train.precision=32 is an int once parsed as YAML: it must mean what Lightning means by it."""
    assert load_config(None, [f"train.precision={value}"]).train.precision == canonical
    if value.isdigit():  # a config file's `precision: 32` is an int too
        assert Config.model_validate({"train": {"precision": int(value)}}).train.precision == canonical


def test_precision_refusals_are_one_line_and_cpu_fp16_autocast_is_bf16():
    from pstage.core.devices import resolve_precision

    with pytest.raises(ConfigError, match="train.precision.*expected one of auto, 32-true") as info:
        load_config(None, ["train.precision=fp8"])
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="train.precision"):
        load_config(None, ["train.precision=true"])
    assert resolve_precision("16-mixed", "cpu") == "bf16-mixed"  # what Lightning runs there, said and predicted alike
    assert resolve_precision("32-true", "cpu") == "32-true"
    with pytest.raises(ConfigError, match="transformer-engine needs a CUDA GPU"):
        resolve_precision("transformer-engine", "cpu")


def test_on_off_switches_survive_yaml_booleans():
    """`train.final_fit=off` on the command line is YAML's False: the switch must read it as its word."""
    cfg = load_config(None, ["train.final_fit=off", "persons.group=on", "train.channels_last=false"])
    assert (cfg.train.final_fit, cfg.persons.group) == ("off", "on")
    assert cfg.train.channels_last is False  # a setting that takes a bool keeps it
    assert load_config(None, ["persons.group=off"]).persons.group == "off"
    with pytest.raises(ConfigError, match="train.final_fit"):
        load_config(None, ["train.final_fit=on"])  # no such word: still refused
