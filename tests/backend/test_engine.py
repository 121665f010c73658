"""Tiled, streamed ONNX inference: seams, blending, metadata, providers, bad models (real onnxruntime)."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from road_sslkd.engine import blend_ramp, dihedral, predict_strips, predict_tiled, tile_starts
from road_sslkd.events import UserError
from road_sslkd.onnx_runtime import DEFAULT_TILE, load_model
from road_sslkd.quantize import quantize_int8, synthetic_tiles

OURS = {
    "model_type": "Segmentor",
    "class_names": {"0": "road"},
    "resolution": 100,
    "tile_size": 64,
    "tiles_size": 64,
    "tiles_overlap": 25,
    "standardization_mean": [0.5, 0.5, 0.5],
    "standardization_std": [0.25, 0.25, 0.25],
    "seg_thresh": 0.4,
    "road_sslkd_output": "logits",
}


def tiny_net(bands: int = 3, channels: int = 1) -> nn.Module:
    """Two 3x3 convolutions: a receptive field of 5 px, so tiles with overlap can match the whole image."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(bands, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, channels, 3, padding=1))


def band_net(bands: int = 3) -> nn.Module:
    """Output = first input band: with mean 0, std 1 and 'probabilities' the prediction is band 1 / 255."""
    net = nn.Conv2d(bands, 1, 1, bias=False)
    with torch.no_grad():
        net.weight.zero_()
        net.weight[0, 0] = 1.0
    return net


