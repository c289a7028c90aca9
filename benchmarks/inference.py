"""Inference benchmark: eager PyTorch vs ONNX Runtime fp32 vs ONNX Runtime int8, on one run's OOF images.

For each backend: throughput (images/s at batch 64), latency of one image (median and p95 ms),
and the CV macro F1 on OOF (every image predicted by the fold model that never saw it), so speed
and accuracy are read side by side. Same graph, same pixels for all three.

    python benchmarks/inference.py RUN [--runs runs] [--data DIR] [--threads N]
    python benchmarks/inference.py --demo           # generate demo data, train a small run, then measure

The demo setting: make_demo_data(persons=100, image_size=(128, 96)), test_resnet at 64x48,
3 folds x 8 epochs, exported with --int8.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

DEMO = [
    "data.image_size=[64,48]",
    "model.name=test_resnet",
    "split.folds=3",
    "train.epochs=8",
    "train.batch_size=32",
    "optim.lr=0.01",
    "train.progress=none",
]


def timed(predict: Callable[[np.ndarray], np.ndarray], images: np.ndarray, batch: int, rounds: int) -> float:
    """Best-of-``rounds`` images/s over all ``images`` in batches of ``batch``."""
    predict(images[:batch])  # warm-up
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for start in range(0, len(images), batch):
            predict(images[start : start + batch])
        best = min(best, time.perf_counter() - started)
    return len(images) / best


def latency(predict: Callable[[np.ndarray], np.ndarray], images: np.ndarray, count: int) -> tuple[float, float]:
    """Median and p95 milliseconds for one image."""
    times = []
    for i in range(count):
        started = time.perf_counter()
        predict(images[i % len(images)][None])
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return statistics.median(times), times[int(0.95 * (len(times) - 1))]


def benchmark(run: str, runs: str, data: str | None, threads: int, batch: int, rounds: int) -> list[dict]:
    import torch

    from pstage.deploy.export import (
        EXPORT_DIR,
        INT8_FILE,
        MODEL_FILE,
        build_model,
        export,
        fold_predictions,
        oof_images,
        oof_score,
        ort_session,
        plan_export,
    )

    torch.set_num_threads(threads)
    plan = plan_export(run, runs)
    export_dir = plan.run_dir / EXPORT_DIR
    if not (export_dir / INT8_FILE).exists():
        print(f"exporting {plan.run_dir.name} (fp32 + int8) ...")
        export(run, runs=runs, int8=True, data=data)
    oof = oof_images(plan, data)
    model = build_model(plan)

    def eager(x: np.ndarray, output: int = 0) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x))[output].numpy()

    backends: dict[str, tuple[Callable, Callable]] = {"pytorch eager": (eager, lambda x: eager(x, 1))}
    for label, file in (("onnx fp32", MODEL_FILE), ("onnx int8", INT8_FILE)):
        session = ort_session(export_dir / file, threads)
        backends[label] = (
            lambda x, s=session: s.run(["probs"], {"images": x})[0],
            lambda x, s=session: s.run(["fold_probs"], {"images": x})[0],
        )
    rows = []
    for label, (predict, per_fold) in backends.items():
        f1 = oof_score(fold_predictions(per_fold, oof, plan.folds), oof, plan.task)["macro_f1"]
        ips = timed(predict, oof.images, batch, rounds)
        median, p95 = latency(predict, oof.images, 100)
        rows.append({"backend": label, "images_per_s": ips, "latency_ms": median, "p95_ms": p95, "oof_macro_f1": f1})
    size = (export_dir / MODEL_FILE).stat().st_size, (export_dir / INT8_FILE).stat().st_size
    models = sum(len(leaf.checkpoints) for leaf in plan.leaves)
    print(
        f"\n{plan.run_dir.name}: {models} fold model(s), input {plan.preprocess['image_size']}, {len(oof.images)} OOF images, "
        f"{threads} thread(s), batch {batch}; model.onnx {size[0] / 2**20:.1f} MiB, int8 {size[1] / 2**20:.1f} MiB\n"
    )
    print(f"| backend | img/s (batch {batch}) | latency 1 image, median ms | p95 ms | OOF macro F1 |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['backend']} | {r['images_per_s']:,.0f} | {r['latency_ms']:.2f} | {r['p95_ms']:.2f} | {r['oof_macro_f1']:.4f} |"
        )
    return rows


def demo(root: Path) -> tuple[str, str]:
    import pstage

    data = root / "data"
    if not (data / "train").exists():
        pstage.make_demo_data(data, persons=100, image_size=(128, 96))
    pstage.train(data=data, runs=root / "runs", name="bench", overrides=DEMO)
    return "bench", str(root / "runs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", help="run or ensemble (name under --runs, or a folder)")
    parser.add_argument("--runs", default="runs")
    parser.add_argument("--data", default=None, help="training data (default: the run's data.path)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--demo", type=Path, nargs="?", const=Path("bench-demo"), help="generate data and train first")
    args = parser.parse_args()
    run, runs = (args.run, args.runs) if not args.demo else demo(args.demo)
    if run is None:
        parser.error("give a RUN or --demo")
    benchmark(run, runs, args.data, args.threads, args.batch, args.rounds)


if __name__ == "__main__":
    main()
