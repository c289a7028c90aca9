"""``train.time``: the whole ``pstage train`` command — cache, every requested fold, the final fit,
predictions — within a time budget, K folds planned from measured speed.

1. Before the run folder exists, a speed probe (a few training and prediction steps of the real model
   on random images) and a decoding sample give the budget's minimum: the cache plus one epoch and the
   predictions of every fold. A smaller budget is refused, naming the minimum.
2. Each model (fold, final fit), when it starts, gets an equal share of the time left, and as many
   epochs as fit in it at the measured speed (``train.epochs`` is the cap); its LR schedule is set to
   end with the last planned epoch.
3. After every epoch the speed is measured again (per training and validation step, the first
   steps' start-up left out; the median of the last 5 epochs). The run's first two measured epochs
   re-plan the first model either way (the probe does not see data loading); later a model running
   slow gets fewer epochs, one running fast early in its schedule more, and its LR schedule follows.
   A model cut short still gets one more epoch to end its schedule, unless that passes its hard
   deadline. What a model leaves unused goes to the next ones.
4. With the folds planned by the budget (``train.folds`` unset), each finished fold's measured speed
   checks the plan again: planned folds that can no longer get ``train.min_epochs`` epochs each are
   dropped (from the end), so the probe's optimism never leaves the last folds one-epoch models.
5. A model still training past its hard deadline (the budget, +5%, less what the models after it
   need at the least) stops after the current step, once it has one finished epoch.

run.json ``time_budget`` records the budget, the minimum, the cache time, and per model the planned
and actual epochs and seconds (written every epoch). Resuming a killed run counts the time already
spent: each started model keeps its plan (it also lives in the model's last.ckpt) unless the budget
left cannot hold it, and the others are planned in what is left.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import pstage.core.compat  # noqa: F401

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from pstage.config import Config, batch_of
from pstage.core.devices import inference_device
from pstage.core.tasks import Task
from pstage.data.cache import decode, is_cached, prepare
from pstage.data.sources import Source
from pstage.models.module import ClassifierModule

END_RESERVE_S = 2.0  # after the last model: run outputs, run.json, the summary, the interpreter's exit
OVERRUN = 0.05  # a model may run this fraction of the budget past its share before it is stopped mid-epoch
SETUP_S = 1.0  # per model, before any measurement: Trainer, loaders, checkpoints, loading best.ckpt


@dataclass
class Speed:
    """Seconds per image of the real model on this machine: a training step, and a prediction."""

    train_image_s: float
    predict_image_s: float
    decode_image_s: float  # decoding and resizing one photo into the cache (one thread)


def probe_speed(cfg: Config, task: Task, source: Source, precision: str) -> Speed:
    """Time a few optimizer steps and predictions of the configured model on random images, and the
    decoding of a few of the data's photos (a second or two for small models)."""
    module = ClassifierModule(cfg.to_dict(), task.to_dict())
    device = inference_device(cfg.train.accelerator)
    module.to(device)
    batch = max(2, min(batch_of(cfg.train), len(source.train)))
    height, width = cfg.data.image_size
    images = torch.randint(0, 256, (batch, height, width, 3), dtype=torch.uint8, device=device)
    optimizer = torch.optim.SGD(module.parameters(), lr=1e-6)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16 if "bf16" in precision else torch.float16)
    mixed = "mixed" in precision

    def step() -> None:
        with autocast if mixed else _nothing():
            loss = module(images).float().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    module.train()
    train_s = _timed(step, device) / batch
    module.eval()

    def predict() -> None:
        with torch.inference_mode(), autocast if mixed else _nothing():
            module(images)

    predict_s = _timed(predict, device) / batch
    return Speed(train_s, predict_s, _decode_seconds(source, cfg))


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *args: Any) -> None:
        return None


def _timed(
    work: Callable[[], None], device: torch.device, warmup: int = 2, repeat: int = 5, max_s: float = 3.0
) -> float:
    """The median seconds of ``work`` after ``warmup`` calls (the first calls compile kernels), over
    ``repeat`` calls or ``max_s`` seconds (at least two): a median ignores another process's burst."""

    def once() -> float:
        started = time.perf_counter()
        work()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - started

    for _ in range(warmup):
        once()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < 2 or (len(times) < repeat and time.perf_counter() - started < max_s):
        times.append(once())
    return statistics.median(times)


