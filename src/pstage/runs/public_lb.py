"""``pstage lb RUN SCORE``: log a public-leaderboard score for a run's submission, in its run.json.

Teams keep these in spreadsheets; here each score sits beside the CV of the submission it scored
(the run's CV when logged) with when, who, a note and the submission file's digest, so the board
can show it and plot CV against the public score for every logged submission.

Only a run's owner logs its scores: a pulled copy (``runs/<user>/<name>``) is replaced by the
next pull, and its owner's next publish would not carry a score logged on someone else's
machine, so it is refused with the command its owner runs. With a store, the run is re-published
(only run.json changes), as it was published before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from pstage.core.errors import ConfigError, RunError
from pstage.core.io import now, sha256_file
from pstage.runs.info import LeaderboardScore
from pstage.runs.rundir import PULLED, RunDir, provenance, resolve_run
from pstage.runs.store import masked, republish, store_uri


@dataclass
class Logged:
    """What ``log_score`` recorded, and where it was published (None: only locally)."""

    run: str
    path: Path
    entry: LeaderboardScore
    count: int  # scores logged for this run so far, this one included
    published: str | None = None


def parse_score(text: str | float) -> float:
    """A public macro F1: a finite number in [0, 1]; anything else is one line naming the value."""
    try:
        score = float(str(text).strip().rstrip("%")) / (100 if str(text).strip().endswith("%") else 1)
    except ValueError:
        score = math.nan
    if not math.isfinite(score) or not 0.0 <= score <= 1.0:
        raise ConfigError(
            f"SCORE {text!r}: expected the public leaderboard's macro F1, a number from 0 to 1 (e.g. 0.7421)"
        )
    return score


def log_score(
    run: str | Path,
    score: str | float,
    *,
    runs_dir: str | Path = "runs",
    store: str | None = None,
    note: str | None = None,
    tta: bool = False,
) -> Logged:
    """Append a public-leaderboard ``score`` for ``run``'s submission.csv (``tta``: submission_tta.csv)
    to its run.json, under the run's lock; with ``store``, publish the run again."""
    value = parse_score(score)
    store = store_uri(store)
    path = resolve_run(run, runs_dir)
    rundir = RunDir(path)
    info = rundir.read_info()
    if (path / PULLED).is_file():
        owner = info.user or "its owner"
        where = f" --store {masked(store)}" if store else " --store URI"
        raise RunError(
            f"{owner}/{info.name} is {owner}'s run, pulled from the team store: only its owner logs its scores "
            f"(a pull would replace this copy); ask {owner} to run: pstage lb {info.name} {value:g}{where}"
        )
    if not info.done:
        raise RunError(f"{path}: run is {info.status}; log public scores of finished runs (their submission.csv)")
    file = "submission_tta.csv" if tta else "submission.csv"
    if not (path / file).is_file():
        hint = f"make it with pstage predict {info.name} --tta" if tta else "the run had no test set to predict"
        raise RunError(f"{path}: {file} is missing ({hint}); nothing was scored")
    cv = info.tta.cv.macro_f1 if tta and info.tta is not None and info.tta.cv is not None else info.score
    if tta and cv is None:
        raise RunError(f"{path}: run.json has no CV with TTA; run pstage predict {info.name} --tta first")
    entry = LeaderboardScore(
        score=value,
        at=now(),
        user=provenance()["user"],
        cv=cv,
        submission=sha256_file(path / file)[:16],
        file=file,
        note=note.strip() if note and note.strip() else None,
    )
    with rundir.lock():
        current = rundir.read_info()
        entries = [e.record() for e in current.leaderboard or []] + [entry.record()]
        rundir.update_info(leaderboard=entries)
    done = republish(path, store, runs_dir=runs_dir)
    return Logged(info.name or path.name, path, entry, len(entries), done.url if done else None)
