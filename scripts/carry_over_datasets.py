"""Variants of a dataset for checking that the `cpu` preset carries over to other imagery unchanged.

- ``coarse``: every raster at half the ground resolution (2 x 2 pixel means; masks road where at least half
  the block was road), as imagery of twice the ground sample distance would show the same roads.
- ``centreline``: the same images, each labelled and test mask replaced by the skeleton of its road surface
  widened to 3 px, the way road centrelines (OpenStreetMap, say) are burnt into raster labels.

The masks of unlabelled images are never read. Files are GeoTIFFs under OUT/<variant>/ with a split.json of
relative paths, so a variant is an ordinary dataset folder:

    python scripts/carry_over_datasets.py ../shared/data/cil_road_2016 runs/carry
    road-sslkd bench --data runs/carry/centreline --preset cpu --seeds 0 --out runs/carry/report_centreline
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

import numpy as np
import rasterio
from rasterio.transform import Affine
from skimage.morphology import dilation, disk, skeletonize

Transform = Callable[[np.ndarray, bool], np.ndarray]  # (bands x rows x cols, is_mask) -> array to write


def coarse(array: np.ndarray, is_mask: bool) -> np.ndarray:
    """2 x 2 block means (odd edges dropped); a mask is road where half its block or more was road."""
    b, h, w = array.shape
    blocks = array[:, : h // 2 * 2, : w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2)
    if is_mask:
        return np.where((blocks > 0).mean(axis=(2, 4)) >= 0.5, 255, 0).astype(np.uint8)
    return np.round(blocks.mean(axis=(2, 4), dtype=np.float32)).astype(array.dtype)


def centreline(array: np.ndarray, is_mask: bool) -> np.ndarray:
    """A mask's road surface reduced to its skeleton and widened to 3 px; images unchanged."""
    if not is_mask:
        return array
    lines = dilation(skeletonize(array[0] > 0), disk(1))
    return (lines * 255).astype(np.uint8)[None]


VARIANTS: dict[str, tuple[Transform, int]] = {"coarse": (coarse, 2), "centreline": (centreline, 1)}  # and pixel scale


def _write(src: Path, dst: Path, variant: str, is_mask: bool) -> str:
    if dst.exists():
        raise FileExistsError(f"{dst} exists (two sources with one file name, or an earlier variant): "
                              "give an empty output folder")
    transform, scale = VARIANTS[variant]
    with rasterio.open(src) as ds:
        array = ds.read([1] if is_mask else list(range(1, ds.count + 1)))
        # georeferenced sources stay so, with pixels as much larger as the variant makes them
        where = {"crs": ds.crs, "transform": ds.transform * Affine.scale(scale)} if ds.crs else {}
    out = transform(array, is_mask)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(dst, "w", driver="GTiff", width=out.shape[2], height=out.shape[1], count=out.shape[0],
                       dtype=out.dtype, **where) as ds:
        ds.write(out)
    return str(dst.relative_to(dst.parent.parent))


def write_variant(data: Path, out: Path, name: str) -> Path:
    """One variant of the dataset at ``data`` in ``out/name``; returns that folder."""
    split = json.loads((data / "split.json").read_text())
    folder = out / name

    def pair(p: dict) -> dict:
        stem = Path(p["image"]).stem
        return {"image": _write(data / p["image"], folder / "images" / f"{stem}.tif", name, False),
                "mask": _write(data / p["mask"], folder / "masks" / f"{stem}.tif", name, True)}

    variant = {
        "about": f"'{name}' variant of {data.resolve()} (scripts/carry_over_datasets.py); the split is the "
                 "source's, with its rules: test pairs are for the final evaluation only",
        "labelled": [pair(p) for p in split["labelled"]],
        "unlabelled": [_write(data / p, folder / "images" / f"{Path(p).stem}.tif", name, False)
                       for p in split.get("unlabelled", [])],
        "test": [pair(p) for p in split.get("test", [])],
    }
    (folder / "split.json").write_text(json.dumps(variant, indent=1))
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path, help="dataset folder with split.json")
    p.add_argument("out", type=Path, help="folder for the variants")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    args = p.parse_args()
    for name in args.variants.split(","):
        print(write_variant(args.data, args.out, name))


if __name__ == "__main__":
    main()
