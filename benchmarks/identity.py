"""Identity grouping on real faces: how well each embedding puts a person's photos together.

Embeds the first ``--persons`` training persons of a facemask build (``../shared/data/facemask``;
each person: 5 masked photos, 1 worn wrong, 1 without) and clusters them in groups of ``--chunk``
persons, as the product does (one fold's OOF rows; a test set): average linkage on cosine
distance with the mask-state cannot-links (``pstage.inference.persons``; true mask states here,
the models predict them at .999). Prints a Markdown table: ARI, share of photos grouped exactly
with their person, groups per ``--chunk`` persons, at the cut chosen on the other chunks (the
product chooses it on OOF), and at each chunk's best cut; and the embedding speed.

    python ../shared/data/facemask/build.py /tmp/facemask
    python benchmarks/identity.py --data /tmp/facemask --persons 600

Rows: the product's embedding (``dlib_resnet``: eyes+nose alignment, chip grey below row
``MASK_ROW``) and variants of its chip. The fold models' features (``persons.embedding=fold``)
need a trained run: ``benchmarks/pooling.py --run runs/NAME --fold`` groups that run's OOF by them.
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from pstage.data import identity
from pstage.data.cache import decode, load_detections
from pstage.data.faces import locate
from pstage.inference.persons import cut, group_tree, purity

STATES = {"mask1": 0, "mask2": 0, "mask3": 0, "mask4": 0, "mask5": 0, "incorrect_mask": 1, "normal": 2}
CUTS = np.round(
    np.concatenate([np.arange(0.005, 0.1, 0.005), np.arange(0.1, 1.0, 0.02)]), 3
)  # fine where raw embeddings cut


def photos(data: Path, persons: int) -> pd.DataFrame:
    """path, person, state of the first ``persons`` persons' photos."""
    table = pd.read_csv(data / "train" / "train.csv", dtype=str).head(persons)
    rows = [
        (str(data / "train" / "images" / folder / f"{stem}.jpg"), k, state)
        for k, folder in enumerate(table["path"])
        for stem, state in STATES.items()
    ]
    return pd.DataFrame(rows, columns=["path", "person", "state"])


def faces(paths: list[str], cache_dir: str | None) -> np.ndarray:
    """RetinaFace detections (box + landmarks): the cache's where a build stored them, else detected now."""
    stored = load_detections(paths, "retinaface", cache_dir)
    if stored is not None:
        return stored
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        rows = pool.map(lambda p: locate("retinaface", decode(p)), paths)
        return np.stack([np.full(14, np.nan, np.float32) if r is None else r for r in rows])


def embed(paths: list[str], found: np.ndarray, mask_row: int) -> tuple[np.ndarray, float]:
    """dlib_resnet embeddings with the chip grey below ``mask_row``, and the seconds they took."""
    model = identity.get_face_model("dlib_resnet")
    saved, identity.MASK_ROW = identity.MASK_ROW, mask_row
    started = time.time()
    try:
        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            out = []
            for s in range(0, len(paths), 64):
                part = range(s, min(s + 64, len(paths)))
                chips = list(pool.map(lambda i: identity.chip(decode(paths[i]), found[i]), part))
                out.append(model.embed(np.stack(chips)))
    finally:
        identity.MASK_ROW = saved
    return np.concatenate(out), time.time() - started


def centred(x: np.ndarray, centre: np.ndarray) -> np.ndarray:
    return x - centre


def curves(x: np.ndarray, table: pd.DataFrame, chunk: int) -> list[list[dict[str, float]]]:
    """Per chunk of ``chunk`` persons: purity at every cut in CUTS."""
    out = []
    for start in range(0, table["person"].max() + 1, chunk):
        rows = ((table["person"] >= start) & (table["person"] < start + chunk)).to_numpy()
        if table.loc[rows, "person"].nunique() < chunk:
            continue
        tree = group_tree(x[rows], table.loc[rows, "state"].to_numpy())
        persons = table.loc[rows, "person"].to_numpy()
        out.append([purity(cut(tree, int(rows.sum()), t), persons) for t in CUTS])
    return out


def summary(found: list[list[dict[str, float]]]) -> dict[str, float]:
    """ARI / exact / groups at the cut chosen on the other chunks (mean over chunks), and at the best cut."""
    ari = np.array([[p["ari"] for p in c] for c in found])
    chosen, best = [], []
    for k in range(len(found)):
        others = np.delete(ari, k, axis=0).mean(0) if len(found) > 1 else ari[k]
        chosen.append(found[k][int(others.argmax())])
        best.append(found[k][int(ari[k].argmax())])
    mean = lambda rows, key: float(np.mean([r[key] for r in rows]))  # noqa: E731
    return {
        "ari": mean(chosen, "ari"),
        "exact": mean(chosen, "exact"),
        "groups": mean(chosen, "groups"),
        "best_ari": mean(best, "ari"),
        "cut": float(CUTS[int(ari.mean(0).argmax())]),
    }


def markdown(frame: pd.DataFrame, digits: int) -> str:
    """A Markdown table (pandas' to_markdown needs the tabulate package)."""
    cell = lambda v: f"{v:.{digits}f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--persons", type=int, default=600)
    parser.add_argument("--chunk", type=int, default=300)
    parser.add_argument("--cache", default=None, help="data.cache_dir (detections stored there are reused)")
    args = parser.parse_args()
    table = photos(args.data, args.persons)
    paths = table["path"].tolist()
    found = faces(paths, args.cache)
    rows = []
    variants = [("dlib_resnet (default)", identity.MASK_ROW), ("chip not greyed", identity.CHIP)]
    variants += [(f"grey from row {r}", r) for r in (86, 62) if r != identity.MASK_ROW]
    load = os.getloadavg()[0]
    for name, mask_row in variants:
        x, seconds = embed(paths, found, mask_row)
        centre = x.mean(
            0
        )  # the product centres on its training photos' mean (the mean is stable: cos 0.9996 between chunks)
        result = summary(curves(centred(x, centre), table, args.chunk))
        rows.append({"embedding": name, **result, "ms_per_photo": 1000 * seconds / len(paths)})
        if mask_row == identity.MASK_ROW:  # raw face embeddings all point one way: centring spreads them
            raw = summary(curves(x, table, args.chunk))
            rows.append({"embedding": f"{name}, not centred", **raw, "ms_per_photo": rows[-1]["ms_per_photo"]})
        print(rows[-1], flush=True)  # progress: each variant takes minutes
    frame = pd.DataFrame(rows)
    print(
        f"{len(paths)} photos of {args.persons} persons, chunks of {args.chunk}; "
        f"{os.cpu_count()} cores, load average {load:.1f} at the start\n"
    )
    print(markdown(frame, 3))


if __name__ == "__main__":
    main()
