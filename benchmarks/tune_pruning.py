"""Wall time of a 10-trial ``pstage tune`` study on demo data, with and without pruning.

    python benchmarks/tune_pruning.py [--trials 10] [--persons 100] [--size 32 24] [--out /tmp/tune-bench]

Same data, base config, space and sampler seed for both studies (the first 5 trials are TPE's
random startup, identical in both); only ``tune.pruner`` differs (median vs none). Prints each
study's wall time, trial states, epochs trained and best CV macro F1 on the searched folds.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import yaml

BASE = {
    "data": {"image_size": [32, 24]},
    "model": {"name": "test_resnet"},
    "split": {"folds": 3},
    "train": {"epochs": 6, "batch_size": 32, "progress": "none"},
    "optim": {"lr": 0.01},
    "log": {"loggers": []},
    "tune": {
        "folds": [0, 1],
        "seed": 0,
        "startup_trials": 5,
        "pruner_startup_trials": 3,
        "pruner_warmup_steps": 2,
        "space": {
            "optim.lr": {"low": 1.0e-3, "high": 5.0e-2, "log": True},
            "loss.name": ["ce", "focal"],
            "augment.cutmix.p": [0.0, 0.5],
            "model.drop_rate": {"low": 0.0, "high": 0.3},
        },
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--persons", type=int, default=100)
    parser.add_argument("--size", type=int, nargs=2, default=[32, 24], help="model input H W (photos are 64x48)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import optuna

    from pstage.demo.synthetic import make_demo_data
    from pstage.tuning.tune import tune

    out = args.out or Path(tempfile.mkdtemp(prefix="tune-bench-"))
    shutil.rmtree(out / "runs", ignore_errors=True)
    data = out / "data"
    if not data.exists():
        make_demo_data(data, persons=args.persons, eval_persons=20, image_size=(64, 48), seed=0)
    rows = []
    for pruner in ("none", "median"):
        study = f"bench-{pruner}"
        cfg = out / f"{study}.yaml"
        values = {**BASE, "data": {"image_size": list(args.size)}, "tune": {**BASE["tune"], "pruner": pruner}}
        cfg.write_text(yaml.safe_dump(values, sort_keys=False))
        started = time.time()
        result = tune(cfg, trials=args.trials, data=data, runs=out / "runs", study=study)
        seconds = time.time() - started
        trials = optuna.load_study(study_name=study, storage=f"sqlite:///{out / 'runs' / 'tune.db'}").trials
        epochs = sum(len(t.intermediate_values) for t in trials)
        rows.append((pruner, seconds, result.counts, epochs, result.best["value"] if result.best else None))
    size = "x".join(map(str, args.size))
    print(
        f"\n{args.trials} trials, {args.persons} persons, 64x48 photos at {size}, test_resnet, folds [0, 1] of 3 x 6 epochs:"
    )
    for pruner, seconds, counts, epochs, best in rows:
        print(
            f"  pruner {pruner:<6}  {seconds:6.0f} s  {counts}  epochs trained {epochs:3d}  best CV macro F1 {best:.4f}"
        )


if __name__ == "__main__":
    main()