def write_model(path: Path, net: nn.Module, meta: dict | None = None, bands: int = 3, batch=None) -> Path:
    """Export ``net`` to ONNX (dynamic batch unless ``batch``, dynamic size) and add metadata_props."""
    axes = {2: "height", 3: "width"} if batch else {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net.eval(), torch.zeros(batch or 1, bands, 32, 32), str(path), input_names=["image"],
            output_names=["logits"], dynamic_axes={"image": axes, "logits": axes}, opset_version=17,
            dynamo=False,
        )
    model = onnx.load(str(path))
    for key, value in (meta or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    return load_model(write_model(tmp_path_factory.mktemp("m") / "ours.onnx", tiny_net(), OURS), "cpu", 1)


def whole_image(model, raw: np.ndarray) -> np.ndarray:
    return model.infer(model.info.normalise(raw)[None])[0]


def test_tile_starts_cover_and_end_at_edge():
    assert tile_starts(100, 64, 48) == [0, 36]
    assert tile_starts(50, 64, 48) == [0]
    starts = tile_starts(1000, 64, 48)
    assert starts[-1] == 1000 - 64 and all(b - a <= 48 for a, b in zip(starts, starts[1:]))


def test_blend_ramp_peaks_in_the_middle_and_never_vanishes():
    ramp = blend_ramp(64, 16)
    assert ramp.shape == (64,) and np.allclose(ramp, ramp[::-1])
    assert ramp[32] == 1.0 and ramp.min() > 0
    assert ramp[0] < ramp[8] < ramp[16]


def test_dihedral_averages_the_eight_views_back_on_the_tile_grid():
    rng = np.random.default_rng(0)
    batch = rng.random((2, 3, 32, 48), dtype=np.float32)
    # A per-pixel function does not care about orientation: the average is the function itself.
    def per_pixel(b):
        return 1 / (1 + np.exp(-b.mean(1)))

    np.testing.assert_allclose(dihedral(per_pixel)(batch), per_pixel(batch), rtol=1e-6)
    # A column ramp is seen as x, 1 - x, y and 1 - y, twice each, so on a square tile the average is 0.5.
    def column(b):
        return np.broadcast_to(np.linspace(0, 1, b.shape[3], dtype=np.float32), (b.shape[0], *b.shape[2:]))

    square = batch[..., :32]
    np.testing.assert_allclose(dihedral(column)(square), np.full((2, 32, 32), 0.5), atol=1e-6)
    assert dihedral(column)(batch).shape == (2, 32, 48)


def test_metadata_is_read_once_into_model_info(ours):
    info = ours.info
    assert (info.bands, info.tile_size, info.overlap_px, info.resolution_cm) == (3, 64, 16, 100.0)
    assert info.mean == (0.5,) * 3 and info.std == (0.25,) * 3 and info.threshold == 0.4
    assert info.output == "logits" and not info.defaulted and not ours.warnings
    assert np.allclose(info.normalise(np.full((3, 1, 1), 255, np.uint8)), 2.0)


def test_tiled_equals_whole_image_inference(ours):
    raw = np.random.default_rng(0).integers(0, 256, (3, 150, 170), dtype=np.uint8)
    tiled = predict_tiled(ours.info.normalise(raw), ours.infer, tile=64, overlap=16)
    diff = np.abs(tiled - whole_image(ours, raw))
    assert diff.max() < 0.05 and diff.mean() < 2e-3


def test_strips_blend_exactly_like_one_strip(ours):
    image = ours.info.normalise(np.random.default_rng(1).integers(0, 256, (3, 300, 90), dtype=np.uint8))
    whole = predict_tiled(image, ours.infer, tile=64, overlap=16)
    rows, reads = np.full((300, 90), np.nan, np.float32), []

    def read(y0, y1):
        reads.append((y0, y1))
        return image[:, y0:y1]

    def write(y0, y1, probability):
        assert reads[-1][0] <= y0 and y1 <= reads[-1][1]
        rows[y0:y1] = probability

    assert predict_strips(read, write, 300, 90, ours.infer, 64, 16, strip_pixels=64 * 90)
    assert len(reads) == len(tile_starts(300, 64, 48)) and max(b - a for a, b in reads) == 64
    np.testing.assert_allclose(rows, whole, atol=1e-6)


def test_small_image_progress_and_cancel(ours):
    image = ours.info.normalise(np.full((3, 20, 30), 128, np.uint8))
    seen = []
    out = predict_tiled(image, ours.infer, 64, 16, progress=lambda done, total: seen.append((done, total)))
    assert out.shape == (20, 30) and seen[-1] == (1, 1)
    assert predict_tiled(image, ours.infer, 64, 16, cancelled=lambda: True) is None


def test_predict_array_masks_nodata(ours):
    raw = np.ma.masked_equal(np.full((3, 80, 80), 200, np.uint8), 0)
    raw[:, :10] = np.ma.masked
    out = ours.predict_array(raw)
    assert out.dtype == np.uint8 and out.mask[:10].all() and not out.mask[10:].any()
    assert (out.data[:10] == 0).all()


def test_model_without_metadata_gets_defaults_and_a_warning(tmp_path):
    model = load_model(write_model(tmp_path / "bare.onnx", tiny_net()), "cpu")
    info = model.info
    assert (info.tile_size, info.mean, info.std, info.output) == (DEFAULT_TILE, (0.0,) * 3, (1.0,) * 3,
                                                                   "probabilities")
    assert info.resolution_cm is None and "tile_size" in info.defaulted
    assert len(model.warnings) == 1 and "no metadata tiles_size, tiles_overlap" in model.warnings[0]


def test_deepness_two_class_softmax_model(tmp_path):
    net = nn.Sequential(tiny_net(channels=2), nn.Softmax(dim=1))
    meta = {"model_type": "Segmentor", "class_names": {"0": "background", "1": "road"}, "tiles_size": 64,
            "tiles_overlap": 10, "standardization_mean": 0.0, "standardization_std": 1.0, "resolution": 30}
    model = load_model(write_model(tmp_path / "deepness.onnx", net, meta, batch=1), "cpu")
    assert (model.info.channels, model.info.road_channel, model.info.fixed_batch) == (2, 1, 1)
    assert model.info.defaulted == ("threshold",)
    probs = model.infer(np.zeros((3, 3, 64, 64), np.float32))
    assert probs.shape == (3, 64, 64) and (0 <= probs).all() and (probs <= 1).all()


def test_cuda_request_falls_back_to_cpu_with_one_message(tmp_path):
    model = load_model(write_model(tmp_path / "m.onnx", tiny_net(), OURS), "cuda")
    if model.provider == "CUDAExecutionProvider":  # a machine with a working GPU: nothing to fall back from
        assert model.warnings == []
    else:
        assert model.provider == "CPUExecutionProvider"
        assert len(model.warnings) == 1 and "CUDA" in model.warnings[0] and "CPU" in model.warnings[0]


def test_corrupt_and_non_segmentation_models_are_refused(tmp_path):
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07not really a protobuf" * 10)
    with pytest.raises(UserError, match="corrupt.onnx") as err:
        load_model(corrupt)
    assert "export" in err.value.hint
    classifier = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    path = tmp_path / "classifier.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(classifier, torch.zeros(1, 3, 32, 32), str(path), input_names=["image"],
                          opset_version=17, dynamo=False)
    with pytest.raises(UserError, match="classifier.onnx is not a segmentation model"):
        load_model(path)
    with pytest.raises(UserError, match="model file not found"):
        load_model(tmp_path / "missing.onnx")


def test_int8_copy_keeps_metadata_and_predictions(tmp_path, ours):
    src = write_model(tmp_path / "m.onnx", tiny_net(), OURS)
    int8_path = quantize_int8(src, tmp_path / "m.int8.onnx", synthetic_tiles(3, count=2, size=64))
    int8 = load_model(int8_path, "cpu")
    assert int8.info == ours.info and not int8.warnings
    meta = int8.session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["road_sslkd_quantized"]).startswith("int8")
    image = ours.info.normalise(next(synthetic_tiles(3, count=1, size=64, seed=3)))[None]
    assert np.abs(int8.infer(image) - ours.infer(image)).mean() < 0.02


def test_inference_modules_import_without_torch_or_rasterio():
    code = (
        "import sys, road_sslkd.engine, road_sslkd.onnx_runtime\n"
        "heavy = [m for m in ('torch', 'rasterio', 'qgis') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
