"""Validation folds of a dataset's labelled pairs, for `road-sslkd bench` without touching the test split.

Fold k moves labelled pairs [k*size, (k+1)*size) into 'test' and keeps the rest labelled; the unlabelled
images stay as they are and the real test pairs are left out. Each fold is a folder with a split.json of
absolute paths, so nothing is copied:

    python scripts/validation_folds.py ../shared/data/cil_road_2016 runs/val --folds 3 --size 3
    road-sslkd bench --data runs/val/fold_0 --preset cpu --seeds 0 --out runs/val/report_0 --work runs/val/work_0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def write_folds(data: Path, out: Path, folds: int, size: int) -> list[Path]:
    """One folder per fold under ``out``; raises ValueError when the folds would need more labelled pairs."""
    split = json.loads((data / "split.json").read_text())
    labelled = split["labelled"]
    if folds * size >= len(labelled):
        raise ValueError(f"{folds} folds of {size} need more than the {len(labelled)} labelled pairs")

    def pair(p: dict) -> dict:
        return {"image": str((data / p["image"]).resolve()), "mask": str((data / p["mask"]).resolve())}

    paths = []
    for k in range(folds):
        held = set(range(k * size, (k + 1) * size))
        fold = {
            "about": f"validation fold {k} of {data}: labelled pairs {sorted(held)} (split order) held out as 'test'",
            "labelled": [pair(p) for i, p in enumerate(labelled) if i not in held],
            "unlabelled": [str((data / p).resolve()) for p in split.get("unlabelled", [])],
            "test": [pair(p) for i, p in enumerate(labelled) if i in held],
        }
        path = out / f"fold_{k}"
        path.mkdir(parents=True, exist_ok=True)
        (path / "split.json").write_text(json.dumps(fold, indent=1))
        paths.append(path)
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path, help="dataset folder with split.json")
    p.add_argument("out", type=Path, help="folder for fold_0, fold_1, ...")
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--size", type=int, default=3, help="labelled pairs held out per fold")
    args = p.parse_args()
    for path in write_folds(args.data, args.out, args.folds, args.size):
        print(path)


if __name__ == "__main__":
    main()
