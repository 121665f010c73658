"""scripts/carry_over_datasets.py on SYNTHETIC scenes: each variant is a dataset the backend reads."""

from pathlib import Path

import numpy as np
import pytest
import rasterio
from skimage.morphology import dilation, disk

from conftest import load_script
from road_sslkd.data import DatasetSpec


@pytest.fixture(scope="module")
def carry():
    return load_script("carry_over_datasets")


def _read(path: Path) -> tuple[np.ndarray, rasterio.Affine, object]:
    with rasterio.open(path) as ds:
        return ds.read(), ds.transform, ds.crs


def test_coarse_halves_the_ground_resolution(carry, tiny_dataset, tmp_path):
    source = DatasetSpec.from_split(tiny_dataset)
    variant = DatasetSpec.from_split(carry.write_variant(tiny_dataset, tmp_path, "coarse"))
    assert (len(variant.labelled), len(variant.unlabelled), len(variant.test)) == (2, 2, 1)
    for before, after in zip(source.labelled + source.test, variant.labelled + variant.test):
        image, transform, crs = _read(before.image)
        small, small_transform, small_crs = _read(after.image)
        assert small.shape == (image.shape[0], image.shape[1] // 2, image.shape[2] // 2) and small_crs == crs
        assert small_transform == transform * rasterio.Affine.scale(2)  # same corner, pixels twice as large
        road, small_road = (_read(before.label)[0] > 0).mean(), (_read(after.label)[0] > 0).mean()
        assert 0 < small_road and abs(small_road - road) < 0.2 * road


def test_centreline_labels_are_thin_lines_on_the_roads(carry, tiny_dataset, tmp_path):
    source = DatasetSpec.from_split(tiny_dataset)
    variant = DatasetSpec.from_split(carry.write_variant(tiny_dataset, tmp_path, "centreline"))
    for before, after in zip(source.labelled + source.test, variant.labelled + variant.test):
        assert np.array_equal(_read(after.image)[0], _read(before.image)[0])
        surface, lines = _read(before.label)[0][0] > 0, _read(after.label)[0][0] > 0
        assert 0 < lines.sum() < surface.sum()
        assert not (lines & ~dilation(surface, disk(1))).any()  # at most the 1 px widening leaves the road
    with pytest.raises(FileExistsError, match="empty output folder"):
        carry.write_variant(tiny_dataset, tmp_path, "centreline")
