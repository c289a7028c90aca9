"""What scaling out costs on one small machine: Ray's start-up, an Optuna trial's bookkeeping on
PostgreSQL vs SQLite, and one fold trained as a two-node DDP run vs one process.

    python benchmarks/scaleout.py [--ddp]       # PostgreSQL: Debian's postgresql (initdb, pg_ctl)

The storage figure is the Optuna side of a trial only (ask, one report per epoch, tell, heartbeat
on), what a trial pays on top of its training. Run it on a quiet machine; benchmarks/RESULTS.md quotes it
with the load it had.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.postgres: the throw-away server the tests use


def ray_startup() -> dict[str, float]:
    """Seconds to import Ray, start a local Ray (no dashboard) and shut it down."""
    code = (
        "import time; t=time.perf_counter(); import ray; a=time.perf_counter(); "
        "ray.init(include_dashboard=False, log_to_driver=False); b=time.perf_counter(); ray.shutdown(); "
        "print(a-t, b-a, time.perf_counter()-b)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    imp, init, down = map(float, out.stdout.split()[-3:])
    return {"import_s": imp, "init_s": init, "shutdown_s": down}


def trial_overhead(url: str, trials: int = 30, steps: int = 10) -> float:
    """Mean seconds of Optuna bookkeeping per trial (ask + suggest + `steps` reports + tell)."""
    import optuna

    from pstage.tuning.study import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=open_storage(url), study_name=f"bench-{time.time_ns()}", direction="maximize")
    started = time.perf_counter()
    for _ in range(trials):
        trial = study.ask()
        x = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        for step in range(steps):
            trial.report(x * step, step)
        study.tell(trial, x)
    return (time.perf_counter() - started) / trials


def ddp_cost(tmp: Path) -> dict[str, float]:
    """Wall seconds of one tiny fold: one process vs two 'nodes' (gloo on 127.0.0.1)."""
    from tests.conftest import FAST, free_port

    from pstage.demo.synthetic import make_demo_data

    data = make_demo_data(tmp / "data", persons=30, eval_persons=6, image_size=(64, 48), seed=0)
    common = [*FAST, "train.folds=[0]", "train.epochs=3", "train.accelerator=cpu", "train.num_workers=0"]
    base = [sys.executable, "-m", "pstage", "train", "--data", str(data), "--runs", str(tmp / "runs")]
    t = time.perf_counter()
    subprocess.run([*base, "--name", "one", *common], check=True, capture_output=True)
    one = time.perf_counter() - t
    port, t = free_port(), time.perf_counter()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    nodes = [
        subprocess.Popen(
            [*base, "--name", "two", *common, "train.num_nodes=2", "train.devices=1", "train.strategy=ddp"],
            env={**env, "NODE_RANK": str(rank)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for rank in (0, 1)
    ]
    assert [n.wait() for n in nodes] == [0, 0]
    return {"one_process_s": one, "two_nodes_s": time.perf_counter() - t}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ddp", action="store_true", help="also time the two-node DDP fold (~1-3 min)")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    print(f"load average at start: {load:.1f} on {os.cpu_count()} cores")
    print("ray:", {k: round(v, 1) for k, v in ray_startup().items()})
    from tests.postgres import postgres_server

    with tempfile.TemporaryDirectory() as tmp:
        sqlite = trial_overhead(f"sqlite:///{tmp}/bench.db")
        with postgres_server() as url:
            postgres = trial_overhead(url)
        print(
            f"optuna bookkeeping per trial (10 reports): sqlite {sqlite * 1000:.0f} ms, postgresql {postgres * 1000:.0f} ms"
        )
        if args.ddp:
            print("ddp:", {k: round(v, 1) for k, v in ddp_cost(Path(tmp)).items()})
    print(f"load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