def _decode_seconds(source: Source, cfg: Config, sample: int = 4) -> float:
    """Seconds to decode, crop and resize one photo (the mean over a few of the training photos)."""
    d = cfg.data
    paths = source.train["path"].tolist()[:sample]
    started = time.perf_counter()
    for path in paths:
        try:
            prepare(
                decode(path), tuple(d.image_size), d.face_crop is True, d.face_margin, d.center_crop, d.face_detector
            )
        except Exception:  # an unreadable photo: the cache reports it; here it only costs nothing
            pass
    return (time.perf_counter() - started) / max(1, len(paths))


def cache_seconds(source: Source, cfg: Config, speed: Speed) -> float:
    """The expected time to build the caches this run needs (0 when they are already built)."""
    d = cfg.data
    todo = 0
    for table in (source.train, source.test):
        if table is None:
            continue
        paths = table["path"].tolist()
        if not is_cached(
            paths, d.image_size, d.face_crop is True, d.face_margin, d.center_crop, d.face_detector, d.cache_dir
        ):
            todo += len(paths)
    return todo * speed.decode_image_s / (os.cpu_count() or 1)  # build_cache decodes on every core


class Budget:
    """The run's time budget: its deadline, the measured speed, and each model's plan.

    ``record`` is called whenever a plan changes (train.py writes run.json then), so a run killed
    mid-fold keeps its plan and its time spent.
    """

    def __init__(
        self,
        seconds: float,
        started: float,
        speed: Speed,
        cap: int,
        previous: dict[str, Any] | None = None,
        spent_before: float = 0.0,
        views: int = 1,
    ):
        previous = previous or {}
        self.views = views  # each validation and test image is predicted once per TTA view (tta.train)
        self.seconds = float(seconds)
        self.spent_before = spent_before  # by the earlier attempts of a resumed run
        self.deadline = started + self.seconds - spent_before  # the clock of this attempt
        self.speed = speed
        self.cap = cap
        self.minimum_s: float | None = previous.get("minimum_s")
        self.cache_s: float | None = previous.get("cache_s")
        self.models: dict[str, dict[str, Any]] = {k: dict(v) for k, v in previous.get("models", {}).items()}
        measured = previous.get("measured", {})
        # measured per epoch: seconds per training image, per validation image, and the rest (checkpoints)
        self.rates: dict[str, float] | None = measured.get("rates")
        self._recent: list[dict[str, float]] = [self.rates] if self.rates else []
        self.overhead_s: float | None = measured.get("overhead_s")  # per model, besides its epochs
        self._steady = self.rates is not None
        self.folds: list[int] | None = previous.get("folds")  # the folds the run trains (planned or given)
        self.grouping_per_fold = 0.0  # images predicted again after the last model, per fold (set by train.py)
        self.record: Callable[[], None] = lambda: None

    def reserve(self, folds: int | None = None) -> float:
        """Seconds kept for the work after the last model: the run's outputs, and the person
        grouping's second pass over the OOF and test images of every fold (``grouping_per_fold``; 6%
        of a 15-minute 5-fold run on facemask, which overran the budget before it was counted).
        ``folds``: how many folds the run trains (default: the plan's)."""
        per_image = self.rates["val_image_s"] if self.rates is not None else self.speed.predict_image_s
        folds = len(self.folds or []) if folds is None else folds
        return END_RESERVE_S + self.grouping_per_fold * folds * per_image

    def left(self) -> float:
        return self.deadline - time.time()

    def epoch_s(self, n_train: int, n_val: int) -> float:
        """An epoch's expected seconds: measured once one has run, else the probe's (training + validation)."""
        if self.rates is not None:
            return n_train * self.rates["train_image_s"] + n_val * self.rates["val_image_s"] + self.rates["rest_s"]
        return n_train * self.speed.train_image_s + n_val * self.speed.predict_image_s

    def overhead(self, n_predict: int) -> float:
        """A model's seconds besides its epochs: set-up, checkpoints, and predicting ``n_predict`` images
        (once per TTA view)."""
        if self.overhead_s is not None:
            return self.overhead_s
        return SETUP_S + n_predict * self.views * self.speed.predict_image_s

    def minimum(self, elapsed: float, cache_s: float, models: list[tuple[int, int, int]]) -> float:
        """Seconds for the cache, then one epoch and the predictions of each (n_train, n_val, n_test) model."""
        need = elapsed + cache_s + self.reserve()
        for n_train, n_val, n_test in models:
            need += self.epoch_s(n_train, n_val) + self.overhead(n_val + n_test)
        return need

    def affordable(
        self, models: list[tuple[int, int, int]], epochs: int, fixed: int = 0, done: int = 0, before: float = 0.0
    ) -> int:
        """How many of the fold ``models`` ((n_train, n_val, n_test) each, in order) still get ``epochs``
        epochs and their predictions in the time left, with the last ``fixed`` of them (the final
        fit), which always run. ``done``: folds already trained (the grouping pass covers them too);
        ``before``: seconds of other work first (the cache, when the run has not started). The one
        search behind both the fold plan before a run and its re-check after each fold."""
        for m in range(len(models) - fixed, -1, -1):
            chosen = models[:m] + models[len(models) - fixed :]
            work = sum(epochs * self.epoch_s(t, v) + self.overhead(v + p) for t, v, p in chosen)
            if before + self.reserve(done + m) + work <= self.left():
                return m
        return 0

    def plan(self, name: str, n_train: int, n_val: int, n_test: int, models_left: int, cap: int) -> int:
        """Epochs for model ``name`` out of an equal share of the time left; a started model keeps its plan."""
        entry = self.models.get(name)
        if entry and "planned_epochs" in entry:
            return int(entry["planned_epochs"])
        share = (self.left() - self.reserve()) / max(1, models_left)
        epoch = self.epoch_s(n_train, n_val)
        epochs = int(max(1, min(cap, (share - self.overhead(n_val + n_test)) // epoch)))
        self.models[name] = {
            "share_s": round(share, 1),
            "first_plan": epochs,
            "planned_epochs": epochs,
            "epochs": 0,
            "seconds": None,
        }
        self.record()
        return epochs

    def start(self, name: str, n_train: int, n_val: int, n_test: int, models_left: int, cap: int) -> BudgetStop:
        """Plan model ``name`` (one of ``models_left`` still to fit, itself included) and return the
        callback that keeps it in its share; ``callback.planned`` is the Trainer's max_epochs."""
        self.plan(name, n_train, n_val, n_test, models_left, cap)
        now, after = time.time(), self.overhead(n_val + n_test)
        share_end = now + (self.left() - self.reserve()) / max(1, models_left)
        least_after = (models_left - 1) * (self.epoch_s(n_train, n_val) + after)  # the later models' minimum
        return BudgetStop(
            self,
            name,
            n_train,
            n_val,
            cap,
            soft_deadline=share_end - after,
            hard_deadline=self.deadline + OVERRUN * self.seconds - self.reserve() - after - least_after,
            first_measurement=self.rates is None,
        )

    def observe_epoch(
        self, train_s: float, n_train: int, val_s: float, n_val: int, rest_s: float, steady: bool
    ) -> None:
        """An epoch's seconds: training steps, validation steps, the rest (checkpoints, hooks). An
        unsteady epoch (too few steps to leave out the start-up) counts only until a steady one has
        been seen; the rates are the median of the last 5 steady epochs (a burst of another process
        on a shared machine moves a median little)."""
        rates = {"train_image_s": train_s / max(1, n_train), "rest_s": rest_s}
        rates["val_image_s"] = (
            val_s / n_val if n_val else (self.rates or {}).get("val_image_s", self.speed.predict_image_s)
        )
        if steady and not self._steady:
            self._recent = []  # the first steady epoch replaces the guesses before it
        if steady or not self._steady:
            self._recent = [*self._recent, rates][-5:]
            self.rates = {k: statistics.median(r[k] for r in self._recent) for k in rates}
        self._steady = self._steady or steady

    def finish(self, name: str, seconds: float, epochs: int, epoch_seconds: list[float]) -> None:
        """A model is done: record its actual epochs and seconds; learn the per-model overhead."""
        entry = self.models.setdefault(name, {})
        entry.update(epochs=epochs, seconds=round(seconds, 2))
        if epoch_seconds:  # steady epoch seconds: the first epoch's start-up counts as overhead
            self.overhead_s = max(0.0, seconds - sum(epoch_seconds))
        self.record()

    def to_dict(self, used_s: float) -> dict[str, Any]:
        return {
            "budget_s": self.seconds,
            "used_s": round(used_s, 2),
            "minimum_s": None if self.minimum_s is None else round(self.minimum_s, 1),
            "cache_s": None if self.cache_s is None else round(self.cache_s, 2),
            "epochs_cap": self.cap,
            "folds": self.folds,
            "models": self.models,
            "probe_s": asdict(self.speed),  # seconds per image, measured before the first model
            "measured": {"rates": self.rates, "overhead_s": self.overhead_s},
        }


class BudgetStop(Callback):
    """Keeps one model inside its share of the budget: re-plans its epochs (and LR schedule) from the
    measured epoch time, and stops it mid-epoch past its hard deadline. Its plan is saved in last.ckpt."""

    def __init__(
        self,
        budget: Budget,
        name: str,
        n_train: int,
        n_val: int,
        cap: int,
        soft_deadline: float,
        hard_deadline: float,
        first_measurement: bool,
    ):
        self.budget, self.name, self.n_train, self.n_val, self.cap = budget, name, n_train, n_val, cap
        self.soft_deadline, self.hard_deadline = soft_deadline, hard_deadline
        # The run's first model was planned from the probe: its first two epochs (the first one also
        # starts the loaders) re-plan it either way; after that a model's plan only shrinks.
        self.free_replans = 2 if first_measurement else 0
        self.planned = int(budget.models[name]["planned_epochs"])
        self.epoch_seconds: list[float] = []  # each epoch's steady seconds (the first one's start-up left out)
        self.epochs_done = 0
        self.stopped_early = False
        self._last = self._step = time.time()
        self._train_steps: list[float] = []
        self._val_steps: list[float] = []

    def state_dict(self) -> dict[str, Any]:
        return {"planned": self.planned}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.planned = int(state_dict.get("planned", self.planned))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.planned = int(trainer.strategy.broadcast(self.planned, src=0))
        self._apply(trainer, pl_module, self.planned)
        self.epochs_done = trainer.current_epoch
        self._last = time.time()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._step = time.time()
        self._train_steps, self._val_steps = [], []

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._step = time.time()

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        now = time.time()
        self._val_steps.append(now - self._step)
        self._step = now

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        now = time.time()
        train_s, val_s = sum(self._train_steps), sum(self._val_steps)
        rest_s = max(0.0, now - self._last - train_s - val_s)
        self._last = now
        steady = bool(self.epoch_seconds) or len(self._train_steps) > 1
        if not self.epoch_seconds:  # the first epoch also starts the loaders and warms the kernels up
            train_s -= _startup(self._train_steps)
            val_s -= _startup(self._val_steps)
        self.epoch_seconds.append(train_s + val_s + rest_s)
        done = self.epochs_done = trainer.current_epoch + 1
        self.budget.observe_epoch(train_s, self.n_train, val_s, self.n_val if self._val_steps else 0, rest_s, steady)
        epoch = self.budget.epoch_s(self.n_train, self.n_val)
        fits = done + max(0, math.floor((self.soft_deadline - now) / epoch))
        if self.free_replans:  # the probe's guess meets the real speed
            planned = min(self.cap, fits)
            self.free_replans -= 1
        elif (
            self.planned < self.cap and done <= self.planned / 2 and fits >= max(self.planned + 2, 1.25 * self.planned)
        ):
            planned = min(self.cap, fits)  # running fast, early in its schedule: use the time
        elif now + (self.planned - done) * epoch > self.soft_deadline + 0.5 * epoch:  # running slow
            planned = fits
        else:
            planned = self.planned
        cut = planned <= done < self.planned  # stopping now would leave the LR schedule unfinished
        if cut and now + epoch <= self.hard_deadline:
            planned, cut = done + 1, False  # one more epoch, over which the schedule ends
        planned = int(trainer.strategy.broadcast(max(done, planned), src=0))
        if planned != self.planned:
            self._apply(trainer, pl_module, planned)
        entry = self.budget.models[self.name]
        entry.update(planned_epochs=planned, epochs=done)
        if cut:
            entry["schedule_cut"] = True
        self.budget.record()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        now = time.time()
        self._train_steps.append(now - self._step)
        self._step = now
        if trainer.current_epoch < 1 or trainer.should_stop:  # never before one validated epoch
            return
        late = trainer.strategy.reduce_boolean_decision(time.time() > self.hard_deadline, all=False)
        if late:
            trainer.should_stop = True
            self.stopped_early = True
            self.budget.models[self.name]["stopped_mid_epoch"] = True

    def _apply(self, trainer: L.Trainer, pl_module: L.LightningModule, planned: int) -> None:
        self.planned = planned
        trainer.fit_loop.max_epochs = planned
        plan = getattr(pl_module, "plan_epochs", None)
        if plan is not None:
            plan(planned)


def _startup(steps: list[float]) -> float:
    """How much longer a loop's first steps took than its steady ones (loader start, kernel warm-up)."""
    if len(steps) < 2:
        return 0.0
    cold = min(2, len(steps) - 1)  # the first two steps, where there are later ones to compare with
    return max(0.0, sum(steps[:cold]) - cold * statistics.median(steps[cold:]))
