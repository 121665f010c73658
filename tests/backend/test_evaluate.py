"""Evaluation streamed in strips scores exactly as the whole raster held in memory did."""

import dataclasses

import numpy as np
import pytest
import torch
from scipy import ndimage

from conftest import write_raster
from road_sslkd.data import LabelledSet, Normalizer, Pair
from road_sslkd.engine import dihedral, predict_tiled
from road_sslkd.evaluate import evaluate_items, torch_infer
from road_sslkd.models import build_model

TILE, OVERLAP_PERCENT = 64, 25  # stride 48: tile rows start at 0, 48, 96, 144, 166
HEIGHT, WIDTH = 230, 200  # 4 tiles per row: batches of 4 are one tile row, however the rows fall into strips
NORMALIZER = Normalizer([0.5] * 3, [0.25] * 3)


def _road(mask: np.ndarray, offset: int, slope: float, width: int = 5) -> None:
    """A straight road x = offset + slope * y, crossing every strip."""
    for y in range(mask.shape[0]):
        x = int(offset + slope * y)
        mask[y, max(0, x) : max(0, x + width)] = 1


@pytest.fixture
def items(tmp_path):
    """One image and mask: roads across strip borders, drawn 2 px beside the truth (relaxed hits), a road
    only in the image and one only in the mask, image nodata and unknown mask pixels on strip borders."""
    truth = np.zeros((HEIGHT, WIDTH), np.uint8)
    _road(truth, 10, 0.6)
    _road(truth, 190, -0.5)
    _road(truth, 120, 0.0)  # missed: not in the image
    drawn = np.zeros_like(truth)
    _road(drawn, 12, 0.6)
    _road(drawn, 188, -0.5)
    _road(drawn, 60, 0.1)  # a false road
    image = np.where(drawn, 230, 80).astype(np.uint8)[None].repeat(3, axis=0)
    image[:, 40:58, 20:120] = 0  # nodata across the strip border at row 48
    truth[90:101, 100:190] = 255  # unknown across the border at row 96
    pair = Pair(write_raster(tmp_path / "image.tif", image, nodata=0),
                write_raster(tmp_path / "mask.tif", truth, nodata=255))
    return LabelledSet([pair], [1, 2, 3], 6.0).items


def _box_filter() -> torch.nn.Module:
    """A real torch model with a clear answer: road where the 5 x 5 mean of the bands is bright."""
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 1, 5, padding=2)
    with torch.no_grad():
        model.weight.fill_(8.0 / 75)
        model.bias.fill_(-8.0 * 0.4)
    return model


def _whole_raster_counts(infer, items, threshold: float = 0.5) -> dict:
    """The evaluation as it was: each raster predicted and dilated whole."""
    counts = dict.fromkeys(("tp", "fp", "fn", "relaxed_tp_pred", "relaxed_tp_true", "pred_total", "true_total"), 0)
    for raster, label in items:
        image, valid = raster.read(0, 0, raster.height, raster.width)
        prob = predict_tiled(NORMALIZER(image), infer, TILE, TILE * OVERLAP_PERCENT // 100, batch=4)
        truth = label.read(0, 0, raster.height, raster.width)
        pred, road, known = prob >= threshold, truth == 1, valid & (truth != 255)
        p, t = pred & known, road & known
        for key, value in (("tp", p & t), ("fp", p & ~t), ("fn", ~p & t), ("pred_total", p), ("true_total", t),
                           ("relaxed_tp_pred", p & (ndimage.distance_transform_edt(~road) <= 3)),
                           ("relaxed_tp_true", t & (ndimage.distance_transform_edt(~pred) <= 3))):
            counts[key] += int(value.sum())
    return counts


def _observed(infer, items, **kwargs):
    calls = []
    metrics = evaluate_items(infer, items, NORMALIZER, TILE, OVERLAP_PERCENT,
                             observe=lambda i, prob, road, known: calls.append((i, prob.copy(), road, known)),
                             **kwargs)
    return dataclasses.asdict(metrics), calls


@pytest.mark.parametrize("tile_rows", [1, 2])
def test_strips_count_exactly_what_the_whole_raster_counts(items, tile_rows):
    infer = torch_infer(_box_filter(), torch.device("cpu"))
    want = _whole_raster_counts(infer, items)
    # The raster exercises every count: hits, misses, false roads, 2 px offsets that only the slack forgives.
    assert want["tp"] and want["fp"] and want["fn"]
    assert want["relaxed_tp_pred"] > want["tp"] and want["relaxed_tp_true"] > want["tp"]
    got, calls = _observed(infer, items, strip_pixels=tile_rows * TILE * WIDTH)
    assert got == want
    # observe sees every row once, in order, with the whole-raster probabilities and the nodata left out.
    assert len(calls) == -(-5 // tile_rows) and {i for i, *_ in calls} == {0}
    raster, label = items[0]
    image, valid = raster.read(0, 0, HEIGHT, WIDTH)
    np.testing.assert_array_equal(np.concatenate([prob for _, prob, _, _ in calls]),
                                  predict_tiled(NORMALIZER(image), infer, TILE, TILE * OVERLAP_PERCENT // 100))
    known = np.concatenate([k for *_, k in calls])
    np.testing.assert_array_equal(known, valid & (label.read(0, 0, HEIGHT, WIDTH) != 255))
    assert not known[40:58, 20:120].any() and not known[90:101, 100:190].any()


@pytest.mark.parametrize("network", ["tiny-student", "box filter with TTA"])
def test_a_raster_of_one_strip_scores_as_before(items, network):
    """One observed call per raster, with the whole raster, and the counts of old: a project network, and
    test-time augmentation."""
    if network == "tiny-student":
        torch.manual_seed(0)
        infer = torch_infer(build_model("tiny-student", 3, weights="none"), torch.device("cpu"))
    else:
        infer = dihedral(torch_infer(_box_filter(), torch.device("cpu")))
    got, calls = _observed(infer, items)
    assert got == _whole_raster_counts(infer, items)
    assert [(i, prob.shape) for i, prob, *_ in calls] == [(0, (HEIGHT, WIDTH))]
